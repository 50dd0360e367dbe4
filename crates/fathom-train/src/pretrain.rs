//! `fathom train`: the pretraining loop.
//!
//! Per step: `grad_accum` micro-batches → loss (LM + MTP + balance) → backward → accumulated
//! gradients → global-norm clip → AdamW at the scheduled lr → the auxiliary-loss-free bias update
//! of every MoE layer from the step's expert loads → metrics. Evaluation and atomic checkpoints at
//! their intervals; `RUN/final/` at the end.
//!
//! Run directory: `train_config.toml`, `tokenizer/` (when trained here), `data/` (token store),
//! `checkpoints/step-NNNNNNN/` (the last `keep_checkpoints`), `final/`, `metrics.jsonl`,
//! `metrics.png`. `--resume` restarts from the newest checkpoint bit-identically: weights,
//! balancing biases and AdamW moments are saved exactly, and batches are a function of the step.

use crate::balance::{expert_loads, max_violation, update_bias};
use crate::checkpoint::{list_step_checkpoints, save_step_checkpoint, write_checkpoint};
use crate::config::TrainConfig;
use crate::data::{mix, prepare, Dataset};
use crate::error::{io_err, Result, TrainError};
use crate::metrics::{plot_metrics, read_metrics, MetricsLog, StepRecord};
use crate::objective::{pretrain_loss, scalar};
use crate::optim::{clip_grad_norm, lr_at, AdamW, Param};
use crate::posttrain::{gradients, step_progress_bar, worker_threads};
use crate::tokenizer_train::train_tokenizer;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use fathom_core::{ModelConfig, TextTokenizer};
use fathom_model::CausalLm;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct TrainOptions {
    pub config: TrainConfig,
    pub out: PathBuf,
    pub resume: bool,
    /// Print nothing (tests).
    pub quiet: bool,
    /// Stop after this many steps of this invocation (simulates a kill; tests and benchmarks).
    pub stop_after: Option<usize>,
    /// Data-parallel worker threads per step (each runs candle single-threaded); 0 = all cores.
    pub threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    pub tokens_seen: u64,
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: usize,
    pub final_dir: Option<PathBuf>,
    pub last: Option<StepRecord>,
    pub last_val_loss: Option<f64>,
    pub mean_tokens_per_s: f64,
}

/// A freshly initialised or restored model with its variables.
pub struct TrainableModel {
    pub model: CausalLm,
    pub varmap: VarMap,
    pub hf_config: serde_json::Value,
    /// Trainable parameters, sorted by name (the balancing biases are not among them).
    pub params: Vec<Param>,
    /// HF layer index → that layer's `e_score_correction_bias`.
    pub biases: BTreeMap<usize, Var>,
}

