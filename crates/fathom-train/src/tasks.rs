//! Tasks with verifiable answers for GRPO and evaluation: multi-digit arithmetic, countdown (reach
//! a target with + − × ÷ using each given number once), and user tasks from JSONL
//! (`{"prompt": …, "answer": …}`).
//!
//! Generators are deterministic for a seed and split problems into train and held-out sets by a
//! hash of the problem text, so the two sets are disjoint by construction whatever the seeds.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;

/// How a problem's answer is checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Equal as integers when both parse as integers (any size), else equal as trimmed text.
    Exact(String),
    /// An expression over exactly these numbers (each once) that evaluates to `target`.
    Countdown { numbers: Vec<i64>, target: i64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The question as the user would ask it.
    pub question: String,
    pub answer: Answer,
}

impl Problem {
    pub fn exact(question: &str, answer: &str) -> Self {
        Problem {
            question: question.to_string(),
            answer: Answer::Exact(answer.to_string()),
        }
    }

    /// Whether `given` (an extracted final answer) solves the problem.
    pub fn check(&self, given: &str) -> bool {
        use crate::rewards::normalize_integer;
        match &self.answer {
            Answer::Exact(want) => match (normalize_integer(given), normalize_integer(want)) {
                (Some(a), Some(b)) => a == b,
                _ => given.trim() == want.trim(),
            },
            Answer::Countdown { numbers, target } => {
                // "expr" or "expr = target" are both accepted.
                let expr = given.split('=').next().unwrap_or("");
                match eval_expression(expr) {
                    Some((value, mut used)) => {
                        let mut want = numbers.clone();
                        used.sort_unstable();
                        want.sort_unstable();
                        used == want && value == (*target as i128, 1)
                    }
                    None => false,
                }
            }
        }
    }

    /// The reference answer as text (for SFT targets and reports).
    pub fn reference(&self) -> String {
        match &self.answer {
            Answer::Exact(a) => a.clone(),
            Answer::Countdown { target, .. } => target.to_string(),
        }
    }
}

/// Which side of the train / held-out split a problem falls on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    HeldOut,
}

/// FNV-1a of the question: 1 in 8 problems is held out.
pub fn split_of(question: &str) -> Split {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in question.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    if h % 8 == 0 {
        Split::HeldOut
    } else {
        Split::Train
    }
}

fn sample_split(
    n: usize,
    seed: u64,
    split: Split,
    mut make: impl FnMut(&mut StdRng) -> Problem,
) -> Vec<Problem> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let p = make(&mut rng);
        if split_of(&p.question) == split {
            out.push(p);
        }
    }
    out
}

/// Multi-digit arithmetic: + and − on 2–4 digit operands, × on 2-digit × 1–2-digit.
pub fn arithmetic(n: usize, seed: u64, split: Split) -> Vec<Problem> {
    arithmetic_digits(n, seed, split, 4)
}

/// Arithmetic with operands of at most `max_digits` (≥ 2) digits: + and − on operands in
/// [10, 10^d), × on a 2-digit number times one in [2, 10^min(d−1, 2)). `max_digits = 4` is
/// [`arithmetic`].
pub fn arithmetic_digits(n: usize, seed: u64, split: Split, max_digits: u32) -> Vec<Problem> {
    let d = max_digits.clamp(2, 9);
    let top = 10i64.pow(d);
    let mul_top = 10i64.pow((d - 1).min(2));
    sample_split(n, seed ^ 0x0A41_7000, split, |rng| {
        let op = rng.random_range(0..3);
        let (a, b): (i64, i64) = match op {
            2 => (rng.random_range(10..100), rng.random_range(2..mul_top)),
            _ => (rng.random_range(10..top), rng.random_range(10..top)),
        };
        let (sym, v) = match op {
            0 => ('+', a + b),
            1 => ('-', a - b),
            _ => ('*', a * b),
        };
        Problem::exact(&format!("What is {a} {sym} {b}?"), &v.to_string())
    })
}

