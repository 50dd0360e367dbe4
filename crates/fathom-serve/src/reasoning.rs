//! R1's reasoning, split from the answer as text streams in: what lies between `<think>` and
//! `</think>` is `reasoning_content`, what follows is `content` (DeepSeek's API). R1's chat
//! template pre-fills `<think>\n` after the generation prompt, so the model often emits only the
//! closing tag: a splitter created with `prefilled = true` starts inside the reasoning. A model
//! that never opens a think block produces content only. Tags split across stream pieces are held
//! back until they resolve.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing seen yet: a `<think>` may still open.
    Start,
    Thinking,
    Answer,
}

#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    state: State,
    pending: String,
    /// Drop the blank lines that follow `</think>` (R1 writes "</think>\n\n" before the answer).
    trim_answer_start: bool,
    /// Drop the newline that follows an explicit `<think>`.
    trim_think_start: bool,
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag` (text to hold back
/// while a tag may be arriving in pieces).
pub(crate) fn partial_tag_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&n| tag.is_char_boundary(n) && text.ends_with(&tag[..n]))
        .unwrap_or(0)
}

impl ReasoningSplitter {
    pub fn new(prefilled: bool) -> Self {
        ReasoningSplitter {
            state: if prefilled {
                State::Thinking
            } else {
                State::Start
            },
            pending: String::new(),
            trim_answer_start: false,
            trim_think_start: false,
        }
    }

    /// Feed a piece of generated text; returns (reasoning, content) that became final.
    pub fn push(&mut self, text: &str) -> (String, String) {
        self.pending.push_str(text);
        let (mut reasoning, mut content) = (String::new(), String::new());
        loop {
            match self.state {
                State::Start => {
                    let head = self.pending.trim_start();
                    if let Some(rest) = head.strip_prefix(OPEN) {
                        self.pending = rest.to_string();
                        self.state = State::Thinking;
                        self.trim_think_start = true;
                    } else if OPEN.starts_with(head) {
                        return (reasoning, content); // "", "<", "<thi", …: wait
                    } else {
                        self.state = State::Answer;
                    }
                }
                State::Thinking if self.trim_think_start => {
                    if self.pending.is_empty() {
                        return (reasoning, content);
                    }
                    self.pending = self.pending.trim_start_matches('\n').to_string();
                    self.trim_think_start = self.pending.is_empty();
                    if self.trim_think_start {
                        return (reasoning, content);
                    }
                }
                State::Thinking => match self.pending.find(CLOSE) {
                    Some(at) => {
                        reasoning.push_str(&self.pending[..at]);
                        self.pending = self.pending[at + CLOSE.len()..].to_string();
                        self.state = State::Answer;
                        self.trim_answer_start = true;
                    }
                    None => {
                        let keep = partial_tag_suffix(&self.pending, CLOSE);
                        let emit = self.pending.len() - keep;
                        reasoning.push_str(&self.pending[..emit]);
                        self.pending.drain(..emit);
                        return (reasoning, content);
                    }
                },
                State::Answer => {
                    if self.trim_answer_start {
                        let trimmed = self.pending.trim_start_matches(['\n', ' ']);
                        if trimmed.is_empty() {
                            self.pending.clear();
                            return (reasoning, content);
                        }
                        self.pending = trimmed.to_string();
                        self.trim_answer_start = false;
                    }
                    content.push_str(&self.pending);
                    self.pending.clear();
                    return (reasoning, content);
                }
            }
        }
    }

    /// End of generation: whatever was held back goes where the state says.
    pub fn finish(&mut self) -> (String, String) {
        let rest = std::mem::take(&mut self.pending);
        match self.state {
            State::Thinking => (rest, String::new()),
            _ if self.trim_answer_start => (String::new(), rest.trim_start().to_string()),
            _ => (String::new(), rest),
        }
    }
}

/// Split a whole completion at once.
pub fn split_reasoning(text: &str, prefilled: bool) -> (String, String) {
    let mut s = ReasoningSplitter::new(prefilled);
    let (mut r, mut c) = s.push(text);
    let (r2, c2) = s.finish();
    r.push_str(&r2);
    c.push_str(&c2);
    (r, c)
}

/// The answer part of an earlier assistant turn: its reasoning is dropped from the prompt, as
/// DeepSeek's API does (and R1's template does for content carrying `</think>`).
pub fn strip_reasoning(content: &str) -> &str {
    match content.rfind(CLOSE) {
        Some(at) => content[at + CLOSE.len()..].trim_start_matches(['\n', ' ']),
        None => content,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `text` in pieces of every size from 1 to 5 bytes (on char boundaries): the split must
    /// not depend on where the stream breaks.
    fn split_streamed(text: &str, prefilled: bool) -> (String, String) {
        let whole = split_reasoning(text, prefilled);
        for step in 1..=5 {
            let mut s = ReasoningSplitter::new(prefilled);
            let (mut r, mut c) = (String::new(), String::new());
            let mut i = 0;
            while i < text.len() {
                let mut j = (i + step).min(text.len());
                while !text.is_char_boundary(j) {
                    j += 1;
                }
                let (a, b) = s.push(&text[i..j]);
                r.push_str(&a);
                c.push_str(&b);
                i = j;
            }
            let (a, b) = s.finish();
            r.push_str(&a);
            c.push_str(&b);
            assert_eq!((r, c), whole, "pieces of {step} bytes");
        }
        whole
    }

    #[test]
    fn explicit_think_block() {
        let (r, c) = split_streamed(
            "<think>\n12+35: 2+5=7, 1+3=4\n</think>\n\nThe answer is 47.",
            false,
        );
        assert_eq!(r, "12+35: 2+5=7, 1+3=4\n");
        assert_eq!(c, "The answer is 47.");
    }

    #[test]
    fn prefilled_think_only_closing_tag() {
        let (r, c) = split_streamed("add the units first…\n</think>\n\n47 ✓", true);
        assert_eq!(r, "add the units first…\n");
        assert_eq!(c, "47 ✓");
    }

    #[test]
    fn no_reasoning_at_all() {
        assert_eq!(
            split_streamed("Hello <b>there</b>", false),
            (String::new(), "Hello <b>there</b>".into())
        );
        assert_eq!(
            split_streamed("<thin air", false),
            (String::new(), "<thin air".into())
        );
        assert_eq!(split_streamed("", false), (String::new(), String::new()));
    }

    #[test]
    fn unterminated_reasoning_stays_reasoning() {
        // Cut off by max_tokens inside the think block: DeepSeek returns it as reasoning.
        assert_eq!(
            split_streamed("still thinking </thi", true),
            ("still thinking </thi".into(), String::new())
        );
    }

    #[test]
    fn later_think_tags_in_the_answer_are_content() {
        let (r, c) = split_streamed("a</think>b <think>c</think>", true);
        assert_eq!(r, "a");
        assert_eq!(c, "b <think>c</think>");
    }

    #[test]
    fn earlier_turns_lose_their_reasoning() {
        assert_eq!(strip_reasoning("<think>x</think>\n\nanswer"), "answer");
        assert_eq!(strip_reasoning("plain"), "plain");
    }
}
