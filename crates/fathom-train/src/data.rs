//! Data: documents from text / JSONL files (plus synthetic arithmetic) → tokenised, EOS-separated
//! token streams on disk (`train.bin`, `val.bin`, little-endian u16 or u32) that are memory-mapped,
//! so a corpus larger than RAM works. Batches are random windows of `seq_len + 1` tokens drawn from
//! an RNG seeded by (seed, step, micro-batch): the data position is the step itself, which makes
//! resuming exact.
//!
//! Split: text is cut at line ends into ~16 KB chunks (each JSONL record and arithmetic problem is
//! its own chunk); a chunk goes to validation when a hash of its index falls under `val_fraction`.

use crate::arithmetic;
use crate::error::{io_err, Result, TrainError};
use fathom_core::TextTokenizer;
use memmap2::Mmap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

const CHUNK_BYTES: usize = 16 * 1024;

/// One piece of text and whether a document ends with it.
pub struct Chunk {
    pub text: String,
    pub ends_document: bool,
}

/// Streams chunks from text / JSONL files, then `arithmetic_problems` synthetic problems.
pub struct ChunkReader {
    files: Vec<PathBuf>,
    next_file: usize,
    current: Option<(PathBuf, BufReader<File>, bool, usize)>, // path, reader, is_jsonl, line no
    arithmetic: std::vec::IntoIter<arithmetic::Problem>,
}

impl ChunkReader {
    pub fn new(files: &[PathBuf], arithmetic_problems: usize, seed: u64) -> Self {
        ChunkReader {
            files: files.to_vec(),
            next_file: 0,
            current: None,
            arithmetic: arithmetic::problems(arithmetic_problems, seed).into_iter(),
        }
    }

    fn open_next(&mut self) -> Result<bool> {
        if self.next_file >= self.files.len() {
            return Ok(false);
        }
        let path = self.files[self.next_file].clone();
        self.next_file += 1;
        let f = File::open(&path).map_err(io_err(&path))?;
        let jsonl = path
            .extension()
            .is_some_and(|e| e == "jsonl" || e == "json");
        self.current = Some((path, BufReader::new(f), jsonl, 0));
        Ok(true)
    }
}

impl Iterator for ChunkReader {
    type Item = Result<Chunk>;

    fn next(&mut self) -> Option<Result<Chunk>> {
        loop {
            if self.current.is_none() {
                match self.open_next() {
                    Err(e) => return Some(Err(e)),
                    Ok(false) => {
                        return self.arithmetic.next().map(|p| {
                            Ok(Chunk {
                                text: p.text(),
                                ends_document: true,
                            })
                        })
                    }
                    Ok(true) => {}
                }
            }
            let (path, reader, jsonl, line_no) = self.current.as_mut().unwrap();
            let mut text = String::new();
            let mut line = String::new();
            loop {
                line.clear();
                let n = match reader.read_line(&mut line) {
                    Ok(n) => n,
                    Err(e) => {
                        return Some(Err(TrainError::Data {
                            path: path.clone(),
                            msg: format!("line {}: {e} (text must be UTF-8)", *line_no + 1),
                        }))
                    }
                };
                if n == 0 {
                    let ends = !text.is_empty();
                    self.current = None;
                    if ends {
                        return Some(Ok(Chunk {
                            text,
                            ends_document: true,
                        }));
                    }
                    break; // empty tail: next file
                }
                *line_no += 1;
                if *jsonl {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let doc = serde_json::from_str::<serde_json::Value>(&line)
                        .ok()
                        .and_then(|v| v.get("text").and_then(|t| t.as_str()).map(String::from));
                    return Some(match doc {
                        Some(t) => Ok(Chunk {
                            text: t,
                            ends_document: true,
                        }),
                        None => Err(TrainError::Data {
                            path: path.clone(),
                            msg: format!(
                                "line {}: expected a JSON object with a string field \"text\"",
                                line_no
                            ),
                        }),
                    });
                }
                text.push_str(&line);
                if text.len() >= CHUNK_BYTES {
                    return Some(Ok(Chunk {
                        text,
                        ends_document: false,
                    }));
                }
            }
        }
    }
}

/// splitmix64: a well-mixed hash for split assignment and batch seeds.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataMeta {
    /// Bytes per stored token: 2 (u16) or 4 (u32).
    pub token_bytes: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    /// UTF-8 bytes of text behind each split (for bits per byte).
    pub train_text_bytes: usize,
    pub val_text_bytes: usize,
    pub vocab_size: usize,
    pub sources: Vec<String>,
    pub arithmetic_problems: usize,
}

struct TokenWriter {
    out: BufWriter<File>,
    path: PathBuf,
    token_bytes: usize,
    tokens: usize,
    text_bytes: usize,
}

