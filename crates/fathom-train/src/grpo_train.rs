//! `fathom grpo`: the GRPO loop (DeepSeekMath §4.1.2, R1 §2.2) on a task with rule-based rewards.
//!
//! One step: draw `prompts_per_step` training problems for (seed, step); sample `group_size`
//! completions of each through the inference engine (latent KV cache, optional MTP speculation)
//! from a plain snapshot of the current weights; score them (accuracy + w·format); group-normalise
//! the rewards into advantages ([`crate::grpo::group_advantages`]), optionally dropping groups
//! whose rewards are all equal; then `inner_iterations` (μ) AdamW steps on the clipped objective
//! with k3 KL to the frozen reference ([`crate::grpo::grpo_loss`]). With μ = 1 the sampling
//! policy is the policy itself, so π_old = π_θ detached (ratio 1); with μ > 1 π_old's
//! log-probabilities are computed once from the snapshot before the inner steps. β = 0 loads no
//! reference model.
//!
//! Every rollout is a function of (seed, step, problem, sample) and the weights, so a run is
//! deterministic for a seed and `--resume` continues it exactly. MoE balancing biases stay as the
//! starting model left them and the MTP modules are not trained (their drafts stay lossless: a
//! drifting drafter only lowers acceptance).

use crate::error::{Result, TrainError};
use crate::evaluate::{evaluate, prompt_ids, EvalOptions, EvalReport, TaskSource};
use crate::grpo::{
    group_advantages, grpo_loss, informative_groups, token_logprobs_at, GrpoLossConfig,
};
use crate::posttrain::{
    on_ranges, parallel_gradients, snapshot, split_ranges, worker_threads, Run, RunOptions,
};
use crate::rewards::{Equations, RewardSet};
use crate::tasks::{Problem, Split};
use candle_core::{DType, Device, Tensor};
use fathom_core::TextTokenizer;
use fathom_engine::{generate_batch, FinishReason, Request, SamplingParams, SchedulerConfig};
use fathom_model::CausalLm;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GrpoConfig {
    pub model: PathBuf,
    /// arithmetic (operands up to 4 digits; arithmetic:N for up to N), countdown, or a JSONL file
    /// of {"prompt", "answer"} lines.
    pub task: String,
    pub prompts_per_step: usize,
    /// G: completions per prompt.
    pub group_size: usize,
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// KL weight; 0 drops the reference model.
    pub beta: f64,
    /// Normalise the loss over all completion tokens of the batch (DAPO) instead of per sequence.
    pub token_level: bool,
    /// Divide advantages by the group's std (GRPO); false centres only (Dr. GRPO).
    pub scale_by_std: bool,
    /// Skip groups whose rewards are all equal (no signal).
    pub drop_uniform_groups: bool,
    /// μ: optimizer steps per batch of rollouts.
    pub inner_iterations: usize,
    pub format_weight: f64,
    /// Weight of the reasoning-steps reward (`rewards::Equations`; 0 = R1's two rewards only).
    #[serde(default)]
    pub equations_weight: f64,
    pub seed: u64,
    /// Held-out evaluation every this many steps (0 = only at the start and end).
    pub eval_every: usize,
    pub eval_problems: usize,
    /// pass@k of the held-out evaluation (1 = greedy only).
    pub eval_k: usize,
    pub save_every: usize,
    pub log_every: usize,
    /// MTP speculative decoding in rollouts (drafts per step; 0 = off).
    pub draft_tokens: usize,
    /// System prompt of every question (None: none; see `evaluate::system_prompt`).
    pub system: Option<String>,
}

impl GrpoConfig {
    pub fn loss(&self) -> GrpoLossConfig {
        GrpoLossConfig {
            epsilon_low: self.epsilon_low,
            epsilon_high: self.epsilon_high,
            beta: self.beta,
            token_level: self.token_level,
        }
    }
}

pub struct GrpoOptions {
    pub config: GrpoConfig,
    pub run: RunOptions,
}

#[derive(Debug, Clone)]
pub struct GrpoSummary {
    pub steps: usize,
    pub final_dir: Option<PathBuf>,
    /// Held-out evaluations: (step, report).
    pub evals: Vec<(usize, EvalReport)>,
}