impl TrainableModel {
    pub fn new(hf_config: serde_json::Value, device: &Device) -> Result<Self> {
        let cfg = ModelConfig::from_value(hf_config.clone(), Path::new("config.json"))?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = CausalLm::new(&cfg, vb, cfg.num_nextn_predict_layers > 0)?;
        let data = varmap.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut params = Vec::new();
        let mut biases = BTreeMap::new();
        for name in names {
            let var = data[name].clone();
            if name.ends_with("e_score_correction_bias") {
                let layer = name
                    .strip_prefix("model.layers.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|l| l.parse().ok())
                    .expect("bias names carry their layer");
                biases.insert(layer, var);
            } else {
                params.push(Param {
                    name: name.clone(),
                    decay: var.rank() >= 2,
                    var,
                });
            }
        }
        drop(data);
        Ok(TrainableModel {
            model,
            varmap,
            hf_config,
            params,
            biases,
        })
    }

    /// GPT-style init, deterministic per (seed, name): N(0, 0.02) for matrices, residual output
    /// projections (o_proj, down_proj) scaled by 1/√(2·layers), norms 1, balancing biases 0.
    pub fn init(&self, seed: u64) -> Result<()> {
        let layers = self.model.cfg.num_hidden_layers.max(1) as f64;
        let data = self.varmap.data().lock().unwrap();
        for (name, var) in data.iter() {
            let n = var.elem_count();
            let values: Vec<f32> = if name.contains("norm") {
                vec![1.0; n]
            } else if name.ends_with("e_score_correction_bias") {
                vec![0.0; n]
            } else {
                let std = if name.contains("o_proj") || name.contains("down_proj") {
                    0.02 / (2.0 * layers).sqrt()
                } else {
                    0.02
                };
                let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
                });
                let mut rng = StdRng::seed_from_u64(mix(seed ^ h));
                (0..n).map(|_| (normal(&mut rng) * std) as f32).collect()
            };
            var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
        }
        Ok(())
    }

    /// Tensors of an HF checkpoint: every variable, plus the per-MTP-layer copies of the
    /// embedding and head that DeepSeek-V3 checkpoints carry.
    pub fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        let data = self.varmap.data().lock().unwrap();
        let mut out: Vec<(String, Tensor)> = data
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let cfg = &self.model.cfg;
        for k in 0..self.model.mtp.len() {
            let p = format!("model.layers.{}", cfg.num_hidden_layers + k);
            out.push((
                format!("{p}.embed_tokens.weight"),
                self.model
                    .embed_tokens
                    .dense()
                    .expect("a trainable model holds its embeddings dense")
                    .clone(),
            ));
            out.push((
                format!("{p}.shared_head.head.weight"),
                self.model
                    .lm_head
                    .dense()
                    .expect("a trainable model holds lm_head dense")
                    .clone(),
            ));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Restore variables from a checkpoint's `model.safetensors`.
    pub fn load_weights(&self, dir: &Path) -> Result<()> {
        let path = dir.join("model.safetensors");
        let mut vm = self.varmap.clone();
        vm.load(&path).map_err(|e| TrainError::Checkpoint {
            path: path.clone(),
            msg: e.to_string(),
        })
    }
}