/// Countdown: 3 or 4 numbers in 1..=25 and a target some expression over all of them reaches.
pub fn countdown(n: usize, seed: u64, split: Split) -> Vec<Problem> {
    sample_split(n, seed ^ 0xC0D0_0000, split, |rng| loop {
        let k = rng.random_range(3..=4);
        let numbers: Vec<i64> = (0..k).map(|_| rng.random_range(1..=25)).collect();
        // Fold the numbers left to right with random operations; keep integer, positive targets.
        let mut value = numbers[0];
        let mut ok = true;
        for &x in &numbers[1..] {
            value = match rng.random_range(0..4) {
                0 => value + x,
                1 => value - x,
                2 => value * x,
                _ if value % x == 0 => value / x,
                _ => value + x,
            };
            ok &= value.abs() < 10_000;
        }
        if ok && value > 0 {
            let list = numbers
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Problem {
                question: format!(
                    "Using the numbers [{list}] once each with + - * / and parentheses, make {value}."
                ),
                answer: Answer::Countdown {
                    numbers,
                    target: value,
                },
            };
        }
    })
}

/// User tasks: one `{"prompt": "...", "answer": "..."}` object per line (answers checked as
/// [`Answer::Exact`]). Errors name the file and line.
pub fn load_jsonl(path: &Path) -> Result<Vec<Problem>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{}: {e}", at()))?;
        let field = |k: &str| match v.get(k) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
            _ => Err(format!("{}: field `{k}` missing or not a string", at())),
        };
        out.push(Problem::exact(&field("prompt")?, &field("answer")?));
    }
    if out.is_empty() {
        return Err(format!("{}: no tasks", path.display()));
    }
    Ok(out)
}

/// Exact rational value (numerator, denominator > 0, reduced) of an expression with + − × ÷ and
/// parentheses over non-negative integers, and the integers it used. `None` on a syntax error,
/// division by zero, overflow or nesting past 64 levels.
pub fn eval_expression(s: &str) -> Option<((i128, i128), Vec<i64>)> {
    eval_with(s, false)
}

/// As [`eval_expression`], also allowing unary minus (`-(69 - 32)`, `3 * -2`): the worked
/// solutions' steps (`rewards::Equations`). Countdown keeps the binary operators only.
pub fn eval_signed_expression(s: &str) -> Option<((i128, i128), Vec<i64>)> {
    eval_with(s, true)
}

fn eval_with(s: &str, unary_minus: bool) -> Option<((i128, i128), Vec<i64>)> {
    let tokens: Vec<char> = s
        .chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| match c {
            '×' | 'x' => '*',
            '÷' => '/',
            '−' => '-',
            c => c,
        })
        .collect();
    let mut p = Parser {
        t: &tokens,
        i: 0,
        used: vec![],
        unary_minus,
        depth: 0,
    };
    let v = p.sum()?;
    (p.i == tokens.len()).then_some((v, p.used))
}

struct Parser<'a> {
    t: &'a [char],
    i: usize,
    used: Vec<i64>,
    unary_minus: bool,
    /// Nesting of parentheses and unary minus (bounded: the input is model output).
    depth: usize,
}

fn gcd(a: i128, b: i128) -> i128 {
    if b == 0 {
        a.abs()
    } else {
        gcd(b, a % b)
    }
}