pub const GRPO_PANELS: &[(&str, &[&str])] = &[
    (
        "reward (train rollouts)",
        &["reward", "accuracy", "format", "equations"],
    ),
    (
        "held-out accuracy (greedy) and pass@k",
        &["eval_accuracy", "eval_pass_at_k", "eval_format"],
    ),
    (
        "KL to the reference and clip fraction",
        &["kl", "clip_fraction"],
    ),
    ("completion length (tokens)", &["completion_tokens"]),
];

/// One sampled completion and its scores.
#[derive(Debug, Clone)]
pub struct Rollout {
    pub problem: usize,
    /// Completion ids, with the eos that ended it (the policy learns to stop).
    pub ids: Vec<u32>,
    pub reward: f64,
    pub parts: Vec<(String, f64)>,
}

/// Training problems of a step: a function of (seed, step).
pub fn step_problems(
    source: &TaskSource,
    pool: &[Problem],
    n: usize,
    seed: u64,
    step: usize,
) -> Vec<Problem> {
    let s = crate::data::mix(seed ^ crate::data::mix(step as u64 + 1));
    match source {
        TaskSource::File(_) => {
            let mut rng = StdRng::seed_from_u64(s);
            (0..n)
                .map(|_| pool[rng.random_range(0..pool.len())].clone())
                .collect()
        }
        other => other.problems(n, s, Split::Train).unwrap_or_default(),
    }
}

/// The sampling seed of rollout `j` of problem `i` in rollout batch `step`.
fn rollout_seed(seed: u64, step: usize, i: usize, j: usize) -> u64 {
    crate::data::mix(seed ^ crate::data::mix(((step * 7919 + i) * 131 + j) as u64))
}

/// Sample `group` completions of each prompt: the jobs are split over `threads` workers and each
/// worker decodes its share as one continuous batch ([`generate_batch`]). Sample j of problem i
/// is seeded by (seed, step, i, j); the batches depend on the split only through floating-point
/// rounding, so a run is reproducible for a given thread count.
#[allow(clippy::too_many_arguments)]
pub fn rollouts(
    model: &CausalLm,
    tok: &TextTokenizer,
    prompts: &[Vec<u32>],
    group: usize,
    cfg: &GrpoConfig,
    step: usize,
    threads: usize,
) -> anyhow::Result<Vec<(usize, Vec<u32>, String)>> {
    let jobs: Vec<(usize, usize)> = (0..prompts.len())
        .flat_map(|i| (0..group).map(move |j| (i, j)))
        .collect();
    let results: Vec<anyhow::Result<Vec<(usize, Vec<u32>, String)>>> =
        on_ranges(jobs.len(), threads, |range| {
            let jobs = &jobs[range];
            let requests: Vec<Request> = jobs
                .iter()
                .map(|&(i, j)| {
                    let params = SamplingParams {
                        temperature: cfg.temperature,
                        top_p: cfg.top_p,
                        seed: rollout_seed(cfg.seed, step, i, j),
                        ..SamplingParams::default()
                    };
                    Request::until_eos(prompts[i].clone(), params, cfg.max_tokens, &tok.eos_ids)
                })
                .collect();
            // The worker's whole share decodes as one continuous batch: every step is one packed
            // forward over all its unfinished sequences, all prompts prefilled in the first.
            let batch = SchedulerConfig::whole_batch(&requests, cfg.draft_tokens);
            let outputs = generate_batch(model, Some(tok), batch, requests)?;
            Ok(jobs
                .iter()
                .zip(outputs)
                .map(|(&(i, _), g)| {
                    let mut ids = g.token_ids;
                    if g.finish == FinishReason::Eos {
                        ids.push(tok.eos_ids[0]);
                    }
                    (i, ids, g.text)
                })
                .collect())
        });
    let mut all = Vec::with_capacity(jobs.len());
    for r in results {
        all.extend(r?);
    }
    Ok(all)
}

/// A training row: prompt + completion, with the completion's advantage.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
    pub advantage: f64,
}