impl TokenWriter {
    fn create(path: PathBuf, token_bytes: usize) -> Result<Self> {
        let f = File::create(&path).map_err(io_err(&path))?;
        Ok(TokenWriter {
            out: BufWriter::new(f),
            path,
            token_bytes,
            tokens: 0,
            text_bytes: 0,
        })
    }
    fn push(&mut self, ids: &[u32]) -> Result<()> {
        for &id in ids {
            let r = if self.token_bytes == 2 {
                self.out.write_all(&(id as u16).to_le_bytes())
            } else {
                self.out.write_all(&id.to_le_bytes())
            };
            r.map_err(io_err(&self.path))?;
        }
        self.tokens += ids.len();
        Ok(())
    }
    fn finish(mut self) -> Result<(usize, usize)> {
        self.out.flush().map_err(io_err(&self.path))?;
        self.out.get_ref().sync_all().map_err(io_err(&self.path))?;
        Ok((self.tokens, self.text_bytes))
    }
}

/// Tokenise the corpus into `dir/train.bin`, `dir/val.bin`, `dir/data.json`. Written to temporary
/// names and renamed at the end, so an interrupted run never leaves a half store behind.
pub fn prepare(
    files: &[PathBuf],
    arithmetic_problems: usize,
    seed: u64,
    val_fraction: f64,
    tokenizer: &TextTokenizer,
    eos_id: u32,
    dir: &Path,
    mut progress: impl FnMut(usize),
) -> Result<DataMeta> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let vocab = tokenizer.vocab_size();
    let token_bytes = if vocab <= u16::MAX as usize + 1 { 2 } else { 4 };
    let mut train = TokenWriter::create(dir.join("train.bin.tmp"), token_bytes)?;
    let mut val = TokenWriter::create(dir.join("val.bin.tmp"), token_bytes)?;
    let threshold = (val_fraction * u32::MAX as f64) as u64;
    for (i, chunk) in ChunkReader::new(files, arithmetic_problems, seed).enumerate() {
        let chunk = chunk?;
        let mut ids = tokenizer.encode(&chunk.text, false)?;
        if chunk.ends_document {
            ids.push(eos_id);
        }
        let w = if (mix(i as u64 ^ 0x5EED) & 0xFFFF_FFFF) < threshold {
            &mut val
        } else {
            &mut train
        };
        w.push(&ids)?;
        w.text_bytes += chunk.text.len();
        progress(chunk.text.len());
    }
    let (train_tokens, train_text_bytes) = train.finish()?;
    let (val_tokens, val_text_bytes) = val.finish()?;
    let meta = DataMeta {
        token_bytes,
        train_tokens,
        val_tokens,
        train_text_bytes,
        val_text_bytes,
        vocab_size: vocab,
        sources: files.iter().map(|f| f.display().to_string()).collect(),
        arithmetic_problems,
    };
    for (tmp, name) in [("train.bin.tmp", "train.bin"), ("val.bin.tmp", "val.bin")] {
        std::fs::rename(dir.join(tmp), dir.join(name)).map_err(io_err(dir.join(name)))?;
    }
    let meta_path = dir.join("data.json");
    std::fs::write(&meta_path, serde_json::to_string_pretty(&meta).unwrap())
        .map_err(io_err(&meta_path))?;
    Ok(meta)
}

/// A memory-mapped token stream.
pub struct TokenStore {
    map: Option<Mmap>,
    token_bytes: usize,
    len: usize,
    pub path: PathBuf,
}

