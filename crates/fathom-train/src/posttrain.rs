//! What the post-training commands (`sft`, `grpo`, `distill`) share: a trainable model loaded from
//! any Hugging Face checkpoint directory, a run directory with its saved options, AdamW with
//! warm-up + cosine, data-parallel gradients, atomic checkpoints with exact resume, flat JSONL
//! metrics with a PNG plot, and a progress bar.
//!
//! Run directory: `run_config.json` (the options, fixed at the first start), `tokenizer/` (copied
//! from the starting model), `checkpoints/step-NNNNNNN/` (HF directory + `optimizer.safetensors` +
//! `trainer_state.json`), `final/`, `metrics.jsonl`, `metrics.png`. `--resume` continues from
//! the newest checkpoint: weights and AdamW moments are restored exactly and every batch is a
//! function of (seed, step), so a resumed run equals an uninterrupted one.

use crate::checkpoint::{list_step_checkpoints, save_step_checkpoint, write_checkpoint};
use crate::error::{io_err, Result, TrainError};
use crate::metrics::{plot_panels, read_records, MetricsLog};
use crate::optim::{clip_grad_norm, lr_at, AdamW};
use crate::pretrain::TrainableModel;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use fathom_core::weights::WeightStore;
use fathom_model::CausalLm;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// Optimiser and schedule of a post-training run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OptimConfig {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub grad_clip: f64,
}

impl OptimConfig {
    /// Fine-tuning defaults (lower lr than pretraining, short warm-up).
    pub fn fine_tune(lr: f64) -> Self {
        OptimConfig {
            lr,
            min_lr: lr / 10.0,
            warmup_steps: 10,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            grad_clip: 1.0,
        }
    }
}

/// Load any HF checkpoint directory (sharded or not; f32, bf16, f16 or FP8 blocks) as a trainable
/// f32 model. Every variable of the model must be in the checkpoint (the error names the tensor).
pub fn load_trainable(dir: &Path) -> Result<TrainableModel> {
    load_trainable_with_mtp(dir, None)
}

/// As [`load_trainable`], with `mtp_depth` MTP modules (`num_nextn_predict_layers`) instead of the
/// checkpoint's: modules it lacks start as copies of its last one (V3 trains module k from
/// module k − 1's state, so the copy is a close start), modules past `mtp_depth` are left out.
pub fn load_trainable_with_mtp(dir: &Path, mtp_depth: Option<usize>) -> Result<TrainableModel> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
    let mut hf: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
            path: cfg_path.clone(),
            msg: e.to_string(),
        })?;
    // What Fathom writes back is plain f32.
    if let Some(o) = hf.as_object_mut() {
        o.remove("quantization_config");
        o.insert("torch_dtype".into(), "float32".into());
    }
    let layers = hf
        .get("num_hidden_layers")
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as usize;
    let stored_depth = hf
        .get("num_nextn_predict_layers")
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as usize;
    if let Some(depth) = mtp_depth {
        if depth > 0 && stored_depth == 0 {
            return Err(TrainError::Checkpoint {
                path: cfg_path,
                msg: format!(
                    "--mtp-depth {depth}: the checkpoint has no MTP module to start the new ones \
                     from (num_nextn_predict_layers is 0)"
                ),
            });
        }
        if let Some(o) = hf.as_object_mut() {
            o.insert("num_nextn_predict_layers".into(), depth.into());
        }
    }
    // A variable of a module the checkpoint lacks reads its last module's tensor.
    let source_name = |name: &str| -> String {
        let Some(rest) = name.strip_prefix("model.layers.") else {
            return name.to_string();
        };
        let (idx, tail) = rest.split_once('.').unwrap_or((rest, ""));
        match idx.parse::<usize>() {
            Ok(i) if stored_depth > 0 && i >= layers + stored_depth => {
                format!("model.layers.{}.{tail}", layers + stored_depth - 1)
            }
            _ => name.to_string(),
        }
    };
    let tm = TrainableModel::new(hf, &Device::Cpu)?;
    let store = WeightStore::open(dir)?;
    let data = tm.varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        let t = store.load_f32(&source_name(name))?;
        if t.dims() != var.dims() {
            return Err(TrainError::Checkpoint {
                path: store.file_of(name),
                msg: format!(
                    "{name}: shape {:?} in the checkpoint, {:?} from config.json",
                    t.dims(),
                    var.dims()
                ),
            });
        }
        var.set(&t)?;
    }
    drop(data);
    Ok(tm)
}

