//! Post-training subcommands: `tasks` (SFT data from the task generators), `sft`, `grpo`,
//! `distill`.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use fathom_train::evaluate::{system_prompt, TaskSource};
use fathom_train::grpo_train::{run_grpo, GrpoConfig, GrpoOptions};
use fathom_train::posttrain::{worker_threads, OptimConfig, RunOptions};
use fathom_train::rewards::{Reasoned, RewardSet};
use fathom_train::sft::{run_sft, SftConfig, SftObjective, SftOptions, SftSummary};
use fathom_train::tasks::Split;
use fathom_train::traces::{conversation, reference_answer, teacher_traces, Style};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What every post-training run takes.
#[derive(Args, Clone)]
pub struct RunArgs {
    /// Run directory (checkpoints, metrics.jsonl, metrics.png, final/).
    #[arg(long)]
    out: PathBuf,
    /// Optimizer steps in all (with --resume: raised to continue a finished run).
    #[arg(long)]
    steps: Option<usize>,
    /// Peak learning rate (linear warm-up, cosine to lr/10).
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, default_value_t = 10)]
    warmup_steps: usize,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue the run in --out from its newest checkpoint (its saved options apply).
    #[arg(long)]
    resume: bool,
    /// Stop after N steps of this invocation (GRPO: N rollout batches), leaving a checkpoint.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Worker threads (data-parallel shards, parallel rollouts); 0 = all cores.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Step checkpoints to keep (the newest).
    #[arg(long, default_value_t = 2)]
    keep_checkpoints: usize,
    /// Print a JSON summary on stdout at the end.
    #[arg(long)]
    json: bool,
}

impl RunArgs {
    fn optim(&self, default_lr: f64) -> OptimConfig {
        OptimConfig {
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
            ..OptimConfig::fine_tune(self.lr.unwrap_or(default_lr))
        }
    }

    fn options(&self, optim: OptimConfig, default_steps: usize) -> RunOptions {
        RunOptions {
            optim,
            max_steps: self.steps.unwrap_or(default_steps),
            out: self.out.clone(),
            resume: self.resume,
            quiet: false,
            stop_after: self.stop_after,
            threads: self.threads,
            keep_checkpoints: self.keep_checkpoints,
            mtp_depth: None,
        }
    }
}

/// Run the SFT loop (for `sft` and `distill`) and print its summary.
fn sft_and_report(config: SftConfig, r: &RunArgs, mtp_depth: Option<usize>) -> Result<()> {
    let s = run_sft(SftOptions {
        config,
        run: RunOptions {
            mtp_depth,
            ..r.options(r.optim(1e-3), 300)
        },
    })?;
    print_sft_summary(&s, &r.out, r.json);
    Ok(())
}

/// The SFT loop's own options (shared by `sft` and `distill`).
#[derive(Args, Clone)]
pub struct SftLoopArgs {
    /// Tokens per row (an example longer than this + 1 is dropped).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Rows per step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// One example per row instead of packing several.
    #[arg(long)]
    no_packing: bool,
    /// Weight λ of the MTP loss on the same targets (keeps the drafter in step).
    #[arg(long, default_value_t = 0.3)]
    mtp_weight: f64,
    /// MTP modules to train (num_nextn_predict_layers), when not the checkpoint's: added modules
    /// start as copies of its last one (a module per draft position speculates further than one
    /// module reused); fewer drops the rest. A fresh run only.
    #[arg(long)]
    mtp_depth: Option<usize>,
    /// Fraction of examples held out for the validation loss.
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// Auxiliary-loss-free balancing speed γ for MoE layers (0 = off).
    #[arg(long, default_value_t = 0.001)]
    bias_update_speed: f64,
}

#[derive(Args)]
pub struct SftArgs {
    /// The model to fine-tune (HF directory).
    #[arg(long)]
    model: Option<PathBuf>,
    /// JSONL: {"messages": [...]} ending with the assistant turn, or {"prompt", "completion"}.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    sft: SftLoopArgs,
    #[command(flatten)]
    run: RunArgs,
}

fn sft_config(
    model: PathBuf,
    data: PathBuf,
    objective: SftObjective,
    a: &SftLoopArgs,
    seed: u64,
) -> SftConfig {
    SftConfig {
        model,
        data,
        objective,
        seq_len: a.seq_len,
        batch_size: a.batch_size,
        packing: !a.no_packing,
        seed,
        val_fraction: a.val_fraction,
        eval_every: a.eval_every,
        save_every: a.save_every,
        log_every: a.log_every,
        bias_update_speed: a.bias_update_speed,
    }
}