impl TokenStore {
    pub fn open(path: &Path, token_bytes: usize) -> Result<Self> {
        let f = File::open(path).map_err(io_err(path))?;
        let size = f.metadata().map_err(io_err(path))?.len() as usize;
        if size % token_bytes != 0 {
            return Err(TrainError::Data {
                path: path.into(),
                msg: format!("size {size} is not a multiple of {token_bytes}-byte tokens"),
            });
        }
        // An empty file cannot be mapped; keep an empty store instead.
        let map = if size == 0 {
            None
        } else {
            // SAFETY: the store is written once before training and only read afterwards.
            Some(unsafe { Mmap::map(&f) }.map_err(io_err(path))?)
        };
        Ok(TokenStore {
            map,
            token_bytes,
            len: size / token_bytes,
            path: path.into(),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn window(&self, start: usize, n: usize) -> Vec<u32> {
        let m = self.map.as_ref().expect("non-empty store");
        let b = &m[start * self.token_bytes..(start + n) * self.token_bytes];
        if self.token_bytes == 2 {
            b.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                .collect()
        } else {
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
    }
}

/// The train and validation streams of a prepared data dir.
pub struct Dataset {
    pub meta: DataMeta,
    pub train: TokenStore,
    pub val: TokenStore,
    pub seq_len: usize,
}

impl Dataset {
    pub fn open(dir: &Path, seq_len: usize) -> Result<Self> {
        let meta_path = dir.join("data.json");
        let text = std::fs::read_to_string(&meta_path).map_err(io_err(&meta_path))?;
        let meta: DataMeta = serde_json::from_str(&text).map_err(|e| TrainError::Data {
            path: meta_path.clone(),
            msg: e.to_string(),
        })?;
        let train = TokenStore::open(&dir.join("train.bin"), meta.token_bytes)?;
        let val = TokenStore::open(&dir.join("val.bin"), meta.token_bytes)?;
        for s in [&train, &val] {
            if s.len() < seq_len + 2 {
                return Err(TrainError::Data {
                    path: s.path.clone(),
                    msg: format!(
                        "{} tokens: too few for seq_len {} (add data or raise data.val_fraction)",
                        s.len(),
                        seq_len
                    ),
                });
            }
        }
        Ok(Dataset {
            meta,
            train,
            val,
            seq_len,
        })
    }

    /// Training batch `micro` of step `step`: `batch` random windows of seq_len + 1 tokens.
    pub fn train_batch(&self, seed: u64, step: usize, micro: usize, batch: usize) -> Vec<u32> {
        let mut rng = StdRng::seed_from_u64(mix(seed ^ mix(step as u64) ^ mix(micro as u64 + 7)));
        let n = self.seq_len + 1;
        let hi = self.train.len() - n;
        (0..batch)
            .flat_map(|_| self.train.window(rng.random_range(0..=hi), n))
            .collect()
    }

    /// The fixed validation windows: `count` windows of seq_len + 1 tokens spread evenly.
    pub fn val_windows(&self, count: usize) -> Vec<Vec<u32>> {
        let n = self.seq_len + 1;
        let hi = self.val.len() - n;
        let count = count.max(1);
        let start = |i: usize| if count == 1 { 0 } else { hi * i / (count - 1) };
        (0..count).map(|i| self.val.window(start(i), n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_reader_splits_text_and_reads_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let txt = dir.path().join("a.txt");
        let line = "x".repeat(100) + "\n";
        std::fs::write(&txt, line.repeat(400)).unwrap(); // 40 KB → 3 chunks
        let jsonl = dir.path().join("b.jsonl");
        std::fs::write(&jsonl, "{\"text\": \"one\"}\n\n{\"text\": \"two\"}\n").unwrap();
        let chunks: Vec<Chunk> = ChunkReader::new(&[txt.clone(), jsonl.clone()], 2, 0)
            .collect::<Result<_>>()
            .unwrap();
        let text_chunks: Vec<&Chunk> = chunks.iter().take(3).collect();
        assert_eq!(
            text_chunks.iter().map(|c| c.text.len()).sum::<usize>(),
            40400
        );
        assert!(text_chunks[..2].iter().all(|c| !c.ends_document));
        assert!(text_chunks[2].ends_document);
        assert_eq!(chunks[3].text, "one");
        assert_eq!(chunks[4].text, "two");
        assert!(chunks[5].text.starts_with("What is"));
        assert_eq!(chunks.len(), 7);

        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"txt\": 1}\n").unwrap();
        let err = ChunkReader::new(&[bad], 0, 0)
            .collect::<Result<Vec<_>>>()
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("bad.jsonl") && err.contains("line 2"), "{err}");
        let missing = ChunkReader::new(&[dir.path().join("nope.txt")], 0, 0)
            .collect::<Result<Vec<_>>>()
            .err()
            .unwrap()
            .to_string();
        assert!(missing.contains("nope.txt"), "{missing}");
    }

    #[test]
    fn batches_are_deterministic_and_in_range() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ids: Vec<u16> = (0..5000u16).collect();
        let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        std::fs::write(d.join("train.bin"), &bytes).unwrap();
        std::fs::write(d.join("val.bin"), &bytes[..2000]).unwrap();
        let meta = DataMeta {
            token_bytes: 2,
            train_tokens: 5000,
            val_tokens: 1000,
            train_text_bytes: 1,
            val_text_bytes: 1,
            vocab_size: 5000,
            sources: vec![],
            arithmetic_problems: 0,
        };
        std::fs::write(d.join("data.json"), serde_json::to_string(&meta).unwrap()).unwrap();
        let ds = Dataset::open(d, 16).unwrap();
        let a = ds.train_batch(1, 5, 0, 4);
        assert_eq!(a.len(), 4 * 17);
        assert_eq!(a, ds.train_batch(1, 5, 0, 4));
        assert_ne!(a, ds.train_batch(1, 6, 0, 4));
        assert_ne!(a, ds.train_batch(1, 5, 1, 4));
        // Windows are contiguous runs of the stream.
        for w in a.chunks(17) {
            assert!(w.windows(2).all(|p| p[1] == p[0] + 1));
        }
        let v = ds.val_windows(3);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0][0], 0);
        assert_eq!(*v[2].last().unwrap(), 999);
        assert!(Dataset::open(d, 2000).is_err());
    }
}
