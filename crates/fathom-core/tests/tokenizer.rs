//! Tokenizer and chat template against transformers (jinja2) output recorded in
//! fixtures/template_reference.json: the rendered text and ids must match exactly.

use fathom_core::TextTokenizer;
use serde_json::Value;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn reference() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("template_reference.json")).unwrap(),
    )
    .unwrap()
}

/// A JSON array of token ids.
fn json_ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn chat_template_matches_transformers() {
    let tok = TextTokenizer::from_dir(&fixtures().join("deepseek_v3_tiny")).unwrap();
    assert_eq!(
        tok.bos_token.as_deref(),
        Some("<｜begin▁of▁sentence｜>"),
        "AddedToken objects are read"
    );
    assert_eq!(
        tok.eos_ids,
        vec![tok.token_to_id("<｜end▁of▁sentence｜>").unwrap()]
    );
    let r = reference();
    let cases = r["chat"].as_array().unwrap();
    assert!(cases.len() >= 4);
    for (i, case) in cases.iter().enumerate() {
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let (text, ids) = tok
            .apply_chat_template(&case["messages"], None, gen)
            .unwrap();
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "case {i}: rendered text"
        );
        let want = json_ids(&case["ids"]);
        assert_eq!(ids, want, "case {i}: ids");
    }
    // Special tokens are single ids.
    for t in [
        "<｜User｜>",
        "<｜Assistant｜>",
        "<think>",
        "</think>",
        "<｜tool▁calls▁begin｜>",
    ] {
        let id = tok.token_to_id(t).unwrap_or_else(|| panic!("{t} missing"));
        assert_eq!(tok.encode(t, false).unwrap(), vec![id], "{t}");
    }
}

#[test]
fn encode_decode_matches_transformers() {
    let tok = TextTokenizer::from_dir(&fixtures().join("qwen2_tiny")).unwrap();
    for case in reference()["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want = json_ids(&case["ids"]);
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            text,
            "byte-level BPE round trip"
        );
    }
}

#[test]
fn reasoning_of_earlier_turns_is_dropped_and_think_prefilled() {
    let tok = TextTokenizer::from_dir(&fixtures().join("deepseek_v3_tiny")).unwrap();
    let msgs = serde_json::json!([
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nsecret</think>\n\n4"},
        {"role": "user", "content": "3+3?"}
    ]);
    let (text, _) = tok.apply_chat_template(&msgs, None, true).unwrap();
    assert!(!text.contains("secret"));
    assert!(text.ends_with("<｜Assistant｜><think>\n"));
}

#[test]
fn bad_template_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("qwen2_tiny/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}"}"#,
    )
    .unwrap();
    let err = TextTokenizer::from_dir(dir.path())
        .err()
        .expect("unclosed block must fail")
        .to_string();
    assert!(
        err.contains("tokenizer_config.json") && err.contains("chat_template"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{{ raise_exception('no system role') }}"}"#,
    )
    .unwrap();
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    let err = tok
        .apply_chat_template(&serde_json::json!([]), None, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no system role"), "{err}");

    std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
    let err = TextTokenizer::from_dir(dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}