fn check_run_args(r: &RunArgs, loop_args: Option<&SftLoopArgs>) -> Result<()> {
    if r.steps == Some(0) {
        bail!("--steps must be at least 1");
    }
    if r.lr.is_some_and(|lr| !(lr > 0.0 && lr.is_finite())) {
        bail!("--lr must be a positive number");
    }
    if let Some(a) = loop_args {
        if a.seq_len < 8 || a.batch_size == 0 {
            bail!("--seq-len must be at least 8 and --batch-size at least 1");
        }
        if !(0.0..1.0).contains(&a.val_fraction) {
            bail!("--val-fraction must be in [0, 1)");
        }
    }
    Ok(())
}

fn print_sft_summary(s: &SftSummary, out: &Path, json: bool) {
    if json {
        println!(
            "{}",
            json!({
                "steps": s.steps,
                "final_dir": s.final_dir,
                "train_examples": s.train_examples,
                "val_examples": s.val_examples,
                "loss": s.last_loss,
                "val_loss": s.last_val_loss,
            })
        );
    } else {
        eprintln!(
            "{} steps; loss {}; val loss {}; metrics {} and {}",
            s.steps,
            s.last_loss.map_or("-".into(), |v| format!("{v:.4}")),
            s.last_val_loss.map_or("-".into(), |v| format!("{v:.4}")),
            out.join("metrics.jsonl").display(),
            out.join("metrics.png").display()
        );
    }
}

impl SftArgs {
    pub fn model_arg(&self) -> Option<PathBuf> {
        self.model.clone()
    }
}

impl GrpoArgs {
    pub fn model_arg(&self) -> Option<PathBuf> {
        self.model.clone()
    }
}

pub fn cmd_sft(a: SftArgs, model: PathBuf) -> Result<()> {
    check_run_args(&a.run, Some(&a.sft))?;
    let objective = SftObjective::CrossEntropy {
        mtp_weight: a.sft.mtp_weight,
    };
    let config = sft_config(model, a.data.clone(), objective, &a.sft, a.run.seed);
    sft_and_report(config, &a.run, a.sft.mtp_depth)
}

#[derive(Args)]
pub struct GrpoArgs {
    /// The policy to start from (and the frozen reference when --beta > 0).
    #[arg(long)]
    model: Option<PathBuf>,
    /// arithmetic (operands up to 4 digits; arithmetic:N for up to N), countdown, or a JSONL file
    /// of {"prompt", "answer"} lines.
    #[arg(long, default_value = "arithmetic")]
    task: String,
    /// Prompts per rollout batch.
    #[arg(long, default_value_t = 16)]
    prompts: usize,
    /// G: completions per prompt.
    #[arg(long, default_value_t = 8)]
    group_size: usize,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// ε: the ratio is clipped to [1 − ε, 1 + ε_high].
    #[arg(long, default_value_t = 0.2)]
    epsilon: f64,
    /// ε_high (DAPO clip-higher); default ε.
    #[arg(long)]
    epsilon_high: Option<f64>,
    /// β of the k3 KL to the reference; 0 loads no reference model.
    #[arg(long, default_value_t = 0.04)]
    beta: f64,
    /// Average the loss over all completion tokens of the batch (DAPO) instead of per sequence.
    #[arg(long)]
    token_level: bool,
    /// Centre advantages without dividing by the group std (Dr. GRPO).
    #[arg(long)]
    no_std_scale: bool,
    /// Drop groups whose rewards are all equal.
    #[arg(long)]
    drop_uniform_groups: bool,
    /// μ: optimizer steps per rollout batch.
    #[arg(long, default_value_t = 1)]
    mu: usize,
    /// Weight of the format reward (accuracy has weight 1).
    #[arg(long, default_value_t = 0.5)]
    format_weight: f64,
    /// Weight of a rule-based process reward: the share of `lhs = rhs` lines in the reasoning that
    /// are arithmetically true (0 = R1's accuracy and format rewards only).
    #[arg(long, default_value_t = 0.0)]
    equations_weight: f64,
    /// Held-out evaluation every N rollout batches (0: at the start and end only).
    #[arg(long, default_value_t = 10)]
    eval_every: usize,
    /// Held-out problems per evaluation.
    #[arg(long, default_value_t = 200)]
    eval_n: usize,
    /// pass@k of the held-out evaluation.
    #[arg(long, default_value_t = 4)]
    eval_k: usize,
    /// Checkpoint every N rollout batches.
    #[arg(long, default_value_t = 10)]
    save_every: usize,
    #[arg(long, default_value_t = 1)]
    log_every: usize,
    /// MTP speculative decoding in rollouts: drafts per step (0 = off). Default as `generate`:
    /// one per MTP module for models with dense main layers, off for MoE models.
    #[arg(long)]
    draft_tokens: Option<usize>,
    /// System prompt of every question: none, r1-zero or the text.
    #[arg(long, default_value = "none")]
    system: String,
    #[command(flatten)]
    run: RunArgs,
}

