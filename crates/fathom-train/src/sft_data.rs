//! SFT examples: a chat-formatted conversation → token ids and a loss mask that is 1 exactly on
//! the tokens the model must learn to produce (the final assistant turn and its end-of-sequence).
//!
//! Input lines are `{"messages": [{"role", "content"}, …]}` ending with an assistant message, or
//! `{"prompt", "completion"}` (a one-turn conversation). The context is the chat template applied
//! to every message before the last with the generation prompt — exactly what the model sees at
//! inference, including R1's pre-filled `<think>\n` and its dropping of earlier turns' reasoning.
//! The target is the last assistant message verbatim (reasoning kept: `… </think> answer`) plus
//! eos; a leading `<think>` in it is removed when the template already pre-filled one. Earlier
//! assistant turns are context only (their reasoning is dropped by the template, so training on
//! them would teach a different format than inference shows).

use fathom_core::TextTokenizer;
use serde_json::{json, Value};

/// One tokenised example.
#[derive(Debug, Clone, PartialEq)]
pub struct SftExample {
    pub ids: Vec<u32>,
    /// 1 where the token is a target (predicted from the tokens before it).
    pub mask: Vec<u8>,
}

/// The messages of one JSONL line (`messages`, or `prompt` + `completion`).
pub fn parse_line(line: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let messages = match (v.get("messages"), v.get("prompt"), v.get("completion")) {
        (Some(m), _, _) => m.clone(),
        (None, Some(Value::String(p)), Some(Value::String(c))) => json!([
            {"role": "user", "content": p},
            {"role": "assistant", "content": c},
        ]),
        _ => return Err("expected `messages`, or `prompt` and `completion` strings".into()),
    };
    let list = messages.as_array().ok_or("`messages` must be a list")?;
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(|r| r.as_str());
        if !matches!(role, Some("system" | "user" | "assistant" | "tool")) {
            return Err(format!(
                "messages[{i}].role must be system, user, assistant or tool"
            ));
        }
        if !m.get("content").is_some_and(|c| c.is_string()) {
            return Err(format!("messages[{i}].content must be a string"));
        }
    }
    match list
        .last()
        .and_then(|m| m.get("role"))
        .and_then(|r| r.as_str())
    {
        Some("assistant") => Ok(messages),
        _ => Err("the last message must be the assistant's (the training target)".into()),
    }
}

/// Tokenise a conversation (see the module doc for what is context and what is target).
pub fn build_example(tok: &TextTokenizer, messages: &Value) -> Result<SftExample, String> {
    let list = messages.as_array().ok_or("`messages` must be a list")?;
    let (last, context) = list.split_last().ok_or("no messages")?;
    let (prompt_text, prompt_ids) = tok
        .apply_chat_template(&Value::Array(context.to_vec()), None, true)
        .map_err(|e| e.to_string())?;
    let mut target = last["content"].as_str().unwrap_or_default().to_string();
    if prompt_text.trim_end().ends_with("<think>") {
        if let Some(rest) = target.trim_start().strip_prefix("<think>") {
            target = rest.trim_start_matches('\n').to_string();
        }
    }
    let mut target_ids = tok.encode(&target, false).map_err(|e| e.to_string())?;
    let eos = *tok
        .eos_ids
        .first()
        .ok_or("the tokenizer has no end-of-sequence token")?;
    target_ids.push(eos);
    let mut ids = prompt_ids;
    let mut mask = vec![0u8; ids.len()];
    mask.extend(std::iter::repeat_n(1u8, target_ids.len()));
    ids.extend(target_ids);
    Ok(SftExample { ids, mask })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> TextTokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
        TextTokenizer::from_dir(&dir).unwrap()
    }

    #[test]
    fn only_the_final_answer_and_eos_are_targets() {
        let tok = tok();
        let m = parse_line(
            r#"{"messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "<think>\n2 and 2 make 4.</think><answer>4</answer>"}]}"#,
        )
        .unwrap();
        let ex = build_example(&tok, &m).unwrap();
        assert_eq!(ex.ids.len(), ex.mask.len());
        let first = ex.mask.iter().position(|&b| b == 1).unwrap();
        assert!(
            ex.mask[first..].iter().all(|&b| b == 1),
            "targets are one suffix"
        );
        // The context is exactly what inference sees: the template with the generation prompt.
        let (_, ctx) = tok
            .apply_chat_template(
                &Value::Array(m.as_array().unwrap()[..2].to_vec()),
                None,
                true,
            )
            .unwrap();
        assert_eq!(&ex.ids[..first], ctx.as_slice());
        // The target decodes to the reasoning (without a second <think>) and answer, then eos.
        let target = tok.decode(&ex.ids[first..], false).unwrap();
        assert!(
            target.starts_with("2 and 2 make 4.</think><answer>4</answer>"),
            "{target:?}"
        );
        assert_eq!(*ex.ids.last().unwrap(), tok.eos_ids[0]);
    }

    #[test]
    fn earlier_turns_are_context_and_bad_lines_are_explained() {
        let tok = tok();
        let m = parse_line(
            r#"{"messages": [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<think>greet</think>Hello"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]}"#,
        )
        .unwrap();
        let ex = build_example(&tok, &m).unwrap();
        let first = ex.mask.iter().position(|&b| b == 1).unwrap();
        let context = tok.decode(&ex.ids[..first], false).unwrap();
        assert!(
            context.contains("Hello") && !context.contains("greet"),
            "{context}"
        );
        let ex2 = build_example(
            &tok,
            &parse_line(r#"{"prompt": "2+2?", "completion": "4"}"#).unwrap(),
        )
        .unwrap();
        assert!(ex2.mask.iter().filter(|&&b| b == 1).count() >= 2);
        for (line, want) in [
            (
                r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
                "last message",
            ),
            (
                r#"{"messages": [{"role": "bot", "content": "hi"}]}"#,
                "role",
            ),
            (r#"{"messages": [{"role": "user"}]}"#, "content"),
            (r#"{"text": "x"}"#, "expected"),
            ("nope", "expected"),
        ] {
            let err = parse_line(line).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
        }
    }
}