/// [n, W] ids, [n, W−1] mask over completion targets (target t = ids[t+1]), [n] advantages.
pub fn sequence_tensors(
    seqs: &[Sequence],
    pad: u32,
    device: &Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let width = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(2).max(2);
    let (mut ids, mut mask) = (vec![], vec![]);
    for s in seqs {
        ids.extend(&s.ids);
        ids.extend(std::iter::repeat_n(pad, width - s.ids.len()));
        for t in 0..width - 1 {
            let target = t + 1;
            mask.push((target >= s.prompt_len && target < s.ids.len()) as u8 as f32);
        }
    }
    let adv: Vec<f32> = seqs.iter().map(|s| s.advantage as f32).collect();
    Ok((
        Tensor::from_vec(ids, (seqs.len(), width), device)?,
        Tensor::from_vec(mask, (seqs.len(), width - 1), device)?,
        Tensor::from_vec(adv, seqs.len(), device)?,
    ))
}

/// Log-probabilities of the sampled tokens under a frozen model (reference or π_old), [n, W−1],
/// computed in parallel shards.
fn frozen_logprobs(
    model: &CausalLm,
    seqs: &[Sequence],
    pad: u32,
    temperature: f64,
    threads: usize,
) -> Result<Vec<Tensor>> {
    // Shards split as the training step splits them (`split_ranges`), so shard k lines up.
    let outs: Vec<Result<Tensor>> = on_ranges(seqs.len(), threads, |range| {
        let (ids, _, _) = sequence_tensors(&seqs[range], pad, &model.device)?;
        Ok(token_logprobs_at(model, &ids, temperature)?.detach())
    });
    outs.into_iter().collect()
}

struct ShardStats {
    loss: f64,
    kl: f64,
    clip_fraction: f64,
    tokens: f64,
}

