//! `fathom eval`: accuracy, format-reward rate and pass@k of a model on freshly generated held-out
//! problems, through the inference engine (latent cache, the model's chat template).
//!
//! Prompts are the R1-Zero instruction as the system message and the question as the user
//! message; R1's template pre-fills `<think>\n`, so completions are scored with that prefix
//! (the format reward accepts a completion that starts inside the think block).

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
    Arithmetic,
    Countdown,
    /// `{"prompt", "answer"}` lines; all of the file is held out.
    File(PathBuf),
}

impl TaskSource {
    pub fn parse(s: &str) -> Self {
        match s {
            "arithmetic" => TaskSource::Arithmetic,
            "countdown" => TaskSource::Countdown,
            path => TaskSource::File(PathBuf::from(path)),
        }
    }

    /// `n` problems of `split` for `seed` (a file yields its first `n` tasks whatever the split).
    pub fn problems(&self, n: usize, seed: u64, split: Split) -> Result<Vec<Problem>, String> {
        Ok(match self {
            TaskSource::Arithmetic => tasks::arithmetic(n, seed, split),
            TaskSource::Countdown => tasks::countdown(n, seed, split),
            TaskSource::File(p) => {
                let mut all = tasks::load_jsonl(p)?;
                all.truncate(n);
                all
            }
        })
    }
}

/// The prompt ids for a problem: chat template with the R1-Zero system prompt, generation prompt.
pub fn prompt_ids(tok: &TextTokenizer, problem: &Problem) -> fathom_core::Result<Vec<u32>> {
    let msgs = json!([
        {"role": "system", "content": R1_ZERO_SYSTEM},
        {"role": "user", "content": problem.question},
    ]);
    Ok(tok.apply_chat_template(&msgs, None, true)?.1)
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub max_tokens: usize,
    /// Samples per problem for pass@k (k = 1: greedy only).
    pub k: usize,
    pub temperature: f64,
    pub seed: u64,
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

/// Evaluate `model` on `problems`. `progress(done, total)` after each problem.
pub fn evaluate(
    model: &CausalLm,
    tok: &TextTokenizer,
    problems: &[Problem],
    opts: &EvalOptions,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<EvalReport> {
    let t0 = std::time::Instant::now();
    let (mut correct, mut formatted, mut passed, mut tokens) = (0usize, 0usize, 0usize, 0usize);
    let mut examples = Vec::new();
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
    for (i, p) in problems.iter().enumerate() {
        let prompt = prompt_ids(tok, p)?;
        let g = run(&prompt, SamplingParams::default())?;
        tokens += g.token_ids.len();
        let ok = Accuracy.score(p, &g.text) > 0.0;
        correct += ok as usize;
        formatted += (Format.score(p, &g.text) > 0.0) as usize;
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
        passed += any as usize;
        if examples.len() < 3 {
            examples.push((p.question.clone(), g.text.clone(), ok));
        }
        progress(i + 1, problems.len());
    }
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
