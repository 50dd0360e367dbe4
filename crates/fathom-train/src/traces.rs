//! SFT data from tasks: reference conversations written from the problems themselves
//! (`fathom tasks`), and reasoning traces sampled from a teacher and kept only when the
//! rule-based reward accepts them (R1's rejection sampling, the data of trace distillation).
//!
//! Every conversation has the question as the user turn (after an optional system prompt) — the
//! prompt GRPO and `fathom eval` use — and an assistant turn `<think>\n…\n</think>\n<answer>…
//! </answer>`.

use crate::evaluate::{prompt_ids, question_messages};
use crate::posttrain::on_ranges;
use crate::rewards::RewardSet;
use crate::tasks::Problem;
use fathom_core::TextTokenizer;
use fathom_engine::{generate_batch, Request, SamplingParams, SchedulerConfig};
use fathom_model::CausalLm;
use serde_json::{json, Value};

/// How a reference answer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Column arithmetic digit by digit in `<think>` (carries, borrows), then the answer
    /// (arithmetic problems only; see [`worked_solution`]).
    Worked,
    /// The answer alone after an empty reasoning block: the raw task data.
    Answer,
}

/// Decimal digits of a non-negative number, least significant first.
fn digits(mut x: i64) -> Vec<i64> {
    let mut d = vec![x % 10];
    x /= 10;
    while x > 0 {
        d.push(x % 10);
        x /= 10;
    }
    d
}

/// Column addition, one line per digit from the ones up: "7 + 8 = 15", "4 + 3 + 1 = 8".
fn add_lines(a: i64, b: i64, out: &mut Vec<String>) {
    let (da, db) = (digits(a), digits(b));
    let mut carry = 0;
    for i in 0..da.len().max(db.len()) {
        let (x, y) = (*da.get(i).unwrap_or(&0), *db.get(i).unwrap_or(&0));
        let s = x + y + carry;
        out.push(match carry {
            0 => format!("{x} + {y} = {s}"),
            c => format!("{x} + {y} + {c} = {s}"),
        });
        carry = s / 10;
    }
}

/// Column subtraction of b ≤ a, one line per digit; a borrow shows as the digit plus ten:
/// 92 − 38 → "12 - 8 = 4", "8 - 3 = 5".
fn sub_lines(a: i64, b: i64, out: &mut Vec<String>) {
    let (da, db) = (digits(a), digits(b));
    let mut borrow = 0;
    for (i, &x0) in da.iter().enumerate() {
        let y = *db.get(i).unwrap_or(&0);
        let mut x = x0 - borrow;
        borrow = 0;
        if x < y {
            x += 10;
            borrow = 1;
        }
        out.push(format!("{x} - {y} = {}", x - y));
    }
}

/// Multiplication by one digit, one line per digit of a: 47 × 6 → "7 * 6 = 42", "4 * 6 + 4 = 28".
fn mul_lines(a: i64, b: i64, out: &mut Vec<String>) {
    let mut carry = 0;
    for x in digits(a) {
        let p = x * b + carry;
        out.push(match carry {
            0 => format!("{x} * {b} = {p}"),
            c => format!("{x} * {b} + {c} = {p}"),
        });
        carry = p / 10;
    }
}

/// The worked solution of "What is A op B?" (+ and − on non-negative operands, × by a one-digit
/// number): the column steps, then the equation with the result. `None` for other problems.
pub fn worked_solution(p: &Problem) -> Option<String> {
    let body = p.question.strip_prefix("What is ")?.strip_suffix('?')?;
    let mut parts = body.split(' ');
    let (a, op, b) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let (a, b): (i64, i64) = (a.parse().ok()?, b.parse().ok()?);
    if a < 0 || b < 0 {
        return None;
    }
    let mut lines = vec![];
    let result = match op {
        "+" => {
            add_lines(a, b, &mut lines);
            a + b
        }
        "-" if a >= b => {
            sub_lines(a, b, &mut lines);
            a - b
        }
        "-" => {
            lines.push(format!("{a} - {b} = -({b} - {a})"));
            sub_lines(b, a, &mut lines);
            a - b
        }
        "*" if b < 10 => {
            mul_lines(a, b, &mut lines);
            a * b
        }
        _ => return None,
    };
    lines.push(format!("{a} {op} {b} = {result}"));
    Some(lines.join("\n"))
}