/// A plain (non-trainable) copy of the current weights, for generation: inference fast paths
/// only run on tensors that do not track gradients.
pub fn snapshot(tm: &TrainableModel) -> Result<CausalLm> {
    let data = tm.varmap.data().lock().unwrap();
    let mut map = HashMap::new();
    for (name, var) in data.iter() {
        map.insert(name.clone(), var.as_tensor().copy()?.detach());
    }
    drop(data);
    let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
    Ok(CausalLm::new(&tm.model.cfg, vb, !tm.model.mtp.is_empty())?)
}

/// Gradients of a scalar loss for every trainable parameter (zeros where it does not reach).
pub fn gradients(tm: &TrainableModel, loss: &Tensor) -> Result<Vec<Vec<f32>>> {
    let g = loss.backward()?;
    let mut out = Vec::with_capacity(tm.params.len());
    for p in &tm.params {
        out.push(match g.get(p.var.as_tensor()) {
            Some(t) => t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
            None => vec![0f32; p.var.elem_count()],
        });
    }
    Ok(out)
}

/// Run `shard` on each item on its own worker thread (candle single-threaded inside, as
/// pretraining does) and sum the returned losses' gradients in item order, so the result is
/// deterministic. Each shard returns a loss already weighted by its share of the batch, and
/// whatever statistics it wants back.
pub fn parallel_gradients<T: Send, S: Send>(
    tm: &TrainableModel,
    items: Vec<T>,
    shard: impl Fn(&TrainableModel, T) -> Result<(Tensor, S)> + Sync,
) -> Result<(Vec<Vec<f32>>, Vec<S>)> {
    let outs: Vec<Result<(Vec<Vec<f32>>, S)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .into_iter()
            .map(|item| {
                let shard = &shard;
                scope.spawn(move || {
                    let (loss, stats) = shard(tm, item)?;
                    Ok((gradients(tm, &loss)?, stats))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("training worker panicked"))
            .collect()
    });
    let mut sum: Vec<Vec<f32>> = tm
        .params
        .iter()
        .map(|p| vec![0f32; p.var.elem_count()])
        .collect();
    let mut stats = Vec::new();
    for out in outs {
        let (g, s) = out?;
        for (acc, g) in sum.iter_mut().zip(g) {
            for (a, g) in acc.iter_mut().zip(g) {
                *a += g;
            }
        }
        stats.push(s);
    }
    Ok((sum, stats))
}

/// Split `n` items into at most `parts` contiguous ranges of near-equal size.
pub fn split_ranges(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    (0..parts)
        .map(|i| n * i / parts..n * (i + 1) / parts)
        .filter(|r| !r.is_empty())
        .collect()
}

/// Run `work` on each of `split_ranges(n, threads)` on its own scoped thread and return the
/// results in range order (so whatever the work computes per index does not depend on the split).
pub fn on_ranges<R: Send>(
    n: usize,
    threads: usize,
    work: impl Fn(std::ops::Range<usize>) -> R + Sync,
) -> Vec<R> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = split_ranges(n, threads)
            .into_iter()
            .map(|range| {
                let work = &work;
                scope.spawn(move || work(range))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread panicked"))
            .collect()
    })
}

/// A step progress bar on a terminal (hidden otherwise, or when `quiet`), at `step` of
/// `max_steps`; the flag says whether it is drawn.
pub fn step_progress_bar(quiet: bool, max_steps: usize, step: usize) -> (ProgressBar, bool) {
    let interactive = !quiet && std::io::stderr().is_terminal();
    let bar = if interactive {
        ProgressBar::with_draw_target(Some(max_steps as u64), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {pos}/{len} {msg} ETA {eta_precise}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    bar.set_position(step as u64);
    (bar, interactive)
}

/// Worker threads to use: `requested`, or all cores when 0.
pub fn worker_threads(requested: usize) -> usize {
    if requested == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        requested
    }
}

/// How a post-training run is driven: everything but the command's own options.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub optim: OptimConfig,
    /// Optimizer steps in all (with `resume`: raised to extend a finished run).
    pub max_steps: usize,
    /// The run directory.
    pub out: PathBuf,
    pub resume: bool,
    /// Print nothing (tests).
    pub quiet: bool,
    /// Stop after this many steps (GRPO: rollout batches) of this invocation, leaving a checkpoint.
    pub stop_after: Option<usize>,
    /// Worker threads; 0 = all cores.
    pub threads: usize,
    /// Step checkpoints kept (the newest).
    pub keep_checkpoints: usize,
    /// A fresh run's MTP depth when it should differ from the checkpoint's (see
    /// [`load_trainable_with_mtp`]); a resumed run keeps its checkpoint's.
    pub mtp_depth: Option<usize>,
}