pub fn cmd_grpo(a: GrpoArgs, model: PathBuf) -> Result<()> {
    check_run_args(&a.run, None)?;
    if a.prompts == 0 || a.group_size < 2 {
        bail!(
            "--prompts must be at least 1 and --group-size at least 2 (advantages compare a group)"
        );
    }
    if a.mu == 0 || a.max_tokens == 0 {
        bail!("--mu and --max-tokens must be at least 1");
    }
    if !(a.epsilon > 0.0 && a.epsilon < 1.0) || a.epsilon_high.is_some_and(|e| e < a.epsilon) {
        bail!("--epsilon must be in (0, 1) and --epsilon-high at least --epsilon");
    }
    if a.beta < 0.0 || a.temperature <= 0.0 {
        bail!("--beta must be ≥ 0 and --temperature > 0 (rollouts must sample)");
    }
    if let TaskSource::File(p) = TaskSource::parse(&a.task) {
        if !p.is_file() {
            bail!(
                "--task {}: not arithmetic, countdown or a JSONL file",
                p.display()
            );
        }
    }
    let draft_tokens = match a.draft_tokens {
        Some(k) => k,
        None => {
            let cfg = fathom_core::ModelConfig::from_path(&model)?;
            fathom_engine::default_draft_tokens(&cfg, cfg.num_nextn_predict_layers)
        }
    };
    let config = GrpoConfig {
        model,
        task: a.task.clone(),
        prompts_per_step: a.prompts,
        group_size: a.group_size,
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        epsilon_low: a.epsilon,
        epsilon_high: a.epsilon_high.unwrap_or(a.epsilon),
        beta: a.beta,
        token_level: a.token_level,
        scale_by_std: !a.no_std_scale,
        drop_uniform_groups: a.drop_uniform_groups,
        inner_iterations: a.mu,
        format_weight: a.format_weight,
        equations_weight: a.equations_weight,
        seed: a.run.seed,
        eval_every: a.eval_every,
        eval_problems: a.eval_n,
        eval_k: a.eval_k,
        save_every: a.save_every,
        log_every: a.log_every,
        draft_tokens,
        system: system_prompt(&a.system),
    };
    let s = run_grpo(GrpoOptions {
        config,
        // GRPO keeps its lr constant after the warm-up (min_lr = lr), as TRL's default.
        run: a.run.options(
            OptimConfig {
                min_lr: a.run.lr.unwrap_or(1e-4),
                ..a.run.optim(1e-4)
            },
            100,
        ),
    })?;
    let evals: Vec<_> = s
        .evals
        .iter()
        .map(|(step, r)| {
            json!({"step": step, "accuracy": r.accuracy, "format_rate": r.format_rate,
                   "pass_at_k": r.pass_at_k, "k": r.k, "mean_completion_tokens": r.mean_completion_tokens})
        })
        .collect();
    if a.run.json {
        println!(
            "{}",
            json!({"steps": s.steps, "final_dir": s.final_dir, "evals": evals})
        );
    } else {
        for e in &evals {
            eprintln!(
                "held-out at step {}: accuracy {:.3}, format {:.3}, pass@{} {:.3}",
                e["step"],
                e["accuracy"].as_f64().unwrap_or(0.0),
                e["format_rate"].as_f64().unwrap_or(0.0),
                e["k"],
                e["pass_at_k"].as_f64().unwrap_or(0.0)
            );
        }
        eprintln!(
            "{} steps; metrics {} and {}",
            s.steps,
            a.run.out.join("metrics.jsonl").display(),
            a.run.out.join("metrics.png").display()
        );
    }
    Ok(())
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DistillMode {
    /// The teacher writes reasoning traces for task prompts, the reward filters them, the student
    /// is fine-tuned on them (R1's distillation; any architectures and tokenizers).
    Traces,
    /// The student matches the teacher's next-token distributions on the assistant tokens of
    /// --data (forward KL or generalised JSD; the tokenizers must match).
    Logits,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DistillLoss {
    Kl,
    Jsd,
}

#[derive(Args)]
pub struct DistillArgs {
    #[arg(long)]
    teacher: PathBuf,
    /// The student to train (HF directory; may be a different architecture, e.g. dense Qwen2).
    #[arg(long)]
    student: PathBuf,
    #[arg(long, value_enum, default_value = "traces")]
    mode: DistillMode,
    /// Traces: the task whose training problems the teacher answers.
    #[arg(long, default_value = "arithmetic")]
    task: String,
    /// Traces: training problems to answer.
    #[arg(long, default_value_t = 2000)]
    problems: usize,
    /// Traces: samples per problem (the first greedy, the rest at --temperature).
    #[arg(long, default_value_t = 2)]
    samples: usize,
    /// Traces: distinct accepted traces kept per problem.
    #[arg(long, default_value_t = 1)]
    keep: usize,
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Traces: minimum total reward (accuracy + 0.5·format) for a trace to be kept.
    #[arg(long, default_value_t = 1.5)]
    min_reward: f64,
    /// Traces: keep only traces whose `<think>` holds reasoning (adds the `reasoned` reward with
    /// weight 1 and raises --min-reward by 1): the student learns the teacher's reasoning, not its
    /// bare answers.
    #[arg(long)]
    require_reasoning: bool,
    /// Traces: system prompt of every question: none, r1-zero or the text.
    #[arg(long, default_value = "none")]
    system: String,
    /// Logits: SFT data whose assistant tokens the student learns (default: the traces the
    /// teacher writes for --task, as in traces mode).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "kl")]
    loss: DistillLoss,
    /// Temperature τ of the forward KL.
    #[arg(long, default_value_t = 1.0)]
    tau: f64,
    /// β of the generalised JSD.
    #[arg(long, default_value_t = 0.5)]
    jsd_beta: f64,
    #[command(flatten)]
    sft: SftLoopArgs,
    #[command(flatten)]
    run: RunArgs,
}

pub fn cmd_distill(a: DistillArgs) -> Result<()> {
    check_run_args(&a.run, Some(&a.sft))?;
    let traces_path = a.run.out.join("traces.jsonl");
    let need_traces = !a.run.resume && (a.mode == DistillMode::Traces || a.data.is_none());
    if need_traces {
        if a.run.out.join("checkpoints").exists() || a.run.out.join("final").exists() {
            bail!(
                "{}: already holds a run; pass --resume to continue it or choose another --out",
                a.run.out.display()
            );
        }
        write_teacher_traces(&a, &traces_path)?;
    }
    let data = match (&a.mode, &a.data) {
        (DistillMode::Logits, Some(d)) => d.clone(),
        _ => traces_path,
    };
    let objective = match (a.mode, a.loss) {
        (DistillMode::Traces, _) => SftObjective::CrossEntropy {
            mtp_weight: a.sft.mtp_weight,
        },
        (DistillMode::Logits, DistillLoss::Kl) => SftObjective::ForwardKl {
            teacher: a.teacher.clone(),
            tau: a.tau,
        },
        (DistillMode::Logits, DistillLoss::Jsd) => SftObjective::Jsd {
            teacher: a.teacher.clone(),
            beta: a.jsd_beta,
        },
    };
    let config = sft_config(a.student.clone(), data, objective, &a.sft, a.run.seed);
    sft_and_report(config, &a.run, a.sft.mtp_depth)
}

fn write_teacher_traces(a: &DistillArgs, path: &Path) -> Result<()> {
    let teacher = fathom_model::CausalLm::load(
        &a.teacher,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?;
    let tok = fathom_core::TextTokenizer::from_dir(&a.teacher)
        .with_context(|| format!("{}: the teacher needs a tokenizer", a.teacher.display()))?;
    let problems = TaskSource::parse(&a.task)
        .problems(a.problems, a.run.seed, Split::Train)
        .map_err(anyhow::Error::msg)?;
    let bar = indicatif::ProgressBar::new(problems.len() as u64);
    bar.set_message("teacher traces");
    let progress = |n: usize| bar.inc(n as u64);
    let (rewards, min_reward) = if a.require_reasoning {
        (
            RewardSet::r1(0.5).with(Box::new(Reasoned), 1.0),
            a.min_reward + 1.0,
        )
    } else {
        (RewardSet::r1(0.5), a.min_reward)
    };
    let (lines, stats) = teacher_traces(
        &teacher,
        &tok,
        &problems,
        &rewards,
        min_reward,
        a.samples,
        a.keep,
        a.temperature,
        a.max_tokens,
        a.run.seed,
        system_prompt(&a.system).as_deref(),
        worker_threads(a.run.threads),
        &progress,
    )?;
    bar.finish_and_clear();
    if lines.is_empty() {
        bail!(
            "the teacher {} produced no trace with reward ≥ {} on {} problems",
            a.teacher.display(),
            min_reward,
            problems.len()
        );
    }
    write_jsonl(path, &lines)?;
    eprintln!(
        "teacher traces: {} of {} samples accepted, {} of {} problems solved → {}",
        stats.accepted,
        stats.samples,
        stats.solved,
        stats.problems,
        path.display()
    );
    Ok(())
}

/// Write lines atomically (temporary file + rename).
fn write_jsonl(path: &Path, lines: &[serde_json::Value]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    let tmp = path.with_extension("jsonl.tmp");
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| tmp.display().to_string())?,
    );
    for l in lines {
        writeln!(f, "{l}")?;
    }
    f.into_inner()?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| path.display().to_string())?;
    Ok(())
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum TaskStyle {
    /// SFT conversations whose answer shows the worked equation in <think> (arithmetic).
    Worked,
    /// SFT conversations with the answer alone (empty reasoning): the raw task data.
    Answer,
    /// {"prompt", "answer"} lines (for `--task FILE` of grpo/eval).
    Problems,
}

#[derive(Args)]
pub struct TasksArgs {
    /// arithmetic or countdown.
    #[arg(long, default_value = "arithmetic")]
    task: String,
    #[arg(long, default_value_t = 1000)]
    n: usize,
    #[arg(long, value_enum, default_value = "worked")]
    style: TaskStyle,
    /// With `--style worked`: the share of problems given worked solutions, spread evenly; the
    /// others get the answer alone (a cold start in which most examples show no reasoning).
    #[arg(long, default_value_t = 1.0)]
    worked_share: f64,
    /// Take held-out problems instead of training ones.
    #[arg(long)]
    held_out: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// System prompt of each conversation: none, r1-zero or the text.
    #[arg(long, default_value = "none")]
    system: String,
    /// Output JSONL file.
    #[arg(long)]
    out: PathBuf,
}

/// Whether problem `i` of a `--worked-share` file gets a worked solution: the worked ones are
/// spread evenly (problem i is worked when ⌊(i+1)·share⌋ passes ⌊i·share⌋), so any prefix of the
/// file holds the share, and the problems themselves are already random.
fn gets_worked_solution(i: usize, share: f64) -> bool {
    ((i + 1) as f64 * share).floor() > (i as f64 * share).floor()
}

pub fn cmd_tasks(a: TasksArgs) -> Result<()> {
    let source = TaskSource::parse(&a.task);
    if matches!(source, TaskSource::File(_)) {
        bail!("--task must be arithmetic or countdown");
    }
    if a.style == TaskStyle::Problems && matches!(source, TaskSource::Countdown) {
        bail!("--style problems writes exact answers; countdown is checked by its expression (use --task countdown directly)");
    }
    if !(0.0..=1.0).contains(&a.worked_share) {
        bail!(
            "--worked-share must be between 0 and 1, got {}",
            a.worked_share
        );
    }
    if a.worked_share != 1.0 && a.style != TaskStyle::Worked {
        bail!("--worked-share applies to --style worked only");
    }
    let split = if a.held_out {
        Split::HeldOut
    } else {
        Split::Train
    };
    let problems = source
        .problems(a.n, a.seed, split)
        .map_err(anyhow::Error::msg)?;
    let system = system_prompt(&a.system);
    let system = system.as_deref();
    let lines = problems
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(match a.style {
                TaskStyle::Problems => json!({"prompt": p.question, "answer": p.reference()}),
                TaskStyle::Worked if gets_worked_solution(i, a.worked_share) => conversation(
                    p,
                    &reference_answer(p, Style::Worked).map_err(anyhow::Error::msg)?,
                    system,
                ),
                TaskStyle::Worked | TaskStyle::Answer => conversation(
                    p,
                    &reference_answer(p, Style::Answer).map_err(anyhow::Error::msg)?,
                    system,
                ),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    write_jsonl(&a.out, &lines)?;
    eprintln!("{} {} problems → {}", lines.len(), a.task, a.out.display());
    Ok(())
}