fn normal(rng: &mut StdRng) -> f64 {
    // Box–Muller; u1 in (0, 1] so the log is finite.
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn tokenizer_dir(cfg: &TrainConfig, run: &Path) -> PathBuf {
    cfg.data
        .tokenizer
        .clone()
        .unwrap_or_else(|| run.join("tokenizer"))
}

/// Validation results over the fixed windows.
pub struct Evaluation {
    pub lm_loss: f64,
    pub mtp_loss: Option<f64>,
    /// MaxVio of each MoE layer over all validation tokens (V3's MaxVio_global).
    pub max_vio: Vec<(usize, f64)>,
}

/// Validation LM and MTP loss and global MaxVio over the fixed windows.
pub fn evaluate(
    model: &CausalLm,
    ds: &Dataset,
    windows: usize,
    batch: usize,
) -> Result<Evaluation> {
    let all = ds.val_windows(windows);
    let (mut lm, mut mtp, mut n) = (0.0, 0.0, 0.0);
    let mut loads: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for chunk in all.chunks(batch) {
        let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
        let t = Tensor::from_vec(flat, (chunk.len(), ds.seq_len + 1), &model.device)?;
        let parts = pretrain_loss(model, &t, None, 0.0, 0.0)?;
        let w = chunk.len() as f64;
        lm += scalar(&parts.lm)? * w;
        if let Some(m) = parts.mtp_mean()? {
            mtp += m * w;
        }
        if let Some(m) = &model.cfg.moe {
            for (layer, r) in &parts.routings {
                let acc = loads
                    .entry(*layer)
                    .or_insert_with(|| vec![0.0; m.n_routed_experts]);
                for (a, c) in acc
                    .iter_mut()
                    .zip(expert_loads(&r.experts, m.n_routed_experts))
                {
                    *a += c;
                }
            }
        }
        n += w;
    }
    let has_mtp = !model.mtp.is_empty();
    Ok(Evaluation {
        lm_loss: lm / n,
        mtp_loss: has_mtp.then_some(mtp / n),
        max_vio: loads.iter().map(|(l, c)| (*l, max_violation(c))).collect(),
    })
}

pub fn train(opts: TrainOptions) -> Result<TrainSummary> {
    let run = opts.out.clone();
    let ckpt_root = run.join("checkpoints");
    let cfg_path = run.join("train_config.toml");
    let device = Device::Cpu;
    let say = |msg: &str| {
        if !opts.quiet {
            eprintln!("{msg}");
        }
    };

    // The run's config: fixed at the first start; --resume reuses it (max_steps may be raised).
    let mut cfg = opts.config.clone();
    let existing = list_step_checkpoints(&ckpt_root);
    if opts.resume {
        if existing.is_empty() {
            return Err(TrainError::Checkpoint {
                path: ckpt_root,
                msg: "--resume: no checkpoint to resume from".into(),
            });
        }
        let saved = TrainConfig::from_file(&cfg_path)?;
        let max_steps = cfg.train.max_steps;
        cfg = saved;
        cfg.train.max_steps = max_steps.max(cfg.train.max_steps);
    } else if !existing.is_empty() || run.join("final").exists() {
        return Err(TrainError::Checkpoint {
            path: run.clone(),
            msg: "already holds a run; pass --resume to continue it or choose another --out".into(),
        });
    }
    std::fs::create_dir_all(&run).map_err(io_err(&run))?;
    std::fs::write(&cfg_path, cfg.to_toml()).map_err(io_err(&cfg_path))?;

    // Tokenizer.
    let tok_dir = tokenizer_dir(&cfg, &run);
    if !tok_dir.join("tokenizer.json").exists() {
        if cfg.data.tokenizer.is_some() {
            return Err(TrainError::Config {
                file: cfg_path.display().to_string(),
                msg: format!(
                    "data.tokenizer: {} has no tokenizer.json",
                    tok_dir.display()
                ),
            });
        }
        say(&format!(
            "training a {}-token byte-level BPE on the corpus → {}",
            cfg.model.vocab_size,
            tok_dir.display()
        ));
        train_tokenizer(
            &cfg.data.train,
            cfg.data.arithmetic_problems,
            cfg.train.seed,
            cfg.model.vocab_size,
            cfg.model.max_position_embeddings,
            &tok_dir,
        )?;
    }
    let tokenizer = TextTokenizer::from_dir(&tok_dir)?;
    if tokenizer.vocab_size() > cfg.model.vocab_size {
        return Err(TrainError::Config {
            file: cfg_path.display().to_string(),
            msg: format!(
                "model.vocab_size {} is smaller than the tokenizer's {}",
                cfg.model.vocab_size,
                tokenizer.vocab_size()
            ),
        });
    }
    let eos = tokenizer
        .eos_token
        .as_deref()
        .and_then(|t| tokenizer.token_to_id(t))
        .ok_or_else(|| TrainError::Data {
            path: tok_dir.clone(),
            msg: "tokenizer has no eos_token".into(),
        })?;

    // Data.
    let data_dir = run.join("data");
    if !data_dir.join("data.json").exists() {
        say("tokenising the corpus…");
        prepare(
            &cfg.data.train,
            cfg.data.arithmetic_problems,
            cfg.train.seed,
            cfg.data.val_fraction,
            &tokenizer,
            eos,
            &data_dir,
            |_| {},
        )?;
    }
    let ds = Dataset::open(&data_dir, cfg.data.seq_len)?;
    say(&format!(
        "data: {} train tokens, {} val tokens ({:.2} bytes/token)",
        ds.meta.train_tokens,
        ds.meta.val_tokens,
        ds.meta.val_text_bytes as f64 / ds.meta.val_tokens.max(1) as f64
    ));

    // Model and optimizer.
    let tm = TrainableModel::new(cfg.hf_config(cfg.model.vocab_size), &device)?;
    let t = &cfg.train;
    let mut opt = AdamW::new(&tm.params, t.beta1, t.beta2, t.eps, t.weight_decay);
    let metrics = MetricsLog::new(run.join("metrics.jsonl"));
    let mut state = TrainerState {
        step: 0,
        tokens_seen: 0,
    };
    if opts.resume {
        let (step, dir) = existing.last().unwrap().clone();
        tm.load_weights(&dir)?;
        opt.load(&tm.params, &dir.join("optimizer.safetensors"))?;
        let sp = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&sp).map_err(io_err(&sp))?;
        state = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
            path: sp.clone(),
            msg: e.to_string(),
        })?;
        metrics.truncate_after(step)?;
        say(&format!("resumed from {} (step {step})", dir.display()));
    } else {
        tm.init(t.seed)?;
        if run.join("metrics.jsonl").exists() {
            std::fs::remove_file(run.join("metrics.jsonl")).map_err(io_err(&run))?;
        }
    }
    let (total, active) = tm.model.param_counts();
    say(&format!(
        "model: {:.2}M parameters ({:.2}M active per token), MTP depth {}",
        total as f64 / 1e6,
        active as f64 / 1e6,
        tm.model.mtp.len()
    ));

    let bytes_per_token = ds.meta.val_text_bytes as f64 / ds.meta.val_tokens.max(1) as f64;
    let tokens_per_step = (t.batch_size * cfg.data.seq_len * t.grad_accum) as u64;
    let (bar, interactive) = step_progress_bar(opts.quiet, t.max_steps, state.step);

    let mut last_ckpt: Option<PathBuf> = existing.last().map(|e| e.1.clone());
    let mut last: Option<StepRecord> = None;
    let mut last_val = None;
    let mut tps_sum = 0.0;
    let mut steps_run = 0usize;
    let moe = tm.model.cfg.moe.clone();
    let threads = worker_threads(opts.threads);
    let shards = threads.min(t.batch_size).max(1);
    while state.step < t.max_steps {
        if opts.stop_after.is_some_and(|n| steps_run >= n) {
            break;
        }
        let step = state.step;
        let started = Instant::now();
        let mut grads: Vec<Vec<f32>> = tm
            .params
            .iter()
            .map(|p| vec![0f32; p.var.elem_count()])
            .collect();
        let mut loads: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        let (mut loss, mut lm, mut mtp_sum, mut bal) = (0.0, 0.0, 0.0, 0.0);
        let mut has_mtp = false;
        for micro in 0..t.grad_accum {
            let batch = ds.train_batch(t.seed, step, micro, t.batch_size);
            let n1 = cfg.data.seq_len + 1;
            // Data-parallel shards of the micro-batch, one per worker thread; each shard's share of
            // the mean is its fraction of the sequences. Fixed split and summation order keep runs
            // deterministic for a given thread count.
            let bounds: Vec<(usize, usize)> = (0..shards)
                .map(|i| (t.batch_size * i / shards, t.batch_size * (i + 1) / shards))
                .filter(|(a, b)| b > a)
                .collect();
            let outs: Vec<Result<ShardOut>> = std::thread::scope(|scope| {
                let handles: Vec<_> = bounds
                    .iter()
                    .map(|&(a, b)| {
                        let tokens = batch[a * n1..b * n1].to_vec();
                        let weight = (b - a) as f64 / t.batch_size as f64 / t.grad_accum as f64;
                        let tm = &tm;
                        let cfg = &cfg;
                        let moe = &moe;
                        scope.spawn(move || shard_step(tm, tokens, b - a, n1, weight, cfg, moe))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("training worker panicked"))
                    .collect()
            });
            for out in outs {
                let out = out?;
                if !out.total.is_finite() {
                    bar.abandon();
                    return Err(TrainError::NonFinite {
                        step: step + 1,
                        value: out.total,
                        last_good: last_ckpt,
                    });
                }
                loss += out.total * out.weight;
                lm += out.lm * out.weight;
                bal += out.balance * out.weight;
                if let Some(m) = out.mtp {
                    has_mtp = true;
                    mtp_sum += m * out.weight;
                }
                for (layer, c) in out.loads {
                    let acc = loads.entry(layer).or_insert_with(|| vec![0.0; c.len()]);
                    for (a, c) in acc.iter_mut().zip(c) {
                        *a += c;
                    }
                }
                for (acc, g) in grads.iter_mut().zip(out.grads) {
                    for (a, g) in acc.iter_mut().zip(g) {
                        *a += g;
                    }
                }
            }
        }
        let grad_norm = clip_grad_norm(&mut grads, t.grad_clip);
        if !grad_norm.is_finite() {
            bar.abandon();
            return Err(TrainError::NonFinite {
                step: step + 1,
                value: grad_norm,
                last_good: last_ckpt,
            });
        }
        let lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps);
        opt.step(&tm.params, &grads, lr)?;
        let mut max_vio = Vec::new();
        for (layer, c) in &loads {
            max_vio.push((*layer, max_violation(c)));
            if cfg.balance.bias_update_speed > 0.0 {
                if let Some(b) = tm.biases.get(layer) {
                    update_bias(b, c, cfg.balance.bias_update_speed)?;
                }
            }
        }
        state.step += 1;
        state.tokens_seen += tokens_per_step;
        steps_run += 1;
        let secs = started.elapsed().as_secs_f64();
        let tps = tokens_per_step as f64 / secs.max(1e-9);
        tps_sum += tps;
        let mut rec = StepRecord {
            step: state.step,
            loss,
            lm_loss: lm,
            mtp_loss: has_mtp.then_some(mtp_sum),
            balance_loss: bal,
            lr,
            grad_norm,
            tokens_per_s: tps,
            tokens_seen: state.tokens_seen,
            max_vio,
            ..Default::default()
        };
        let done = state.step == t.max_steps;
        if state.step % t.eval_every == 0 || done {
            let ev = evaluate(&tm.model, &ds, t.eval_batches * t.batch_size, t.batch_size)?;
            let vl = ev.lm_loss;
            rec.val_loss = Some(vl);
            rec.val_mtp_loss = ev.mtp_loss;
            rec.val_max_vio = Some(ev.max_vio);
            rec.val_bpb = Some(vl / std::f64::consts::LN_2 / bytes_per_token);
            last_val = Some(vl);
        }
        metrics.append(&rec)?;
        let vio_max = rec.max_vio.iter().map(|v| v.1).fold(0.0, f64::max);
        let msg = format!(
            "loss {:.3}{} maxvio {:.2} {:.0} tok/s",
            rec.lm_loss,
            last_val.map(|v| format!(" val {v:.3}")).unwrap_or_default(),
            vio_max,
            tps
        );
        bar.set_message(msg.clone());
        bar.set_position(state.step as u64);
        if !interactive && !opts.quiet && (state.step % t.log_every == 0 || done) {
            eprintln!("step {}/{} {msg}", state.step, t.max_steps);
        }
        if state.step % t.save_every == 0 || done {
            last_ckpt = Some(save_step_checkpoint(
                &ckpt_root,
                state.step,
                &tm,
                &opt,
                &tok_dir,
                &state,
                &[("train_config.toml", cfg.to_toml())],
                t.keep_checkpoints,
            )?);
            if let Ok(recs) = read_metrics(&run.join("metrics.jsonl")) {
                plot_metrics(&recs, &run.join("metrics.png"))?;
            }
        }
        last = Some(rec);
    }
    bar.finish_and_clear();
    let final_dir = if state.step >= t.max_steps {
        let dir = run.join("final");
        write_checkpoint(
            &dir,
            &tm.hf_config,
            &tm.checkpoint_tensors(),
            Some(&tok_dir),
            |_| Ok(()),
        )?;
        say(&format!("final checkpoint: {}", dir.display()));
        Some(dir)
    } else {
        None
    };
    Ok(TrainSummary {
        steps: state.step,
        final_dir,
        last,
        last_val_loss: last_val,
        mean_tokens_per_s: tps_sum / steps_run.max(1) as f64,
    })
}

