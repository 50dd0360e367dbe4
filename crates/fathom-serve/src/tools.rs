//! DeepSeek tool calls: the tool list rendered into the prompt, and the model's tool-call markup
//! parsed out of the answer into OpenAI `tool_calls`, also while streaming.
//!
//! Markup (DeepSeek-V3 / R1, what their chat template writes for earlier calls):
//! `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`;
//! DeepSeek-V3.1's shorter `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>` is
//! accepted too. Text before the block is the message content; a call is emitted when its end tag
//! arrives (OpenAI clients accept a call's arguments in one delta).

use crate::reasoning::partial_tag_suffix;
use serde_json::{json, Value};

pub const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
pub const CALLS_END: &str = "<｜tool▁calls▁end｜>";
pub const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
pub const CALL_END: &str = "<｜tool▁call▁end｜>";
pub const SEP: &str = "<｜tool▁sep｜>";

#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// JSON text, as OpenAI's `function.arguments`.
    pub arguments: String,
}

/// One call's body (between CALL_BEGIN and CALL_END) in either format.
fn parse_call(body: &str) -> Option<ToolCall> {
    let (head, rest) = body.split_once(SEP)?;
    let (name, args) = match rest.split_once('\n') {
        // V3/R1: "function<sep>NAME\n```json\nARGS\n```"
        Some((name, fenced))
            if head.trim() == "function" && fenced.trim_start().starts_with("```") =>
        {
            let inner = fenced
                .trim()
                .trim_start_matches("```json")
                .trim_start_matches("```");
            (name.trim(), inner.trim_end_matches("```").trim())
        }
        // V3.1: "NAME<sep>ARGS"
        _ => (head.trim(), rest.trim()),
    };
    if name.is_empty() {
        return None;
    }
    Some(ToolCall {
        name: name.to_string(),
        arguments: if args.is_empty() {
            "{}".into()
        } else {
            args.to_string()
        },
    })
}

#[derive(Debug, Clone, Default)]
pub struct ToolCallParser {
    pending: String,
    in_calls: bool,
    ended: bool,
}

impl ToolCallParser {
    /// Feed answer text; returns (content that became final, calls completed).
    pub fn push(&mut self, text: &str) -> (String, Vec<ToolCall>) {
        self.pending.push_str(text);
        let mut content = String::new();
        let mut calls = vec![];
        if self.ended {
            self.pending.clear();
            return (content, calls);
        }
        if !self.in_calls {
            match self.pending.find(CALLS_BEGIN) {
                Some(at) => {
                    content.push_str(&self.pending[..at]);
                    self.pending.drain(..at + CALLS_BEGIN.len());
                    self.in_calls = true;
                }
                None => {
                    let emit = self.pending.len() - partial_tag_suffix(&self.pending, CALLS_BEGIN);
                    content.push_str(&self.pending[..emit]);
                    self.pending.drain(..emit);
                    return (content, calls);
                }
            }
        }
        // Inside the block: complete calls come out; the end tag closes it.
        loop {
            let begin = self.pending.find(CALL_BEGIN);
            let end_all = self.pending.find(CALLS_END);
            match (begin, end_all) {
                (Some(b), e) if e.is_none_or(|e| b < e) => {
                    let body_start = b + CALL_BEGIN.len();
                    let Some(len) = self.pending[body_start..].find(CALL_END) else {
                        break;
                    };
                    if let Some(call) = parse_call(&self.pending[body_start..body_start + len]) {
                        calls.push(call);
                    }
                    self.pending.drain(..body_start + len + CALL_END.len());
                }
                (_, Some(_)) => {
                    self.ended = true;
                    self.pending.clear();
                    break;
                }
                _ => break,
            }
        }
        (content, calls)
    }

    /// End of generation: held-back text outside a tool block is content.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        if self.in_calls {
            String::new()
        } else {
            rest
        }
    }

    /// Whether a tool-call block was opened.
    pub fn saw_calls(&self) -> bool {
        self.in_calls
    }
}