/// The assistant text of a reference answer.
pub fn reference_answer(p: &Problem, style: Style) -> Result<String, String> {
    let answer = p.reference();
    Ok(match style {
        Style::Worked => {
            let work = worked_solution(p).ok_or_else(|| {
                format!(
                    "no worked solution for {:?} (worked style covers + and - and × by one digit)",
                    p.question
                )
            })?;
            format!("<think>\n{work}\n</think>\n<answer>{answer}</answer>")
        }
        Style::Answer => format!("<think>\n</think>\n<answer>{answer}</answer>"),
    })
}

/// One SFT line: (system,) user, assistant.
pub fn conversation(p: &Problem, assistant: &str, system: Option<&str>) -> Value {
    let mut msgs = question_messages(p, system);
    if let Value::Array(m) = &mut msgs {
        m.push(json!({"role": "assistant", "content": assistant}));
    }
    json!({ "messages": msgs })
}

/// Problems whose samples one worker decodes as one batch.
pub const TRACE_CHUNK: usize = 64;

/// Statistics of trace generation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TraceStats {
    pub problems: usize,
    pub samples: usize,
    pub accepted: usize,
    /// Problems with at least one accepted trace.
    pub solved: usize,
}

/// Sample `k` completions of each problem from `teacher` (greedy first, then at `temperature`),
/// keep those whose reward equals `min_reward` or more, at most `keep_per_problem` per problem,
/// and return them as SFT conversations. Work is split over `threads`, each worker decoding
/// [`TRACE_CHUNK`] problems' samples at a time as one continuous batch; sample j of problem i is
/// seeded by (seed, i, j).
#[allow(clippy::too_many_arguments)]
pub fn teacher_traces(
    teacher: &CausalLm,
    tok: &TextTokenizer,
    problems: &[Problem],
    rewards: &RewardSet,
    min_reward: f64,
    k: usize,
    keep_per_problem: usize,
    temperature: f64,
    max_tokens: usize,
    seed: u64,
    system: Option<&str>,
    threads: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> anyhow::Result<(Vec<Value>, TraceStats)> {
    let k = k.max(1);
    let parts: Vec<anyhow::Result<Vec<(usize, Vec<String>)>>> =
        on_ranges(problems.len(), threads, |range| {
            let mut out = Vec::new();
            // Each worker decodes its problems a chunk at a time, every sample of the chunk in
            // one continuous batch (progress is reported per chunk).
            let indices: Vec<usize> = range.collect();
            for chunk in indices.chunks(TRACE_CHUNK) {
                let mut prefills = Vec::with_capacity(chunk.len());
                let mut requests = Vec::with_capacity(chunk.len() * k);
                for &i in chunk {
                    let prompt = prompt_ids(tok, &problems[i], system)?;
                    let prefilled = tok.decode(&prompt, false)?.trim_end().ends_with("<think>");
                    for j in 0..k {
                        let params = SamplingParams {
                            temperature: if j == 0 { 0.0 } else { temperature },
                            seed: crate::data::mix(seed ^ crate::data::mix((i * 1009 + j) as u64)),
                            ..SamplingParams::default()
                        };
                        requests.push(Request::until_eos(
                            prompt.clone(),
                            params,
                            max_tokens,
                            &tok.eos_ids,
                        ));
                    }
                    prefills.push(prefilled);
                }
                let batch = SchedulerConfig::whole_batch(&requests, 0);
                let outputs = generate_batch(teacher, Some(tok), batch, requests)?;
                for ((&i, &prefilled), samples) in
                    chunk.iter().zip(&prefills).zip(outputs.chunks(k))
                {
                    let p = &problems[i];
                    let mut kept = Vec::new();
                    for g in samples {
                        if g.finish != fathom_engine::FinishReason::Eos {
                            continue; // cut off: not a complete trace
                        }
                        let text = if prefilled {
                            format!("<think>\n{}", g.text)
                        } else {
                            g.text.clone()
                        };
                        if rewards.score(p, &g.text).total >= min_reward
                            && !kept.contains(&text)
                            && kept.len() < keep_per_problem
                        {
                            kept.push(text);
                        }
                    }
                    out.push((i, kept));
                }
                progress(chunk.len());
            }
            Ok(out)
        });
    let mut stats = TraceStats {
        problems: problems.len(),
        samples: problems.len() * k.max(1),
        ..Default::default()
    };
    let mut lines = Vec::new();
    for part in parts {
        for (i, kept) in part? {
            stats.solved += !kept.is_empty() as usize;
            stats.accepted += kept.len();
            for t in kept {
                lines.push(conversation(&problems[i], &t, system));
            }
        }
    }
    Ok((lines, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewards::{Accuracy, Format, Reward};
    use crate::tasks::Split;

    #[test]
    fn worked_solutions_by_hand() {
        let w = |q: &str| worked_solution(&Problem::exact(q, "0")).unwrap();
        assert_eq!(
            w("What is 47 + 38?"),
            "7 + 8 = 15\n4 + 3 + 1 = 8\n47 + 38 = 85"
        );
        assert_eq!(w("What is 92 - 38?"), "12 - 8 = 4\n8 - 3 = 5\n92 - 38 = 54");
        assert_eq!(
            w("What is 38 - 92?"),
            "38 - 92 = -(92 - 38)\n12 - 8 = 4\n8 - 3 = 5\n38 - 92 = -54"
        );
        assert_eq!(
            w("What is 100 - 1?"),
            "10 - 1 = 9\n9 - 0 = 9\n0 - 0 = 0\n100 - 1 = 99"
        );
        assert_eq!(
            w("What is 47 * 6?"),
            "7 * 6 = 42\n4 * 6 + 4 = 28\n47 * 6 = 282"
        );
        assert_eq!(
            w("What is 95 + 7?"),
            "5 + 7 = 12\n9 + 0 + 1 = 10\n95 + 7 = 102"
        );
        assert!(worked_solution(&Problem::exact("What is 47 * 36?", "1692")).is_none());
    }

    /// Every column step is true arithmetic and the last line's result is the answer.
    #[test]
    fn worked_steps_are_correct_for_every_generated_problem() {
        for d in [2, 3, 4] {
            for p in crate::tasks::arithmetic_digits(3000, 11, Split::Train, d) {
                let Some(w) = worked_solution(&p) else {
                    continue;
                };
                for line in w.lines() {
                    let (lhs, rhs) = line.split_once(" = ").unwrap();
                    if rhs.starts_with("-(") {
                        continue;
                    }
                    let v = crate::tasks::eval_expression(lhs).unwrap().0;
                    let r: i128 = rhs.parse().unwrap();
                    assert_eq!(v, (r, 1), "{}: {line}", p.question);
                }
                let last = w.lines().last().unwrap();
                assert!(
                    p.check(last.rsplit(" = ").next().unwrap()),
                    "{}: {w}",
                    p.question
                );
            }
        }
    }

    #[test]
    fn reference_answers_earn_full_reward() {
        for p in crate::tasks::arithmetic_digits(50, 3, Split::Train, 2) {
            let worked = reference_answer(&p, Style::Worked).unwrap();
            assert_eq!(Accuracy.score(&p, &worked), 1.0, "{worked}");
            assert_eq!(Format.score(&p, &worked), 1.0, "{worked}");
            let raw = reference_answer(&p, Style::Answer).unwrap();
            assert_eq!(Accuracy.score(&p, &raw), 1.0);
            assert_eq!(Format.score(&p, &raw), 1.0);
            assert!(!raw.contains(" = ") && worked.contains(" = "));
        }
        let c = crate::tasks::countdown(1, 1, Split::Train);
        assert!(reference_answer(&c[0], Style::Worked).is_err());
    }
}