/// Saved in each checkpoint: the step and the command's own resumable state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunState<E> {
    step: usize,
    extra: E,
}

/// One post-training run: model, optimiser, step, run directory.
pub struct Run<C> {
    pub dir: PathBuf,
    pub config: C,
    pub tm: TrainableModel,
    pub opt: AdamW,
    pub optim: OptimConfig,
    /// Optimizer steps completed.
    pub step: usize,
    pub max_steps: usize,
    pub keep_checkpoints: usize,
    pub quiet: bool,
    metrics: MetricsLog,
    bar: ProgressBar,
    interactive: bool,
}

impl<C: Serialize + DeserializeOwned + Clone> Run<C> {
    /// Start a run in `opts.out` from `model_dir`, or (with `opts.resume`) continue the one there
    /// from its newest checkpoint; a resumed run keeps its saved options (`config`, the optimiser),
    /// taking only `max_steps` from the call (raised, to extend a finished run). Returns the run
    /// and the command's resumable state from the checkpoint, if resumed.
    pub fn open<E: DeserializeOwned>(
        model_dir: &Path,
        config: C,
        opts: &RunOptions,
    ) -> Result<(Self, Option<E>)> {
        let (dir, optim, max_steps) = (opts.out.as_path(), opts.optim.clone(), opts.max_steps);
        let (resume, quiet) = (opts.resume, opts.quiet);
        let ckpt_root = dir.join("checkpoints");
        let cfg_path = dir.join("run_config.json");
        let existing = list_step_checkpoints(&ckpt_root);
        let (config, optim, max_steps) = if resume {
            if existing.is_empty() {
                return Err(TrainError::Checkpoint {
                    path: ckpt_root,
                    msg: "--resume: no checkpoint to resume from".into(),
                });
            }
            let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
            let saved: SavedConfig<C> =
                serde_json::from_str(&text).map_err(|e| TrainError::Config {
                    file: cfg_path.display().to_string(),
                    msg: e.to_string(),
                })?;
            (saved.config, saved.optim, max_steps.max(saved.max_steps))
        } else {
            if !existing.is_empty() || dir.join("final").exists() {
                return Err(TrainError::Checkpoint {
                    path: dir.into(),
                    msg: "already holds a run; pass --resume to continue it or choose another \
                          --out"
                        .into(),
                });
            }
            (config, optim, max_steps)
        };
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let saved = SavedConfig {
            config: config.clone(),
            optim: optim.clone(),
            max_steps,
        };
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&saved).unwrap())
            .map_err(io_err(&cfg_path))?;
        let tok_dir = dir.join("tokenizer");
        if !resume {
            std::fs::create_dir_all(&tok_dir).map_err(io_err(&tok_dir))?;
            for f in ["tokenizer.json", "tokenizer_config.json"] {
                let src = model_dir.join(f);
                if src.exists() {
                    std::fs::copy(&src, tok_dir.join(f)).map_err(io_err(&src))?;
                }
            }
        }
        let metrics = MetricsLog::new(dir.join("metrics.jsonl"));
        let (tm, opt, step, extra) = if resume {
            let (step, ckpt) = existing.last().unwrap().clone();
            let tm = load_trainable(&ckpt)?;
            let mut opt = new_adamw(&tm, &optim);
            opt.load(&tm.params, &ckpt.join("optimizer.safetensors"))?;
            let sp = ckpt.join("trainer_state.json");
            let text = std::fs::read_to_string(&sp).map_err(io_err(&sp))?;
            let state: RunState<E> =
                serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
                    path: sp.clone(),
                    msg: e.to_string(),
                })?;
            metrics.truncate_after(step)?;
            if !quiet {
                eprintln!("resumed from {} (step {step})", ckpt.display());
            }
            (tm, opt, state.step, Some(state.extra))
        } else {
            let tm = load_trainable_with_mtp(model_dir, opts.mtp_depth)?;
            let opt = new_adamw(&tm, &optim);
            let m = dir.join("metrics.jsonl");
            if m.exists() {
                std::fs::remove_file(&m).map_err(io_err(&m))?;
            }
            (tm, opt, 0, None)
        };
        let (bar, interactive) = step_progress_bar(quiet, max_steps, step);
        Ok((
            Run {
                dir: dir.into(),
                config,
                tm,
                opt,
                optim,
                step,
                max_steps,
                keep_checkpoints: opts.keep_checkpoints,
                quiet,
                metrics,
                bar,
                interactive,
            },
            extra,
        ))
    }

    pub fn done(&self) -> bool {
        self.step >= self.max_steps
    }

    /// The scheduled learning rate of the current step.
    pub fn lr(&self) -> f64 {
        let o = &self.optim;
        lr_at(self.step, o.lr, o.min_lr, o.warmup_steps, self.max_steps)
    }

    /// Clip `grads` and take one AdamW step at the scheduled lr; returns (grad norm, lr). A
    /// non-finite gradient stops the run, naming the last good checkpoint.
    pub fn apply(&mut self, mut grads: Vec<Vec<f32>>) -> Result<(f64, f64)> {
        let norm = clip_grad_norm(&mut grads, self.optim.grad_clip);
        if !norm.is_finite() {
            self.bar.abandon();
            return Err(TrainError::NonFinite {
                step: self.step + 1,
                value: norm,
                last_good: list_step_checkpoints(&self.dir.join("checkpoints"))
                    .last()
                    .map(|c| c.1.clone()),
            });
        }
        let lr = self.lr();
        self.opt.step(&self.tm.params, &grads, lr)?;
        Ok((norm, lr))
    }

    /// Record the finished step's metrics (flat JSON object; `step` is added) and show `msg`.
    pub fn log(
        &mut self,
        mut record: serde_json::Value,
        msg: &str,
        log_every: usize,
    ) -> Result<()> {
        record["step"] = self.step.into();
        self.metrics.append(&record)?;
        self.bar.set_message(msg.to_string());
        self.bar.set_position(self.step as u64);
        if !self.interactive && !self.quiet && (self.step % log_every.max(1) == 0 || self.done()) {
            eprintln!("step {}/{} {msg}", self.step, self.max_steps);
        }
        Ok(())
    }

    /// Print a line without breaking the progress bar.
    pub fn say(&self, msg: &str) {
        if !self.quiet {
            self.bar.suspend(|| eprintln!("{msg}"));
        }
    }

    /// Write `checkpoints/step-N` (weights, optimizer, `extra` state), drop old ones, and redraw
    /// the plot with `panels`.
    pub fn save<E: Serialize>(&self, extra: &E, panels: &[(&str, &[&str])]) -> Result<()> {
        let state = RunState {
            step: self.step,
            extra,
        };
        save_step_checkpoint(
            &self.dir.join("checkpoints"),
            self.step,
            &self.tm,
            &self.opt,
            &self.dir.join("tokenizer"),
            &state,
            &[],
            self.keep_checkpoints,
        )?;
        self.plot(panels)
    }

    pub fn plot(&self, panels: &[(&str, &[&str])]) -> Result<()> {
        let recs: Vec<serde_json::Value> =
            read_records(&self.dir.join("metrics.jsonl")).unwrap_or_default();
        plot_panels(&recs, panels, &self.dir.join("metrics.png"))
    }

    /// Write `final/` (an HF checkpoint) and return its path.
    pub fn finish(&self, panels: &[(&str, &[&str])]) -> Result<PathBuf> {
        self.bar.finish_and_clear();
        let dir = self.dir.join("final");
        write_checkpoint(
            &dir,
            &self.tm.hf_config,
            &self.tm.checkpoint_tensors(),
            Some(&self.dir.join("tokenizer")),
            |_| Ok(()),
        )?;
        self.plot(panels)?;
        self.say(&format!("final checkpoint: {}", dir.display()));
        Ok(dir)
    }
}

#[derive(Serialize, Deserialize)]
struct SavedConfig<C> {
    config: C,
    optim: OptimConfig,
    max_steps: usize,
}

fn new_adamw(tm: &TrainableModel, o: &OptimConfig) -> AdamW {
    AdamW::new(&tm.params, o.beta1, o.beta2, o.eps, o.weight_decay)
}