pub fn run_grpo(opts: GrpoOptions) -> anyhow::Result<GrpoSummary> {
    let (mut run, _) =
        Run::<GrpoConfig>::open::<()>(&opts.config.model, opts.config.clone(), &opts.run)?;
    let cfg = run.config.clone();
    let loss_cfg = cfg.loss();
    let tok = TextTokenizer::from_dir(&run.dir.join("tokenizer"))?;
    let pad = *tok
        .eos_ids
        .first()
        .ok_or_else(|| anyhow::anyhow!("the tokenizer has no end-of-sequence token"))?;
    let source = TaskSource::parse(&cfg.task);
    // A file's tasks split by the same question hash as the generators: 1 in 8 held out (all of
    // them train when the file is too small to spare any).
    let (pool, held_out) = match &source {
        TaskSource::File(_) => {
            let all = source
                .problems(usize::MAX, cfg.seed, Split::Train)
                .map_err(|e| anyhow::anyhow!(e))?;
            let (held, train): (Vec<Problem>, Vec<Problem>) = all
                .iter()
                .cloned()
                .partition(|p| crate::tasks::split_of(&p.question) == Split::HeldOut);
            let mut held = if train.is_empty() { vec![] } else { held };
            held.truncate(cfg.eval_problems);
            (if train.is_empty() { all } else { train }, held)
        }
        _ => (
            vec![],
            source
                .problems(cfg.eval_problems, cfg.seed ^ 0xE7A1, Split::HeldOut)
                .map_err(|e| anyhow::anyhow!(e))?,
        ),
    };
    let reference = if cfg.beta != 0.0 {
        Some(CausalLm::load(&cfg.model, DType::F32, &Device::Cpu)?)
    } else {
        None
    };
    let mut rewards = RewardSet::r1(cfg.format_weight);
    if cfg.equations_weight > 0.0 {
        rewards = rewards.with(Box::new(Equations), cfg.equations_weight);
    }
    let threads = worker_threads(opts.run.threads);
    let eval_opts = EvalOptions {
        max_tokens: cfg.max_tokens,
        k: cfg.eval_k,
        temperature: cfg.temperature,
        seed: cfg.seed,
        system: cfg.system.clone(),
    };
    let mut evals = Vec::new();
    // A plain copy of the current weights, built once per weight update and shared by the
    // held-out evaluation and the next batch's rollouts.
    let mut fresh_policy: Option<CausalLm> = None;
    let eval_now = |m: &CausalLm| -> anyhow::Result<EvalReport> {
        evaluate(m, &tok, &held_out, &eval_opts, threads, &|_| {})
    };
    if run.step == 0 && !held_out.is_empty() {
        let m = fresh_policy.insert(snapshot(&run.tm)?);
        let r = eval_now(m)?;
        run.say(&format!(
            "held-out before GRPO: accuracy {:.3}, format {:.3}, pass@{} {:.3}",
            r.accuracy, r.format_rate, r.k, r.pass_at_k
        ));
        // Step 0 of the metrics: where the policy starts.
        let rec = serde_json::json!({
            "eval_accuracy": r.accuracy,
            "eval_format": r.format_rate,
            "eval_pass_at_k": r.pass_at_k,
        });
        run.log(rec, "", usize::MAX)?;
        evals.push((0, r));
    }
    let mu = cfg.inner_iterations.max(1);
    let mut batches_run = 0;
    while !run.done() {
        if opts.run.stop_after.is_some_and(|n| batches_run >= n) {
            break;
        }
        let batch_step = run.step / mu;
        // Rollouts from the current policy.
        let t0 = Instant::now();
        let problems = step_problems(&source, &pool, cfg.prompts_per_step, cfg.seed, batch_step);
        let prompts: Vec<Vec<u32>> = problems
            .iter()
            .map(|p| prompt_ids(&tok, p, cfg.system.as_deref()))
            .collect::<fathom_core::Result<_>>()?;
        let policy = match fresh_policy.take() {
            Some(m) => m,
            None => snapshot(&run.tm)?,
        };
        let samples = rollouts(
            &policy,
            &tok,
            &prompts,
            cfg.group_size,
            &cfg,
            batch_step,
            threads,
        )?;
        let rollout_secs = t0.elapsed().as_secs_f64();
        let scored: Vec<Rollout> = samples
            .into_iter()
            .map(|(i, ids, text)| {
                let s = rewards.score(&problems[i], &text);
                Rollout {
                    problem: i,
                    ids,
                    reward: s.total,
                    parts: s.parts,
                }
            })
            .collect();
        let totals: Vec<f64> = scored.iter().map(|r| r.reward).collect();
        let adv = group_advantages(&totals, cfg.group_size, cfg.scale_by_std);
        let keep: Vec<usize> = if cfg.drop_uniform_groups {
            informative_groups(&totals, cfg.group_size)
        } else {
            (0..problems.len()).collect()
        };
        let seqs: Vec<Sequence> = keep
            .iter()
            .flat_map(|&g| g * cfg.group_size..(g + 1) * cfg.group_size)
            .map(|k| {
                let r = &scored[k];
                let mut ids = prompts[r.problem].clone();
                ids.extend(&r.ids);
                Sequence {
                    ids,
                    prompt_len: prompts[r.problem].len(),
                    advantage: adv[k],
                }
            })
            .filter(|s| s.ids.len() > s.prompt_len)
            .collect();
        let n = scored.len().max(1) as f64;
        let mean_part = |name: &str| {
            scored
                .iter()
                .map(|r| r.parts.iter().find(|p| p.0 == name).map_or(0.0, |p| p.1))
                .sum::<f64>()
                / n
        };
        let completion_tokens = scored.iter().map(|r| r.ids.len()).sum::<usize>() as f64 / n;
        let t1 = Instant::now();
        // The frozen terms, once per batch.
        let ranges = split_ranges(seqs.len(), threads);
        let ref_lp = match &reference {
            Some(r) if !seqs.is_empty() => {
                Some(frozen_logprobs(r, &seqs, pad, cfg.temperature, threads)?)
            }
            _ => None,
        };
        let old_lp = if mu > 1 && !seqs.is_empty() {
            Some(frozen_logprobs(
                &policy,
                &seqs,
                pad,
                cfg.temperature,
                threads,
            )?)
        } else {
            None
        };
        let total_rows = seqs.len().max(1) as f64;
        let total_tokens: f64 = seqs
            .iter()
            .map(|s| (s.ids.len() - s.prompt_len) as f64)
            .sum::<f64>()
            .max(1.0);
        for _ in 0..mu {
            if run.done() {
                break;
            }
            let (mut loss, mut kl, mut clip, mut grad_norm, mut lr) =
                (0.0, 0.0, 0.0, 0.0, run.lr());
            if !seqs.is_empty() {
                let items: Vec<usize> = (0..ranges.len()).collect();
                let (grads, stats) = parallel_gradients(&run.tm, items, |tm, k| {
                    let part = &seqs[ranges[k].clone()];
                    let (ids, mask, a) = sequence_tensors(part, pad, &tm.model.device)?;
                    let logp = token_logprobs_at(&tm.model, &ids, cfg.temperature)?;
                    let old = match &old_lp {
                        Some(o) => o[k].clone(),
                        None => logp.detach(),
                    };
                    let reference = ref_lp.as_ref().map(|r| &r[k]);
                    let (l, s) = grpo_loss(&logp, &old, reference, &a, &mask, &loss_cfg)?;
                    let tokens: f64 = part
                        .iter()
                        .map(|s| (s.ids.len() - s.prompt_len) as f64)
                        .sum();
                    let w = if loss_cfg.token_level {
                        tokens / total_tokens
                    } else {
                        part.len() as f64 / total_rows
                    };
                    let value = l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    Ok((
                        (l * w)?,
                        ShardStats {
                            loss: value * w,
                            kl: s.kl,
                            clip_fraction: s.clip_fraction,
                            tokens,
                        },
                    ))
                })?;
                loss = stats.iter().map(|s| s.loss).sum();
                if !loss.is_finite() {
                    return Err(TrainError::NonFinite {
                        step: run.step + 1,
                        value: loss,
                        last_good: None,
                    }
                    .into());
                }
                kl = stats.iter().map(|s| s.kl * s.tokens).sum::<f64>() / total_tokens;
                clip = stats
                    .iter()
                    .map(|s| s.clip_fraction * s.tokens)
                    .sum::<f64>()
                    / total_tokens;
                (grad_norm, lr) = run.apply(grads)?;
            }
            run.step += 1;
            let mut rec = serde_json::json!({
                "loss": loss,
                "reward": totals.iter().sum::<f64>() / n,
                "accuracy": mean_part("accuracy"),
                "format": mean_part("format"),
                "kl": kl,
                "clip_fraction": clip,
                "completion_tokens": completion_tokens,
                "groups_kept": keep.len() as f64 / problems.len().max(1) as f64,
                "rollout_s": rollout_secs,
                "train_s": t1.elapsed().as_secs_f64(),
                "lr_x1000": lr * 1000.0,
                "grad_norm": grad_norm,
            });
            if cfg.equations_weight > 0.0 {
                rec["equations"] = mean_part("equations").into();
            }
            let done = run.step % mu == 0 || run.done();
            let batch_no = run.step.div_ceil(mu);
            let eval_due = done && cfg.eval_every > 0 && batch_no % cfg.eval_every == 0;
            if (eval_due || run.done()) && !held_out.is_empty() {
                let m = fresh_policy.insert(snapshot(&run.tm)?);
                let r = eval_now(m)?;
                rec["eval_accuracy"] = r.accuracy.into();
                rec["eval_format"] = r.format_rate.into();
                rec["eval_pass_at_k"] = r.pass_at_k.into();
                evals.push((run.step, r));
            }
            let msg = format!(
                "reward {:.3} acc {:.3} fmt {:.3} kl {:.4} len {:.1}{}",
                rec["reward"].as_f64().unwrap_or(0.0),
                rec["accuracy"].as_f64().unwrap_or(0.0),
                rec["format"].as_f64().unwrap_or(0.0),
                kl,
                completion_tokens,
                evals
                    .last()
                    .map(|(s, r)| format!(" held-out@{s} {:.3}", r.accuracy))
                    .unwrap_or_default()
            );
            run.log(rec, &msg, cfg.log_every)?;
            // Checkpoints only between rollout batches, where π_old is the saved policy.
            if done && (batch_no % cfg.save_every.max(1) == 0 || run.done()) {
                run.save(&(), GRPO_PANELS)?;
            }
        }
        batches_run += 1;
    }
    let final_dir = if run.done() {
        Some(run.finish(GRPO_PANELS)?)
    } else {
        None
    };
    Ok(GrpoSummary {
        steps: run.step,
        final_dir,
        evals,
    })
}
