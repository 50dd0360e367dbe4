//! Training subcommands: `train`, `tokenizer train`, `plot`.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use fathom_train::metrics::{plot_metrics, read_metrics};
use fathom_train::tokenizer_train::train_tokenizer;
use fathom_train::{train, TrainConfig, TrainOptions};
use serde_json::json;
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainArgs {
    /// A run config (TOML); see crates/fathom-train/presets/ for the format.
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// A shipped preset: tiny, default, small.
    #[arg(long)]
    preset: Option<String>,
    /// Run directory (checkpoints, metrics, final/). Default: runs/<preset or config name>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override train.max_steps (on --resume, raises it to continue a finished run).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Override train.seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Continue from the newest checkpoint in --out, bit-identically.
    #[arg(long)]
    resume: bool,
    /// Switch auxiliary-loss-free bias balancing off (γ = 0), for comparison runs.
    #[arg(long)]
    no_bias_balance: bool,
    /// Stop after N steps of this invocation, leaving a checkpoint to resume from.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Data-parallel worker threads (each shard of a batch on its own core, candle single-threaded
    /// inside; measured faster than candle's intra-op threads for these model sizes). 0 = all cores.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print a JSON summary on stdout at the end.
    #[arg(long)]
    json: bool,
}

pub fn cmd_train(a: TrainArgs) -> Result<()> {
    let (mut cfg, name) = match (&a.config, &a.preset) {
        (Some(path), _) => (
            TrainConfig::from_file(path)?,
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into()),
        ),
        (None, Some(p)) => (TrainConfig::preset(p)?, p.clone()),
        (None, None) if a.resume && a.out.is_some() => {
            let path = a.out.as_ref().unwrap().join("train_config.toml");
            (TrainConfig::from_file(&path)?, "run".into())
        }
        (None, None) => bail!("pass --config FILE.toml or --preset NAME (tiny, default, small)"),
    };
    if let Some(n) = a.max_steps {
        cfg.train.max_steps = n;
    }
    if let Some(s) = a.seed {
        cfg.train.seed = s;
    }
    if a.no_bias_balance {
        cfg.balance.bias_update_speed = 0.0;
    }
    cfg.validate("command line")?;
    let out = a.out.unwrap_or_else(|| PathBuf::from("runs").join(name));
    let summary = train(TrainOptions {
        config: cfg,
        out: out.clone(),
        resume: a.resume,
        quiet: false,
        stop_after: a.stop_after,
        threads: a.threads,
    })?;
    let png = out.join("metrics.png");
    if let Ok(recs) = read_metrics(&out.join("metrics.jsonl")) {
        plot_metrics(&recs, &png)?;
    }
    if a.json {
        let last = summary.last.as_ref();
        println!(
            "{}",
            json!({
                "steps": summary.steps,
                "final_dir": summary.final_dir,
                "val_loss": summary.last_val_loss,
                "train_loss": last.map(|r| r.lm_loss),
                "max_vio": last.map(|r| &r.max_vio),
                "mean_tokens_per_s": summary.mean_tokens_per_s,
            })
        );
    } else {
        eprintln!(
            "{} steps; val loss {}; {:.0} tokens/s; metrics {} and {}",
            summary.steps,
            summary
                .last_val_loss
                .map(|v| format!("{v:.4}"))
                .unwrap_or("-".into()),
            summary.mean_tokens_per_s,
            out.join("metrics.jsonl").display(),
            png.display()
        );
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum TokenizerCmd {
    /// Train a byte-level BPE with DeepSeek's special tokens and R1 chat template.
    Train {
        /// Text or JSONL ({"text": ...}) files.
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        #[arg(long)]
        vocab_size: usize,
        #[arg(long)]
        out: PathBuf,
        /// Also train on N synthetic arithmetic problems.
        #[arg(long, default_value_t = 0)]
        arithmetic: usize,
        #[arg(long, default_value_t = 4096)]
        model_max_length: usize,
    },
}

pub fn cmd_tokenizer(c: TokenizerCmd) -> Result<()> {
    match c {
        TokenizerCmd::Train {
            input,
            vocab_size,
            out,
            arithmetic,
            model_max_length,
        } => {
            let n = train_tokenizer(&input, arithmetic, 0, vocab_size, model_max_length, &out)?;
            eprintln!("{n}-token tokenizer written to {}", out.display());
            Ok(())
        }
    }
}

pub fn cmd_plot(run: PathBuf, out: Option<PathBuf>) -> Result<()> {
    // Post-training runs (sft, grpo, distill) write flat records with their own panels.
    if run.join("run_config.json").exists() {
        let path = run.join("metrics.jsonl");
        let recs: Vec<serde_json::Value> = fathom_train::metrics::read_records(&path)?;
        if recs.is_empty() {
            bail!("{}: no metrics yet", path.display());
        }
        let panels = if recs.iter().any(|r| r.get("reward").is_some()) {
            fathom_train::grpo_train::GRPO_PANELS
        } else {
            fathom_train::sft::SFT_PANELS
        };
        let out = out.unwrap_or_else(|| run.join("metrics.png"));
        fathom_train::metrics::plot_panels(&recs, panels, &out)?;
        eprintln!("{} steps plotted to {}", recs.len(), out.display());
        return Ok(());
    }
    let recs = read_metrics(&run.join("metrics.jsonl"))?;
    if recs.is_empty() {
        bail!("{}: no metrics yet", run.join("metrics.jsonl").display());
    }
    let out = out.unwrap_or_else(|| run.join("metrics.png"));
    plot_metrics(&recs, &out)?;
    eprintln!("{} steps plotted to {}", recs.len(), out.display());
    Ok(())
}
