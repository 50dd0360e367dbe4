//! SentencePiece (`tokenizer.ggml.model` = `llama`) vocabularies read from GGUF metadata alone:
//! llama.cpp's own test corpus for its LLaMA vocabulary (fixtures/vocab, copied from llama.cpp)
//! gives llama.cpp's ids, and decoding gives the text back.

use candle_core::quantized::gguf_file::Content;
use fathom_core::TextTokenizer;
use std::path::PathBuf;

fn vocab() -> (TextTokenizer, Vec<(String, Vec<u32>)>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/vocab");
    let path = dir.join("ggml-vocab-llama-spm.gguf");
    let content = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    let tok = TextTokenizer::from_gguf_metadata(&content.metadata, &path).unwrap();
    let inp = std::fs::read_to_string(dir.join("ggml-vocab-llama-spm.gguf.inp")).unwrap();
    let out = std::fs::read_to_string(dir.join("ggml-vocab-llama-spm.gguf.out")).unwrap();
    let cases: Vec<(String, Vec<u32>)> = inp
        .split("\n__ggml_vocab_test__\n")
        .zip(out.lines())
        .map(|(t, ids)| {
            let ids = ids.split_whitespace().map(|v| v.parse().unwrap()).collect();
            (t.to_string(), ids)
        })
        .collect();
    (tok, cases)
}

#[test]
fn llama_spm_vocabulary_gives_llama_cpps_ids() {
    let (tok, cases) = vocab();
    assert!(cases.len() >= 40, "the corpus: {} cases", cases.len());
    for (text, want) in &cases {
        assert_eq!(&tok.encode(text, false).unwrap(), want, "{text:?}");
    }
    // Byte fallback: a character outside the vocabulary becomes its UTF-8 bytes' <0xXX> tokens.
    let ids = tok.encode("\u{1F9D9}", false).unwrap();
    assert!(ids.len() >= 4, "{ids:?}");
    assert_eq!(tok.decode(&ids, false).unwrap(), "\u{1F9D9}");
}

#[test]
fn llama_spm_decoding_gives_the_text_back() {
    let (tok, cases) = vocab();
    let mut same = 0;
    for (text, ids) in &cases {
        if &tok.decode(ids, false).unwrap() == text {
            same += 1;
        }
    }
    // Byte fallback reaches every character, so every case comes back exactly (the prepended
    // "▁" is stripped again).
    assert_eq!(same, cases.len());
}