/// The tool list as a system-prompt section, for chat templates that do not render `tools`
/// themselves (R1's does not): DeepSeek-V3.1's wording and call format.
pub fn tools_system_prompt(tools: &[Value]) -> String {
    let mut s = String::from("## Tools\nYou have access to the following tools:\n");
    for t in tools {
        let f = t.get("function").unwrap_or(t);
        let name = f.get("name").and_then(Value::as_str).unwrap_or("");
        let desc = f.get("description").and_then(Value::as_str).unwrap_or("");
        let params = f.get("parameters").cloned().unwrap_or(json!({}));
        s.push_str(&format!(
            "\n### {name}\nDescription: {desc}\n\nParameters: {params}\n"
        ));
    }
    s.push_str(&format!(
        "\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n{CALLS_BEGIN}{CALL_BEGIN}tool_call_name{SEP}tool_call_arguments{CALL_END}{{{{additional_tool_calls}}}}{CALLS_END}\n\nWhere:\n- `tool_call_name` must be an exact match to one of the available tools\n- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_streamed(text: &str, step: usize) -> (String, Vec<ToolCall>) {
        let mut p = ToolCallParser::default();
        let (mut content, mut calls) = (String::new(), vec![]);
        let mut i = 0;
        while i < text.len() {
            let mut j = (i + step).min(text.len());
            while !text.is_char_boundary(j) {
                j += 1;
            }
            let (c, k) = p.push(&text[i..j]);
            content.push_str(&c);
            calls.extend(k);
            i = j;
        }
        content.push_str(&p.finish());
        (content, calls)
    }

    #[test]
    fn v3_markup_with_two_calls_and_leading_content() {
        let text = format!(
            "Let me check.{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n{{\"city\": \"Paris\"}}\n```{CALL_END}\n{CALL_BEGIN}function{SEP}get_time\n```json\n{{}}\n```{CALL_END}{CALLS_END}"
        );
        for step in [1, 3, 7, 1000] {
            let (content, calls) = parse_streamed(&text, step);
            assert_eq!(content, "Let me check.");
            assert_eq!(
                calls,
                vec![
                    ToolCall {
                        name: "get_weather".into(),
                        arguments: "{\"city\": \"Paris\"}".into()
                    },
                    ToolCall {
                        name: "get_time".into(),
                        arguments: "{}".into()
                    },
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn v31_markup() {
        let text = format!("{CALLS_BEGIN}{CALL_BEGIN}lookup{SEP}{{\"q\": 1}}{CALL_END}{CALLS_END}");
        let (content, calls) = parse_streamed(&text, 2);
        assert_eq!(content, "");
        assert_eq!(
            calls,
            vec![ToolCall {
                name: "lookup".into(),
                arguments: "{\"q\": 1}".into()
            }]
        );
    }

    #[test]
    fn plain_text_and_unfinished_blocks() {
        assert_eq!(
            parse_streamed("no tools here <｜", 1),
            ("no tools here <｜".into(), vec![])
        );
        // Cut off inside a call: no call, no markup leaks into content.
        let text = format!("x{CALLS_BEGIN}{CALL_BEGIN}function{SEP}f\n```json\n{{\"a\"");
        assert_eq!(parse_streamed(&text, 4), ("x".into(), vec![]));
        // A call without a separator is dropped.
        let text = format!("{CALLS_BEGIN}{CALL_BEGIN}garbage{CALL_END}{CALLS_END}");
        assert!(parse_streamed(&text, 5).1.is_empty());
    }

    #[test]
    fn system_prompt_lists_tools() {
        let s = tools_system_prompt(&[
            json!({"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {"type": "object"}}}),
        ]);
        assert!(s.contains("### get_weather\nDescription: Weather now"));
        assert!(s.contains(CALLS_BEGIN));
    }
}
