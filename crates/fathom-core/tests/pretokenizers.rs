//! Every `tokenizer.ggml.pre` name llama.cpp knows, against llama.cpp's own token ids
//! (`fixtures/pretokenizers.json`, made by tools/gguf/make_pretokenizer_fixtures.py with the
//! vendored llama.cpp's `llama-tokenize` on fixtures/gguf_formats' vocabulary).

use candle_core::quantized::gguf_file::{Content, Value as G};
use fathom_core::TextTokenizer;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// Names Fathom refuses, with why: SentencePiece-style BPE on raw UTF-8 (gemma4, sarvam-moe,
/// granite-embed-multi-311m's type, whitespace) or a split rule outside what the regex engine
/// parses (afmoe's `\p{AFMoE_digits}`, llama.cpp-only) or a hand-written splitter (kimi-k2).
const REFUSED: &[&str] = &[
    "afmoe",
    "gemma4",
    "granite-embed-multi-311m",
    "kimi-k2",
    "sarvam-moe",
    "whitespace",
];

#[test]
fn every_llama_cpp_pre_tokenizer_matches_llama_tokenize() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("pretokenizers.json")).unwrap(),
    )
    .unwrap();
    let path = fixtures().join("gguf_formats/q8_0.gguf");
    let mut file = std::fs::File::open(&path).unwrap();
    let content = Content::read(&mut file).unwrap();
    let corpus: Vec<&str> = reference["corpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let names: Vec<&str> = fathom_core::pretokenizers::NAMES
        .iter()
        .map(|(n, ..)| *n)
        .collect();
    let recorded = reference["ids"].as_object().unwrap();
    assert_eq!(recorded.len(), names.len(), "fixture covers every name");
    let (mut refused, mut verified, mut mismatched) = (Vec::new(), 0, Vec::new());
    for name in &names {
        let mut meta = content.metadata.clone();
        meta.insert("tokenizer.ggml.pre".into(), G::String(name.to_string()));
        let expected = &recorded[*name];
        match TextTokenizer::from_gguf_metadata(&meta, &path) {
            Err(e) => {
                assert!(
                    e.to_string().contains(name),
                    "{name}: the error names the pre-tokenizer: {e}"
                );
                refused.push(*name);
            }
            Ok(tok) => {
                let rows = expected.as_array().unwrap_or_else(|| {
                    panic!("{name}: llama.cpp refused it ({expected}), Fathom did not")
                });
                for (text, want) in corpus.iter().zip(rows) {
                    let want: Vec<u32> = want
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as u32)
                        .collect();
                    let got = tok.encode(text, false).unwrap();
                    if got != want {
                        mismatched
                            .push(format!("{name} on {text:?}: {got:?} != llama.cpp {want:?}"));
                        break;
                    }
                }
                verified += 1;
            }
        }
    }
    assert!(
        mismatched.is_empty(),
        "{} differ:\n{}",
        mismatched.len(),
        mismatched.join("\n")
    );
    assert_eq!(refused, REFUSED, "the names Fathom refuses");
    assert_eq!(verified + REFUSED.len(), names.len());
}

#[test]
fn an_unknown_pre_tokenizer_is_a_clear_error() {
    let path = fixtures().join("gguf_formats/q8_0.gguf");
    let mut file = std::fs::File::open(&path).unwrap();
    let mut meta = Content::read(&mut file).unwrap().metadata;
    meta.insert("tokenizer.ggml.pre".into(), G::String("no-such-pre".into()));
    let e = TextTokenizer::from_gguf_metadata(&meta, &path)
        .err()
        .expect("unknown name refused")
        .to_string();
    assert!(
        e.contains("no-such-pre") && e.contains("smollm") && e.contains("q8_0.gguf"),
        "{e}"
    );
}
