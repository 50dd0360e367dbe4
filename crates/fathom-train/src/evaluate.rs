//! `fathom eval`: accuracy, format-reward rate and pass@k of a model on freshly generated held-out
//! problems, through the inference engine (latent cache, the model's chat template).
//!
//! Prompts are the question as the user message, with an optional system prompt ([`system_prompt`]:
//! none by default, or R1-Zero's instruction); R1's template pre-fills `<think>\n`, so
//! completions are scored with that prefix (the format reward accepts a completion that starts
//! inside the think block).

use crate::rewards::{Accuracy, Format, Reward};
use crate::tasks::{self, Problem, Split};
use fathom_core::TextTokenizer;
use fathom_engine::{generate, GenerateOptions, SamplingParams};
use fathom_model::CausalLm;
use serde_json::json;
use std::path::PathBuf;

/// DeepSeek-R1-Zero's instruction (R1 paper, Table 1), as the system prompt.
pub const R1_ZERO_SYSTEM: &str = "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.";

/// Where evaluation problems come from.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskSource {
    /// Operands of at most this many digits (`arithmetic` = 4, `arithmetic:N`).
    Arithmetic(u32),
    Countdown,
    /// `{"prompt", "answer"}` lines; all of the file is held out.
    File(PathBuf),
}

impl TaskSource {
    pub fn parse(s: &str) -> Self {
        if let Some(d) = s
            .strip_prefix("arithmetic:")
            .and_then(|d| d.parse::<u32>().ok())
            .filter(|d| (2..=9).contains(d))
        {
            return TaskSource::Arithmetic(d);
        }
        match s {
            "arithmetic" => TaskSource::Arithmetic(4),
            "countdown" => TaskSource::Countdown,
            path => TaskSource::File(PathBuf::from(path)),
        }
    }

    /// `n` problems of `split` for `seed` (a file yields its first `n` tasks whatever the split).
    pub fn problems(&self, n: usize, seed: u64, split: Split) -> Result<Vec<Problem>, String> {
        Ok(match self {
            TaskSource::Arithmetic(d) => tasks::arithmetic_digits(n, seed, split, *d),
            TaskSource::Countdown => tasks::countdown(n, seed, split),
            TaskSource::File(p) => {
                let mut all = tasks::load_jsonl(p)?;
                all.truncate(n);
                all
            }
        })
    }
}

/// The system prompt a `--system` argument names: `none` (the default: DeepSeek recommends no
/// system prompt for R1, its template carries the format), `r1-zero` (R1-Zero's instruction,
/// [`R1_ZERO_SYSTEM`]), or the text itself.
pub fn system_prompt(arg: &str) -> Option<String> {
    match arg {
        "" | "none" => None,
        "r1-zero" => Some(R1_ZERO_SYSTEM.to_string()),
        text => Some(text.to_string()),
    }
}

/// The conversation asking `problem`: the optional system prompt, then the question as the user.
pub fn question_messages(problem: &Problem, system: Option<&str>) -> serde_json::Value {
    let mut msgs = vec![];
    if let Some(s) = system {
        msgs.push(json!({"role": "system", "content": s}));
    }
    msgs.push(json!({"role": "user", "content": problem.question}));
    serde_json::Value::Array(msgs)
}

/// The prompt ids for a problem: the chat template over [`question_messages`] with the generation
/// prompt (R1's template pre-fills `<think>\n`).
pub fn prompt_ids(
    tok: &TextTokenizer,
    problem: &Problem,
    system: Option<&str>,
) -> fathom_core::Result<Vec<u32>> {
    Ok(tok
        .apply_chat_template(&question_messages(problem, system), None, true)?
        .1)
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub max_tokens: usize,
    /// Samples per problem for pass@k (k = 1: greedy only).
    pub k: usize,
    pub temperature: f64,
    pub seed: u64,
    /// System prompt of every question (None: none).
    pub system: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub n: usize,
    /// Greedy accuracy.
    pub accuracy: f64,
    /// Fraction of greedy completions that follow the `<think>…</think><answer>…</answer>` format.
    pub format_rate: f64,
    pub k: usize,
    /// Fraction of problems solved by at least one of k samples at `temperature` (= greedy
    /// accuracy when k = 1).
    pub pass_at_k: f64,
    pub mean_completion_tokens: f64,
    pub seconds: f64,
    /// The first few (question, completion, correct) for a look.
    pub examples: Vec<(String, String, bool)>,
}