/// One data-parallel shard's contribution: loss values, expert loads and gradients already
/// scaled by `weight` (its fraction of the step's sequences).
struct ShardOut {
    weight: f64,
    total: f64,
    lm: f64,
    mtp: Option<f64>,
    balance: f64,
    loads: BTreeMap<usize, Vec<f64>>,
    grads: Vec<Vec<f32>>,
}

fn shard_step(
    tm: &TrainableModel,
    tokens: Vec<u32>,
    rows: usize,
    n1: usize,
    weight: f64,
    cfg: &TrainConfig,
    moe: &Option<fathom_core::MoeConfig>,
) -> Result<ShardOut> {
    let tokens = Tensor::from_vec(tokens, (rows, n1), &tm.model.device)?;
    let parts = pretrain_loss(
        &tm.model,
        &tokens,
        None,
        cfg.mtp.loss_weight,
        cfg.balance.seq_aux_alpha,
    )?;
    let mtp = parts.mtp_mean()?;
    let mut loads = BTreeMap::new();
    if let Some(m) = moe {
        for (layer, r) in &parts.routings {
            loads.insert(*layer, expert_loads(&r.experts, m.n_routed_experts));
        }
    }
    let total = scalar(&parts.total)?;
    let grads = gradients(tm, &(&parts.total * weight)?)?;
    Ok(ShardOut {
        weight,
        total,
        lm: scalar(&parts.lm)?,
        mtp,
        balance: scalar(&parts.balance)?,
        loads,
        grads,
    })
}