fn reduce((n, d): (i128, i128)) -> Option<(i128, i128)> {
    if d == 0 {
        return None;
    }
    let g = gcd(n, d).max(1);
    let s = if d < 0 { -1 } else { 1 };
    Some((s * n / g, s * d / g))
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.t.get(self.i).copied()
    }
    fn sum(&mut self) -> Option<(i128, i128)> {
        let mut v = self.product()?;
        while let Some(op @ ('+' | '-')) = self.peek() {
            self.i += 1;
            let r = self.product()?;
            let n = if op == '+' {
                v.0.checked_mul(r.1)?.checked_add(r.0.checked_mul(v.1)?)?
            } else {
                v.0.checked_mul(r.1)?.checked_sub(r.0.checked_mul(v.1)?)?
            };
            v = reduce((n, v.1.checked_mul(r.1)?))?;
        }
        Some(v)
    }
    fn product(&mut self) -> Option<(i128, i128)> {
        let mut v = self.atom()?;
        while let Some(op @ ('*' | '/')) = self.peek() {
            self.i += 1;
            let r = self.atom()?;
            v = if op == '*' {
                reduce((v.0.checked_mul(r.0)?, v.1.checked_mul(r.1)?))?
            } else {
                reduce((v.0.checked_mul(r.1)?, v.1.checked_mul(r.0)?))?
            };
        }
        Some(v)
    }
    fn atom(&mut self) -> Option<(i128, i128)> {
        if self.depth >= 64 {
            return None;
        }
        match self.peek()? {
            '(' => {
                self.i += 1;
                self.depth += 1;
                let v = self.sum()?;
                self.depth -= 1;
                (self.peek()? == ')').then_some(())?;
                self.i += 1;
                Some(v)
            }
            '-' if self.unary_minus => {
                self.i += 1;
                self.depth += 1;
                let (n, d) = self.atom()?;
                self.depth -= 1;
                Some((n.checked_neg()?, d))
            }
            c if c.is_ascii_digit() => {
                let start = self.i;
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.i += 1;
                }
                let s: String = self.t[start..self.i].iter().collect();
                let n: i64 = s.parse().ok()?;
                self.used.push(n);
                Some((n as i128, 1))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_disjoint_and_deterministic() {
        let train = arithmetic(400, 1, Split::Train);
        let held = arithmetic(100, 2, Split::HeldOut);
        assert_eq!(train, arithmetic(400, 1, Split::Train));
        for h in &held {
            assert!(!train.iter().any(|t| t.question == h.question));
            assert_eq!(split_of(&h.question), Split::HeldOut);
        }
        let c = countdown(50, 3, Split::HeldOut);
        assert!(c.iter().all(|p| split_of(&p.question) == Split::HeldOut));
    }

    #[test]
    fn arithmetic_answers_are_right() {
        for p in arithmetic(50, 7, Split::Train) {
            let q = p
                .question
                .trim_start_matches("What is ")
                .trim_end_matches('?');
            let ((n, d), _) = eval_expression(q).expect("parses");
            assert_eq!(d, 1);
            assert!(p.check(&n.to_string()), "{p:?}");
        }
    }

    #[test]
    fn countdown_checks_expressions_using_each_number_once() {
        let p = Problem {
            question: String::new(),
            answer: Answer::Countdown {
                numbers: vec![3, 5, 7],
                target: 26,
            },
        };
        assert!(p.check("3 * 7 + 5"));
        assert!(p.check("(7 * 3) + 5 = 26"));
        assert!(!p.check("3 * 7 + 5 + 0")); // extra number
        assert!(!p.check("7 * 3 + 5 * 1")); // extra number
        assert!(!p.check("26")); // numbers not used
        assert!(!p.check("3 * 7 + 6")); // wrong number
        assert!(!p.check("(3 * 7 + 5")); // syntax
        assert!(!p.check("3 / 0 + 5 + 7")); // division by zero, extra
        let q = Problem {
            question: String::new(),
            answer: Answer::Countdown {
                numbers: vec![8, 3, 4],
                target: 2,
            },
        };
        assert!(!q.check("8 / (3 + 1) ")); // 1 is not given
        assert!(!q.check("8 / 4 * (3 / 3)")); // 3 used twice
        assert!(Problem {
            question: String::new(),
            answer: Answer::Countdown {
                numbers: vec![6, 4, 3],
                target: 8
            }
        }
        .check("6 / 3 * 4"));
        // Every generated problem is solvable by construction (the generator's own fold).
        for p in countdown(100, 11, Split::Train) {
            let Answer::Countdown { numbers, target } = &p.answer else {
                unreachable!()
            };
            assert!(numbers.len() >= 3 && *target > 0);
        }
    }

    #[test]
    fn jsonl_tasks_load_and_report_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.jsonl");
        std::fs::write(
            &f,
            "{\"prompt\": \"2+2?\", \"answer\": \"4\"}\n\n{\"prompt\": \"x\", \"answer\": 5}\n",
        )
        .unwrap();
        let tasks = load_jsonl(&f).unwrap();
        assert_eq!(tasks.len(), 2);
        assert!(tasks[1].check("5"));
        std::fs::write(&f, "{\"prompt\": \"2+2?\"}\n").unwrap();
        let err = load_jsonl(&f).unwrap_err();
        assert!(err.contains("t.jsonl:1") && err.contains("answer"), "{err}");
        std::fs::write(&f, "not json\n").unwrap();
        assert!(load_jsonl(&f).unwrap_err().contains("t.jsonl:1"));
    }
}
