//! SFT data from tasks: reference conversations written from the problems themselves
//! (`fathom tasks`), and reasoning traces sampled from a teacher and kept only when the
//! rule-based reward accepts them (R1's rejection sampling, the data of trace distillation).
//!
//! Every conversation has the R1-Zero system prompt and the question as the user turn — the
//! prompt GRPO and `fathom eval` use — and an assistant turn `<think>\n…\n</think>\n<answer>…
//! </answer>`.

use crate::evaluate::{prompt_ids, R1_ZERO_SYSTEM};
use crate::posttrain::split_ranges;
use crate::rewards::RewardSet;
use crate::tasks::{Answer, Problem};
use fathom_core::TextTokenizer;
use fathom_engine::{generate, GenerateOptions, SamplingParams};
use fathom_model::CausalLm;
use serde_json::{json, Value};

/// How a reference answer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// The worked equation as the reasoning, then the answer (arithmetic problems only).
    Worked,
    /// The answer alone after an empty reasoning block: the raw task data.
    Answer,
}

/// The worked equation of an arithmetic question "What is A op B?": "A op B = C".
fn worked_equation(p: &Problem) -> Option<String> {
    let body = p.question.strip_prefix("What is ")?.strip_suffix('?')?;
    match &p.answer {
        Answer::Exact(a) => Some(format!("{body} = {a}")),
        Answer::Countdown { .. } => None,
    }
}

/// The assistant text of a reference answer.
pub fn reference_answer(p: &Problem, style: Style) -> Result<String, String> {
    let answer = p.reference();
    Ok(match style {
        Style::Worked => {
            let eq = worked_equation(p).ok_or_else(|| {
                format!(
                    "no worked solution for {:?} (worked style covers arithmetic)",
                    p.question
                )
            })?;
            format!("<think>\n{eq}\n</think>\n<answer>{answer}</answer>")
        }
        Style::Answer => format!("<think>\n</think>\n<answer>{answer}</answer>"),
    })
}

/// One SFT line: system, user, assistant.
pub fn conversation(p: &Problem, assistant: &str) -> Value {
    json!({"messages": [
        {"role": "system", "content": R1_ZERO_SYSTEM},
        {"role": "user", "content": p.question},
        {"role": "assistant", "content": assistant},
    ]})
}

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
/// and return them as SFT conversations. Work is split over `threads`; sample j of problem i is
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
    threads: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> anyhow::Result<(Vec<Value>, TraceStats)> {
    let no_stop: Vec<String> = vec![];
    let parts: Vec<anyhow::Result<Vec<(usize, Vec<String>)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = split_ranges(problems.len(), threads)
            .into_iter()
            .map(|range| {
                let no_stop = &no_stop;
                scope.spawn(move || {
                    let mut out = Vec::new();
                    for i in range {
                        let p = &problems[i];
                        let prompt = prompt_ids(tok, p)?;
                        let prefilled = tok.decode(&prompt, false)?.trim_end().ends_with("<think>");
                        let mut kept = Vec::new();
                        for j in 0..k.max(1) {
                            let params = SamplingParams {
                                temperature: if j == 0 { 0.0 } else { temperature },
                                seed: crate::data::mix(
                                    seed ^ crate::data::mix((i * 1009 + j) as u64),
                                ),
                                ..SamplingParams::default()
                            };
                            let o = GenerateOptions {
                                params,
                                max_tokens,
                                stop: no_stop,
                                ignore_eos: false,
                                eos_ids: &tok.eos_ids,
                                draft_tokens: 0,
                            };
                            let g = generate(teacher, Some(tok), &prompt, &o, &mut |_| {})?;
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
                        progress(1);
                        out.push((i, kept));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("trace worker panicked"))
            .collect()
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
                lines.push(conversation(&problems[i], &t));
            }
        }
    }
    Ok((lines, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewards::{Accuracy, Format, Reward};
    use crate::tasks::{arithmetic, Split};

    #[test]
    fn reference_answers_earn_full_reward() {
        for p in arithmetic(50, 3, Split::Train) {
            let worked = reference_answer(&p, Style::Worked).unwrap();
            assert_eq!(Accuracy.score(&p, &worked), 1.0, "{worked}");
            assert_eq!(Format.score(&p, &worked), 1.0, "{worked}");
            let raw = reference_answer(&p, Style::Answer).unwrap();
            assert_eq!(Accuracy.score(&p, &raw), 1.0);
            assert_eq!(Format.score(&p, &raw), 1.0);
            assert!(!raw.contains(" = "));
        }
        let c = crate::tasks::countdown(1, 1, Split::Train);
        assert!(reference_answer(&c[0], Style::Worked).is_err());
    }
}