/// What one problem's evaluation found.
struct ProblemResult {
    tokens: usize,
    correct: bool,
    formatted: bool,
    passed: bool,
    text: String,
}

/// Evaluate `model` on `problems`, split over `threads` workers (each problem's samples are
/// seeded by its index, so the report does not depend on the split). `progress(1)` after each
/// problem.
pub fn evaluate(
    model: &CausalLm,
    tok: &TextTokenizer,
    problems: &[Problem],
    opts: &EvalOptions,
    threads: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> anyhow::Result<EvalReport> {
    let t0 = std::time::Instant::now();
    let no_stop: Vec<String> = vec![];
    let run = |prompt: &[u32], params: SamplingParams| {
        let o = GenerateOptions {
            params,
            max_tokens: opts.max_tokens,
            stop: &no_stop,
            ignore_eos: false,
            eos_ids: &tok.eos_ids,
            draft_tokens: 0,
        };
        generate(model, Some(tok), prompt, &o, &mut |_| {})
    };
    let one = |i: usize, p: &Problem| -> anyhow::Result<ProblemResult> {
        let prompt = prompt_ids(tok, p, opts.system.as_deref())?;
        let g = run(&prompt, SamplingParams::default())?;
        let ok = Accuracy.score(p, &g.text) > 0.0;
        // pass@k: k samples at the sampling temperature, any correct (greedy when k = 1); stops at
        // the first correct sample.
        let mut any = opts.k <= 1 && ok;
        let samples = if opts.k > 1 { opts.k } else { 0 };
        for s in 0..samples {
            if any {
                break;
            }
            let params = SamplingParams {
                temperature: opts.temperature,
                seed: opts
                    .seed
                    .wrapping_mul(1_000_003)
                    .wrapping_add((i * opts.k + s) as u64),
                ..SamplingParams::default()
            };
            any = Accuracy.score(p, &run(&prompt, params)?.text) > 0.0;
        }
        progress(1);
        Ok(ProblemResult {
            tokens: g.token_ids.len(),
            correct: ok,
            formatted: Format.score(p, &g.text) > 0.0,
            passed: any,
            text: g.text,
        })
    };
    let parts: Vec<anyhow::Result<Vec<ProblemResult>>> =
        crate::posttrain::on_ranges(problems.len(), threads, |range| {
            range.map(|i| one(i, &problems[i])).collect()
        });
    let mut results = Vec::with_capacity(problems.len());
    for part in parts {
        results.extend(part?);
    }
    let count = |f: &dyn Fn(&ProblemResult) -> bool| results.iter().filter(|r| f(r)).count();
    let (correct, formatted, passed) = (
        count(&|r| r.correct),
        count(&|r| r.formatted),
        count(&|r| r.passed),
    );
    let tokens: usize = results.iter().map(|r| r.tokens).sum();
    let examples = problems
        .iter()
        .zip(&results)
        .take(3)
        .map(|(p, r)| (p.question.clone(), r.text.clone(), r.correct))
        .collect();
    let n = problems.len().max(1) as f64;
    Ok(EvalReport {
        n: problems.len(),
        accuracy: correct as f64 / n,
        format_rate: formatted as f64 / n,
        k: opts.k.max(1),
        pass_at_k: passed as f64 / n,
        mean_completion_tokens: tokens as f64 / n,
        seconds: t0.elapsed().as_secs_f64(),
        examples,
    })
}
