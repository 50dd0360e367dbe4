//! Tokenize llama.cpp's own vocabulary tests with Fathom: for each `ggml-vocab-*.gguf` in a
//! llama.cpp `models/` folder that has `.inp`/`.out` beside it (inputs split by
//! `\n__ggml_vocab_test__\n`, one line of expected ids each, as tests/test-tokenizer-0.cpp reads
//! them), print how many of its tests give the same ids, or why the vocabulary is refused.
//!
//!   cargo run --release -p fathom-core --example llama_vocab_check -- $LLAMA/models

use candle_core::quantized::gguf_file::Content;
use fathom_core::TextTokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: llama_vocab_check LLAMA_CPP/models")?;
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    files.sort();
    for path in files {
        let inp = path.with_extension("gguf.inp");
        let out = path.with_extension("gguf.out");
        let (Ok(inp), Ok(out)) = (std::fs::read_to_string(&inp), std::fs::read_to_string(&out))
        else {
            continue;
        };
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let content = Content::read(&mut std::fs::File::open(&path)?)?;
        let tok = match TextTokenizer::from_gguf_metadata(&content.metadata, &path) {
            Ok(t) => t,
            Err(e) => {
                println!("{name}: refused: {e}");
                continue;
            }
        };
        let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
        let wants: Vec<&str> = out.lines().collect();
        let (mut same, mut first_diff) = (0, None);
        for (text, want) in texts.iter().zip(&wants) {
            let want: Vec<u32> = want
                .split_whitespace()
                .map(|t| t.parse().unwrap())
                .collect();
            let got = tok.encode(text, false)?;
            if got == want {
                same += 1;
            } else if first_diff.is_none() {
                first_diff = Some(format!("{text:?}: {got:?} != {want:?}"));
            }
        }
        println!(
            "{name}: {same}/{} equal{}",
            texts.len().min(wants.len()),
            first_diff
                .map(|d| format!("; first difference {d}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
