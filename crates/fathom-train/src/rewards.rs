//! Rule-based rewards (DeepSeek-R1 §2.2.2): an accuracy reward that checks the final answer and a
//! format reward for the R1-Zero template `<think> … </think> <answer> … </answer>`. Rewards are
//! pluggable ([`Reward`]) and composed with weights ([`RewardSet`]). Beside R1's two, an optional
//! rule-based process reward ([`Equations`]): the share of the reasoning's `lhs = rhs` lines that
//! are arithmetically true — credit for right steps when the final answer is still wrong.
//!
//! Parsing is deliberately strict and never panics: the answer is the content of the *last*
//! `<answer>…</answer>` pair, else of the last `\boxed{…}` (braces balanced); numbers compare as
//! normalised digit strings, so arbitrarily large values neither overflow nor round.

use crate::tasks::{eval_signed_expression, Problem};

/// The final answer a completion commits to: the last `<answer>…</answer>` content, else the last
/// balanced `\boxed{…}` content, trimmed. `None` when there is neither.
pub fn extract_answer(completion: &str) -> Option<String> {
    if let Some(end) = completion.rfind("</answer>") {
        if let Some(start) = completion[..end].rfind("<answer>") {
            let inner = &completion[start + "<answer>".len()..end];
            // A nested or unclosed tag inside makes the answer ambiguous: reject.
            if inner.contains("<answer>") || inner.contains("</answer>") {
                return None;
            }
            return Some(inner.trim().to_string());
        }
        return None;
    }
    let start = completion.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1usize;
    for (i, c) in completion[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(completion[start..start + i].trim().to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// An integer written with optional sign, spaces or thousands separators → canonical digits
/// ("-0012" → "-12", "1,000" → "1000"); `None` if it is not an integer.
pub fn normalize_integer(s: &str) -> Option<String> {
    let t: String = s
        .trim()
        .trim_end_matches('.')
        .chars()
        .filter(|c| !matches!(c, ',' | ' ' | '_'))
        .collect();
    let (neg, digits) = match t.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, t.strip_prefix('+').unwrap_or(&t)),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let digits = digits.trim_start_matches('0');
    Some(match (neg, digits.is_empty()) {
        (_, true) => "0".to_string(),
        (true, false) => format!("-{digits}"),
        (false, false) => digits.to_string(),
    })
}

/// The reasoning of a completion and what follows its `</think>`; the opening `<think>` is optional
/// at the start (R1's chat template pre-fills it). `None` when the reasoning is never closed.
fn split_thought(completion: &str) -> Option<(&str, &str)> {
    let s = completion.trim_start();
    s.strip_prefix("<think>")
        .unwrap_or(s)
        .split_once("</think>")
}

/// Whether a completion follows the R1-Zero template: reasoning in `<think>…</think>`, then the
/// answer in `<answer>…</answer>`, nothing else around them but whitespace. The opening `<think>`
/// may be part of the prompt (R1's chat template pre-fills it), so it is optional at the start.
pub fn follows_format(completion: &str) -> bool {
    let Some((thought, rest)) = split_thought(completion) else {
        return false;
    };
    if thought.contains("<think>") || thought.contains("<answer>") || thought.contains("</answer>")
    {
        return false;
    }
    let rest = rest.trim();
    let Some(inner) = rest
        .strip_prefix("<answer>")
        .and_then(|r| r.strip_suffix("</answer>"))
    else {
        return false;
    };
    !inner.contains("<answer>")
        && !inner.contains("</answer>")
        && !inner.contains("<think>")
        && !inner.contains("</think>")
        && !inner.trim().is_empty()
}

/// One reward component: a name (for metrics) and a score in [0, 1] for a completion.
pub trait Reward: Send + Sync {
    fn name(&self) -> &str;
    fn score(&self, problem: &Problem, completion: &str) -> f64;
}

/// 1 when the extracted answer is correct for the problem (see [`Problem::check`]).
pub struct Accuracy;

impl Reward for Accuracy {
    fn name(&self) -> &str {
        "accuracy"
    }
    fn score(&self, problem: &Problem, completion: &str) -> f64 {
        match extract_answer(completion) {
            Some(a) if problem.check(&a) => 1.0,
            _ => 0.0,
        }
    }
}

/// 1 when the completion follows the `<think>…</think><answer>…</answer>` template.
pub struct Format;

impl Reward for Format {
    fn name(&self) -> &str {
        "format"
    }
    fn score(&self, _problem: &Problem, completion: &str) -> f64 {
        if follows_format(completion) {
            1.0
        } else {
            0.0
        }
    }
}

/// 1 when the reasoning inside `<think>…</think>` is not blank (the opening tag may be the
/// template's pre-fill, as for `Format`): distillation's filter for traces that carry reasoning.
pub struct Reasoned;

impl Reward for Reasoned {
    fn name(&self) -> &str {
        "reasoned"
    }
    fn score(&self, _problem: &Problem, completion: &str) -> f64 {
        match split_thought(completion) {
            Some((thought, _)) if !thought.trim().is_empty() => 1.0,
            _ => 0.0,
        }
    }
}

/// The share of `lhs = rhs` lines inside `<think>…</think>` (the whole completion without one) whose
/// two sides are expressions over integers (+ − × ÷, parentheses, unary minus; exact rational
/// arithmetic, [`eval_signed_expression`]) of equal value; lines that are not such an equation
/// are not counted, and a completion without any scores 0. A process reward: it grades the steps a worked solution writes ("7 + 8 = 15",
/// "5 * 6 + 1 = 31"), so a group whose answers are all wrong still tells better reasoning from
/// worse. It can be gamed with padding of true trivia, which is why accuracy keeps the larger
/// weight.
pub struct Equations;

impl Reward for Equations {
    fn name(&self) -> &str {
        "equations"
    }
    fn score(&self, _problem: &Problem, completion: &str) -> f64 {
        let body = match (completion.find("<think>"), completion.find("</think>")) {
            (Some(a), Some(b)) if a < b => &completion[a + "<think>".len()..b],
            _ => completion,
        };
        let (mut counted, mut right) = (0usize, 0usize);
        for line in body.lines() {
            let Some((lhs, rhs)) = line.split_once('=') else {
                continue;
            };
            if rhs.contains('=') {
                continue;
            }
            if let (Some((a, _)), Some((b, _))) =
                (eval_signed_expression(lhs), eval_signed_expression(rhs))
            {
                counted += 1;
                right += usize::from(a == b);
            }
        }
        if counted == 0 {
            0.0
        } else {
            right as f64 / counted as f64
        }
    }
}

/// Weighted components; the total is Σ wᵢ·rᵢ.
pub struct RewardSet {
    pub components: Vec<(Box<dyn Reward>, f64)>,
}

/// Per-component scores and their weighted total for one completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub total: f64,
    pub parts: Vec<(String, f64)>,
}

impl RewardSet {
    /// R1-Zero's rewards: accuracy (weight 1) and format (weight `format_weight`).
    pub fn r1(format_weight: f64) -> Self {
        RewardSet {
            components: vec![(Box::new(Accuracy), 1.0), (Box::new(Format), format_weight)],
        }
    }

    /// Add a component.
    pub fn with(mut self, reward: Box<dyn Reward>, weight: f64) -> Self {
        self.components.push((reward, weight));
        self
    }

    pub fn score(&self, problem: &Problem, completion: &str) -> Scored {
        let parts: Vec<(String, f64)> = self
            .components
            .iter()
            .map(|(r, _)| (r.name().to_string(), r.score(problem, completion)))
            .collect();
        let total = parts
            .iter()
            .zip(&self.components)
            .map(|((_, s), (_, w))| s * w)
            .sum();
        Scored { total, parts }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::Problem;

    #[test]
    fn equations_grade_the_reasoning_steps() {
        let p = Problem::exact("What is 52 * 6?", "312");
        let right =
            "<think>\n2 * 6 = 12\n5 * 6 + 1 = 31\n52 * 6 = 312\n</think>\n<answer>312</answer>";
        assert_eq!(Equations.score(&p, right), 1.0);
        // One wrong step of three, and a wrong final line: 1/3 right.
        let wrong =
            "<think>\n2 * 6 = 12\n5 * 6 + 1 = 32\n52 * 6 = 322\n</think>\n<answer>322</answer>";
        assert!((Equations.score(&p, wrong) - 1.0 / 3.0).abs() < 1e-12);
        // Negative results, parentheses, unary minus, × and ÷; prose lines are not counted.
        let mixed = "<think>\nwe borrow here\n32 - 69 = -(69 - 32)\n32 - 69 = -37\n(3 × 4) ÷ 6 = 2\n</think>";
        assert_eq!(Equations.score(&p, mixed), 1.0);
        // Adversarial: no equations, chained '=', inexact division, overflow, huge numbers,
        // unbalanced parentheses, deep nesting, text outside <think> when it exists.
        for junk in [
            "<answer>312</answer>",
            "<think>1 = 1 = 1</think>",
            "<think>7 / 2 = 3</think>", // counted, and wrong
            "<think>99999999999999999999 * 99999999999999999999 = 1</think>",
            "<think>123456789012345678901234567890123456789012345 = 5</think>",
            "<think>(1 + 2 = 3</think>",
            "<think>x + 1 = 2</think>",
        ] {
            assert_eq!(Equations.score(&p, junk), 0.0, "{junk}");
        }
        let deep = format!("<think>{}1{} = 1</think>", "(".repeat(500), ")".repeat(500));
        assert_eq!(Equations.score(&p, &deep), 0.0);
        let outside = "2 + 2 = 5\n<think>2 + 2 = 4</think>";
        assert_eq!(Equations.score(&p, outside), 1.0);
        let value = |e: &str| eval_signed_expression(e).map(|(v, _)| v);
        assert_eq!(value("-(-3) * 2 - 10 / 5"), Some((4, 1)));
        assert_eq!(value("3 * -2"), Some((-6, 1)));
        assert_eq!(value("1 +"), None);
        assert_eq!(value(""), None);
        // Countdown keeps binary operators only.
        assert_eq!(crate::tasks::eval_expression("-(3)"), None);
        // Composed: accuracy 1, format 0.5, equations 0.5.
        let set = RewardSet::r1(0.5).with(Box::new(Equations), 0.5);
        let scored = set.score(&p, wrong);
        assert!(
            (scored.total - (0.0 + 0.5 + 0.5 / 3.0)).abs() < 1e-12,
            "{scored:?}"
        );
        assert_eq!(scored.parts[2].0, "equations");
    }

    #[test]
    fn reasoned_needs_text_inside_think() {
        let p = Problem::exact("What is 2 + 2?", "4");
        let r = |c: &str| Reasoned.score(&p, c);
        assert_eq!(r("2 + 2 = 4\n</think>\n<answer>4</answer>"), 1.0);
        assert_eq!(r("<think>\n2 + 2 = 4</think><answer>4</answer>"), 1.0);
        assert_eq!(r("\n</think>\n<answer>4</answer>"), 0.0);
        assert_eq!(r("<think> \n </think><answer>4</answer>"), 0.0);
        assert_eq!(r("2 + 2 = 4 <answer>4</answer>"), 0.0); // never closed
        assert_eq!(r(""), 0.0);
    }

    fn arith(answer: &str) -> Problem {
        Problem::exact("What is 2 + 2?", answer)
    }

    #[test]
    fn answers_are_extracted_from_the_last_tag_or_box() {
        assert_eq!(
            extract_answer("<answer> 42 </answer>").as_deref(),
            Some("42")
        );
        assert_eq!(
            extract_answer("<answer>1</answer> then <answer>2</answer>").as_deref(),
            Some("2")
        );
        assert_eq!(extract_answer("so \\boxed{7}").as_deref(), Some("7"));
        assert_eq!(
            extract_answer("\\boxed{\\frac{1}{2}}").as_deref(),
            Some("\\frac{1}{2}")
        );
        // Missing or broken tags.
        assert_eq!(extract_answer("the answer is 42"), None);
        assert_eq!(extract_answer("<answer>42"), None);
        assert_eq!(extract_answer("42</answer>"), None);
        assert_eq!(extract_answer("\\boxed{42"), None);
        // Nested tags are ambiguous.
        assert_eq!(extract_answer("<answer><answer>4</answer></answer>"), None);
        // Unicode around the tags is fine (byte offsets stay on char boundaries).
        assert_eq!(
            extract_answer("思考 <answer>é5</answer> ✓").as_deref(),
            Some("é5")
        );
    }

    #[test]
    fn integers_normalise_without_overflow() {
        assert_eq!(normalize_integer(" -0012 ").as_deref(), Some("-12"));
        assert_eq!(normalize_integer("1,000").as_deref(), Some("1000"));
        assert_eq!(normalize_integer("+7.").as_deref(), Some("7"));
        assert_eq!(normalize_integer("-0").as_deref(), Some("0"));
        let huge = "123456789012345678901234567890123456789";
        assert_eq!(normalize_integer(huge).as_deref(), Some(huge));
        assert_eq!(normalize_integer("4.5"), None);
        assert_eq!(normalize_integer("four"), None);
        assert_eq!(normalize_integer(""), None);
        assert_eq!(normalize_integer("-"), None);
    }

    #[test]
    fn format_reward_requires_the_r1_zero_template() {
        assert!(follows_format("<think>2+2 is 4</think><answer>4</answer>"));
        assert!(follows_format("2+2 is 4</think>\n<answer>4</answer>\n")); // <think> pre-filled
        assert!(!follows_format("<answer>4</answer>")); // no reasoning block
        assert!(!follows_format(
            "<think>x</think><answer>4</answer> and more"
        )); // extra text
        assert!(!follows_format("hi <think>x</think><answer>4</answer>")); // text before
        assert!(!follows_format(
            "<think>x<think>y</think><answer>4</answer>"
        )); // nested think
        assert!(!follows_format(
            "<think>x</think><answer><answer>4</answer></answer>"
        )); // nested
        assert!(!follows_format("<think>x</think><answer> </answer>")); // empty answer
        assert!(!follows_format("<think>x</think>"));
    }

    #[test]
    fn accuracy_and_composition() {
        let p = arith("4");
        let set = RewardSet::r1(0.5);
        let good = set.score(&p, "<think>2 and 2</think><answer>4</answer>");
        assert_eq!(good.total, 1.5);
        assert_eq!(
            good.parts,
            vec![("accuracy".into(), 1.0), ("format".into(), 1.0)]
        );
        // Right answer, wrong format: accuracy only.
        assert_eq!(set.score(&p, "\\boxed{4}").total, 1.0);
        // Right format, wrong answer: format only.
        assert_eq!(
            set.score(&p, "<think>hm</think><answer>5</answer>").total,
            0.5
        );
        // Equivalent integer spellings count; a huge wrong number does not.
        assert_eq!(Accuracy.score(&p, "<answer>0004</answer>"), 1.0);
        assert_eq!(
            Accuracy.score(&p, "<answer>40000000000000000000000000000004</answer>"),
            0.0
        );
        assert_eq!(Accuracy.score(&p, "4"), 0.0); // no tag, no box
    }
}
