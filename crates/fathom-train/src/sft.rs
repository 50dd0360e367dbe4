//! `fathom sft` (and the logit-distillation mode of `fathom distill`): supervised fine-tuning on
//! chat conversations, loss on the final assistant turn only (see [`crate::sft_data`]).
//!
//! Batches: each epoch shuffles the training examples by (seed, epoch) and packs them first-fit in
//! that order into rows of `seq_len + 1` tokens (`packing`), or one example per row; a batch is
//! `batch_size` consecutive rows, trimmed to its longest row and padded with eos (mask 0). A
//! packed example attends to the examples before it in its row, as TRL's `packing=True` does —
//! each carries its own template and BOS, and only its own answer tokens are targets. The data
//! position is a function of the step, so `--resume` replays exactly.
//!
//! Objective: masked cross-entropy of the main head (+ λ·MTP on the same targets, keeping the
//! MTP module usable as a drafter), or logit distillation from a teacher on the same tokens:
//! forward KL with temperature τ, or generalised JSD_β ([`crate::distill`]). MoE layers keep the
//! auxiliary-loss-free bias balancing of pretraining (γ per step).

use crate::balance::{expert_loads, update_bias};
use crate::data::mix;
use crate::distill::{forward_kl, generalized_jsd};
use crate::error::{io_err, Result, TrainError};
use crate::objective::{masked_cross_entropy, pretrain_loss, scalar};
use crate::posttrain::{parallel_gradients, split_ranges, worker_threads, Run, RunOptions};
use crate::sft_data::{build_example, parse_line, SftExample};
use candle_core::{DType, Device, Tensor};
use fathom_core::TextTokenizer;
use fathom_model::CausalLm;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What the student learns from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SftObjective {
    /// Cross-entropy on the data's assistant tokens (+ λ·MTP).
    CrossEntropy { mtp_weight: f64 },
    /// KL(p_teacher ‖ p_student) at temperature τ on the assistant tokens.
    ForwardKl { teacher: PathBuf, tau: f64 },
    /// Generalised JSD_β between teacher and student on the assistant tokens.
    Jsd { teacher: PathBuf, beta: f64 },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SftConfig {
    pub model: PathBuf,
    pub data: PathBuf,
    pub objective: SftObjective,
    pub seq_len: usize,
    /// Rows per step.
    pub batch_size: usize,
    pub packing: bool,
    pub seed: u64,
    /// Fraction of examples held out for the validation loss (by a hash of the line number).
    pub val_fraction: f64,
    pub eval_every: usize,
    pub save_every: usize,
    pub log_every: usize,
    /// Auxiliary-loss-free balancing speed γ for MoE layers (0 = off).
    pub bias_update_speed: f64,
}

pub struct SftOptions {
    pub config: SftConfig,
    pub run: RunOptions,
}

#[derive(Debug, Clone)]
pub struct SftSummary {
    pub steps: usize,
    pub final_dir: Option<PathBuf>,
    pub train_examples: usize,
    pub val_examples: usize,
    pub last_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
}

/// Metrics panels of an SFT run's plot.
pub const SFT_PANELS: &[(&str, &[&str])] = &[
    ("loss on assistant tokens", &["loss", "val_loss"]),
    ("MTP loss", &["mtp_loss"]),
    (
        "learning rate ×1000 and gradient norm",
        &["lr_x1000", "grad_norm"],
    ),
    ("tokens per second", &["tokens_per_s"]),
];

/// Examples of a JSONL file, split into (train, validation). Lines that do not parse are errors
/// naming the file and line; examples longer than `max_len` tokens are dropped and counted.
pub fn load_examples(
    path: &Path,
    tok: &TextTokenizer,
    max_len: usize,
    val_fraction: f64,
) -> Result<(Vec<SftExample>, Vec<SftExample>, usize)> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let (mut train, mut val, mut too_long) = (vec![], vec![], 0);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| TrainError::Data {
            path: path.into(),
            msg: format!("line {}: {msg}", i + 1),
        };
        let ex = build_example(tok, &parse_line(line).map_err(bad)?).map_err(bad)?;
        if ex.ids.len() > max_len {
            too_long += 1;
            continue;
        }
        let held = (mix(i as u64 ^ 0x5F7) % 10_000) as f64 / 10_000.0 < val_fraction;
        if held {
            val.push(ex);
        } else {
            train.push(ex);
        }
    }
    if train.is_empty() {
        return Err(TrainError::Data {
            path: path.into(),
            msg: format!(
                "no training examples ({too_long} longer than {max_len} tokens were dropped)"
            ),
        });
    }
    Ok((train, val, too_long))
}

/// A row of a batch: token ids and target mask.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
}

/// Rows of one epoch: examples shuffled by (seed, epoch), then packed first-fit in that order
/// (or one per row).
pub fn epoch_rows(
    examples: &[SftExample],
    seed: u64,
    epoch: usize,
    capacity: usize,
    packing: bool,
) -> Vec<Row> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(mix(seed ^ mix(epoch as u64))));
    let mut rows: Vec<Row> = Vec::new();
    let mut open: Vec<usize> = Vec::new(); // rows that still have room, for first-fit
    for i in order {
        let ex = &examples[i];
        let slot = if packing {
            open.iter()
                .position(|&r| rows[r].ids.len() + ex.ids.len() <= capacity)
        } else {
            None
        };
        let r = match slot {
            Some(k) => open[k],
            None => {
                rows.push(Row {
                    ids: vec![],
                    mask: vec![],
                });
                open.push(rows.len() - 1);
                rows.len() - 1
            }
        };
        rows[r].ids.extend(&ex.ids);
        rows[r].mask.extend(&ex.mask);
        // A row that cannot take even a short example is closed (keeps first-fit linear-ish).
        open.retain(|&r| capacity - rows[r].ids.len() >= 8);
    }
    rows
}

/// The rows of optimizer step `step`: `batch` consecutive rows of the epoch sequence.
pub struct Batcher<'a> {
    examples: &'a [SftExample],
    seed: u64,
    capacity: usize,
    packing: bool,
    epochs: Vec<Vec<Row>>,
}

impl<'a> Batcher<'a> {
    pub fn new(examples: &'a [SftExample], seed: u64, capacity: usize, packing: bool) -> Self {
        Batcher {
            examples,
            seed,
            capacity,
            packing,
            epochs: vec![],
        }
    }

    fn epoch(&mut self, e: usize) -> &Vec<Row> {
        while self.epochs.len() <= e {
            let k = self.epochs.len();
            let rows = epoch_rows(self.examples, self.seed, k, self.capacity, self.packing);
            self.epochs.push(rows);
        }
        &self.epochs[e]
    }

    pub fn batch(&mut self, step: usize, batch: usize) -> Vec<Row> {
        let mut skip = step * batch;
        let mut e = 0;
        loop {
            let n = self.epoch(e).len();
            if skip < n {
                break;
            }
            skip -= n;
            e += 1;
        }
        let mut out = Vec::with_capacity(batch);
        while out.len() < batch {
            let rows = self.epoch(e);
            out.extend(rows[skip..].iter().take(batch - out.len()).cloned());
            skip = 0;
            e += 1;
        }
        out
    }
}

/// [b, width] ids and f32 mask tensors of `rows`, padded with `pad` to their longest row.
pub fn rows_to_tensors(rows: &[Row], pad: u32, device: &Device) -> Result<(Tensor, Tensor)> {
    let width = rows.iter().map(|r| r.ids.len()).max().unwrap_or(1).max(2);
    let (mut ids, mut mask) = (vec![], vec![]);
    for r in rows {
        ids.extend(&r.ids);
        ids.extend(std::iter::repeat_n(pad, width - r.ids.len()));
        mask.extend(r.mask.iter().map(|&m| m as f32));
        mask.extend(std::iter::repeat_n(0f32, width - r.ids.len()));
    }
    Ok((
        Tensor::from_vec(ids, (rows.len(), width), device)?,
        Tensor::from_vec(mask, (rows.len(), width), device)?,
    ))
}

/// Per-row loss pieces of one shard.
struct ShardStats {
    loss: f64,
    mtp: Option<f64>,
    targets: f64,
    loads: BTreeMap<usize, Vec<f64>>,
}

/// The shard's loss (mean over its target tokens) and statistics.
fn shard_loss(
    model: &CausalLm,
    teacher: Option<&CausalLm>,
    objective: &SftObjective,
    rows: &[Row],
    pad: u32,
) -> Result<(Tensor, ShardStats)> {
    let (tokens, mask) = rows_to_tensors(rows, pad, &model.device)?;
    let targets: f64 = rows
        .iter()
        .map(|r| r.mask[1..].iter().map(|&m| m as f64).sum::<f64>())
        .sum();
    let n_experts = model.cfg.moe.as_ref().map(|m| m.n_routed_experts);
    let loads_of = |routings: &[(usize, fathom_model::moe::Routing)]| {
        let mut loads = BTreeMap::new();
        if let Some(n) = n_experts {
            for (layer, r) in routings {
                loads.insert(*layer, expert_loads(&r.experts, n));
            }
        }
        loads
    };
    match objective {
        SftObjective::CrossEntropy { mtp_weight } => {
            let parts = pretrain_loss(model, &tokens, Some(&mask), *mtp_weight, 0.0)?;
            let stats = ShardStats {
                loss: scalar(&parts.lm)?,
                mtp: parts.mtp_mean()?,
                targets,
                loads: loads_of(&parts.routings),
            };
            Ok((parts.total, stats))
        }
        SftObjective::ForwardKl { .. } | SftObjective::Jsd { .. } => {
            let teacher = teacher.expect("a distillation objective has a teacher");
            let (b, n1) = tokens.dims2()?;
            let inputs = tokens.narrow(1, 0, n1 - 1)?;
            let out = model.forward_hidden(&inputs, 0, None)?;
            let logits = model.logits(&out.hidden)?.reshape((b * (n1 - 1), ()))?;
            let t_logits = teacher
                .forward(&inputs, 0, None)?
                .reshape((b * (n1 - 1), ()))?;
            let m = mask.narrow(1, 1, n1 - 1)?.reshape(b * (n1 - 1))?;
            let kd = match objective {
                SftObjective::ForwardKl { tau, .. } => forward_kl(&logits, &t_logits, &m, *tau)?,
                SftObjective::Jsd { beta, .. } => generalized_jsd(&logits, &t_logits, &m, *beta)?,
                SftObjective::CrossEntropy { .. } => unreachable!(),
            };
            // The student's own cross-entropy on the same tokens, reported (not optimised).
            let ce = masked_cross_entropy(
                &model.logits(&out.hidden)?.detach(),
                &tokens.narrow(1, 1, n1 - 1)?,
                Some(&mask.narrow(1, 1, n1 - 1)?),
            )?;
            let stats = ShardStats {
                loss: scalar(&ce)?,
                mtp: Some(scalar(&kd)?),
                targets,
                loads: loads_of(&out.routings),
            };
            Ok((kd, stats))
        }
    }
}

/// Mean target cross-entropy of `model` over `rows`.
pub fn validation_loss(model: &CausalLm, rows: &[Row], pad: u32, batch: usize) -> Result<f64> {
    let (mut sum, mut count) = (0.0, 0.0);
    for chunk in rows.chunks(batch.max(1)) {
        let (tokens, mask) = rows_to_tensors(chunk, pad, &model.device)?;
        let parts = pretrain_loss(model, &tokens, Some(&mask), 0.0, 0.0)?;
        let n: f64 = chunk
            .iter()
            .map(|r| r.mask[1..].iter().map(|&m| m as f64).sum::<f64>())
            .sum();
        sum += scalar(&parts.lm)? * n;
        count += n;
    }
    Ok(sum / count.max(1.0))
}

pub fn run_sft(opts: SftOptions) -> Result<SftSummary> {
    let (mut run, _) =
        Run::<SftConfig>::open::<()>(&opts.config.model, opts.config.clone(), &opts.run)?;
    let cfg = run.config.clone();
    let tok = TextTokenizer::from_dir(&run.dir.join("tokenizer"))?;
    let pad = *tok.eos_ids.first().ok_or_else(|| TrainError::Data {
        path: run.dir.join("tokenizer"),
        msg: "the tokenizer has no end-of-sequence token".into(),
    })?;
    let capacity = cfg.seq_len + 1;
    let (train, val, dropped) = load_examples(&cfg.data, &tok, capacity, cfg.val_fraction)?;
    run.say(&format!(
        "sft: {} training / {} validation examples from {}{}",
        train.len(),
        val.len(),
        cfg.data.display(),
        if dropped > 0 {
            format!(" ({dropped} longer than {capacity} tokens dropped)")
        } else {
            String::new()
        }
    ));
    let teacher = match &cfg.objective {
        SftObjective::CrossEntropy { .. } => None,
        SftObjective::ForwardKl { teacher, .. } | SftObjective::Jsd { teacher, .. } => {
            let t = CausalLm::load(teacher, DType::F32, &Device::Cpu)?;
            check_same_vocabulary(&tok, teacher, &t, &run.tm.model)?;
            Some(t)
        }
    };
    let val_rows: Vec<Row> = val
        .iter()
        .map(|e| Row {
            ids: e.ids.clone(),
            mask: e.mask.clone(),
        })
        .collect();
    let mut batcher = Batcher::new(&train, cfg.seed, capacity, cfg.packing);
    let threads = worker_threads(opts.run.threads);
    let (mut last_loss, mut last_val) = (None, None);
    let mut steps_run = 0;
    while !run.done() {
        if opts.run.stop_after.is_some_and(|n| steps_run >= n) {
            break;
        }
        let started = Instant::now();
        let rows = batcher.batch(run.step, cfg.batch_size);
        let total_targets: f64 = rows
            .iter()
            .map(|r| r.mask[1..].iter().map(|&m| m as f64).sum::<f64>())
            .sum::<f64>()
            .max(1.0);
        let tokens: usize = rows.iter().map(|r| r.ids.len()).sum();
        let shards: Vec<&[Row]> = split_ranges(rows.len(), threads)
            .into_iter()
            .map(|r| &rows[r])
            .collect();
        let (grads, stats) = parallel_gradients(&run.tm, shards, |tm, shard| {
            let (loss, s) = shard_loss(&tm.model, teacher.as_ref(), &cfg.objective, shard, pad)?;
            // Each shard's mean over its targets, weighted by its share of the batch's targets.
            Ok(((loss * (s.targets / total_targets))?, s))
        })?;
        let w = |s: &ShardStats| s.targets / total_targets;
        let loss: f64 = stats.iter().map(|s| s.loss * w(s)).sum();
        if !loss.is_finite() {
            return Err(TrainError::NonFinite {
                step: run.step + 1,
                value: loss,
                last_good: None,
            });
        }
        let aux: Option<f64> = stats
            .iter()
            .map(|s| s.mtp.map(|m| m * w(s)))
            .sum::<Option<f64>>();
        let (grad_norm, lr) = run.apply(grads)?;
        if cfg.bias_update_speed > 0.0 {
            let mut loads: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
            for s in &stats {
                for (layer, c) in &s.loads {
                    let acc = loads.entry(*layer).or_insert_with(|| vec![0.0; c.len()]);
                    acc.iter_mut().zip(c).for_each(|(a, c)| *a += c);
                }
            }
            for (layer, c) in &loads {
                if let Some(b) = run.tm.biases.get(layer) {
                    update_bias(b, c, cfg.bias_update_speed)?;
                }
            }
        }
        run.step += 1;
        steps_run += 1;
        let secs = started.elapsed().as_secs_f64();
        let aux_key = match cfg.objective {
            SftObjective::CrossEntropy { .. } => "mtp_loss",
            _ => "distill_loss",
        };
        let mut rec = serde_json::json!({
            "loss": loss,
            "lr_x1000": lr * 1000.0,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens as f64 / secs.max(1e-9),
            "target_tokens": total_targets,
        });
        if let Some(a) = aux {
            rec[aux_key] = a.into();
        }
        if !val_rows.is_empty() && (run.step % cfg.eval_every.max(1) == 0 || run.done()) {
            let v = validation_loss(&run.tm.model, &val_rows, pad, cfg.batch_size)?;
            rec["val_loss"] = v.into();
            last_val = Some(v);
        }
        last_loss = Some(loss);
        let msg = format!(
            "loss {loss:.4}{}{} {:.0} tok/s",
            aux.map(|a| format!(" {aux_key} {a:.4}"))
                .unwrap_or_default(),
            last_val.map(|v| format!(" val {v:.4}")).unwrap_or_default(),
            tokens as f64 / secs.max(1e-9)
        );
        run.log(rec, &msg, cfg.log_every)?;
        if run.step % cfg.save_every.max(1) == 0 || run.done() {
            run.save(&(), SFT_PANELS)?;
        }
    }
    let final_dir = if run.done() {
        Some(run.finish(SFT_PANELS)?)
    } else {
        None
    };
    Ok(SftSummary {
        steps: run.step,
        final_dir,
        train_examples: train.len(),
        val_examples: val.len(),
        last_loss,
        last_val_loss: last_val,
    })
}

/// Logit distillation compares distributions token by token, so teacher and student must share
/// the vocabulary: same size and the same tokenizer.
fn check_same_vocabulary(
    student_tok: &TextTokenizer,
    teacher_dir: &Path,
    teacher: &CausalLm,
    student: &CausalLm,
) -> Result<()> {
    let bad = |msg: String| TrainError::Data {
        path: teacher_dir.into(),
        msg,
    };
    if teacher.cfg.vocab_size != student.cfg.vocab_size {
        return Err(bad(format!(
            "logit distillation needs one vocabulary: the teacher has {} logits, the student {}",
            teacher.cfg.vocab_size, student.cfg.vocab_size
        )));
    }
    let ttok = TextTokenizer::from_dir(teacher_dir)?;
    if ttok.vocab() != student_tok.vocab() {
        return Err(bad(
            "logit distillation needs one tokenizer: the teacher's and the student's differ \
             (use trace distillation, --mode traces, across tokenizers)"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples() -> Vec<SftExample> {
        // Distinct lengths 3..=40; each id says which example it came from.
        (0..38u32)
            .map(|i| {
                let len = 3 + i as usize;
                SftExample {
                    ids: vec![i; len],
                    mask: (0..len).map(|t| (t >= len / 2) as u8).collect(),
                }
            })
            .collect()
    }

    #[test]
    fn packing_keeps_every_example_whole_once_per_epoch() {
        let ex = examples();
        for packing in [true, false] {
            let rows = epoch_rows(&ex, 7, 0, 64, packing);
            let mut seen = vec![0usize; ex.len()];
            for r in &rows {
                assert!(r.ids.len() <= 64 && r.ids.len() == r.mask.len());
                // Runs of equal ids are whole examples, masks travel with them.
                let mut t = 0;
                while t < r.ids.len() {
                    let i = r.ids[t] as usize;
                    let len = ex[i].ids.len();
                    assert_eq!(&r.ids[t..t + len], ex[i].ids.as_slice());
                    assert_eq!(&r.mask[t..t + len], ex[i].mask.as_slice());
                    seen[i] += 1;
                    t += len;
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
            if packing {
                let tokens: usize = ex.iter().map(|e| e.ids.len()).sum();
                assert!(
                    rows.len() * 64 < tokens * 13 / 10,
                    "first-fit wastes under 30 %"
                );
            } else {
                assert_eq!(rows.len(), ex.len());
            }
        }
        // Another epoch is another order; the same epoch is the same order.
        assert_eq!(
            epoch_rows(&ex, 7, 1, 64, true),
            epoch_rows(&ex, 7, 1, 64, true)
        );
        assert_ne!(
            epoch_rows(&ex, 7, 0, 64, true),
            epoch_rows(&ex, 7, 1, 64, true)
        );
    }

    #[test]
    fn batches_walk_the_epochs_as_a_function_of_the_step() {
        let ex = examples();
        let mut a = Batcher::new(&ex, 3, 64, true);
        let per_epoch = epoch_rows(&ex, 3, 0, 64, true).len();
        let all: Vec<Row> = (0..5).flat_map(|s| a.batch(s, 7)).collect();
        // Steps taken in any order (a resumed run starts mid-way) give the same rows.
        let mut b = Batcher::new(&ex, 3, 64, true);
        assert_eq!(b.batch(4, 7), all[28..35].to_vec());
        assert_eq!(b.batch(0, 7), all[..7].to_vec());
        // The sequence of rows is epoch 0, then epoch 1, …
        let want: Vec<Row> = (0..4)
            .flat_map(|e| epoch_rows(&ex, 3, e, 64, true))
            .take(35)
            .collect();
        assert!(per_epoch < 35);
        assert!(all == want, "rows differ from the epochs in order");
        // Tensors: padded with the pad id, mask 0 there.
        let (ids, mask) = rows_to_tensors(&all[..2], 99, &Device::Cpu).unwrap();
        let w = all[..2].iter().map(|r| r.ids.len()).max().unwrap();
        assert_eq!(ids.dims(), &[2, w]);
        let ids: Vec<Vec<u32>> = ids.to_vec2().unwrap();
        let mask: Vec<Vec<f32>> = mask.to_vec2().unwrap();
        for (k, r) in all[..2].iter().enumerate() {
            assert_eq!(&ids[k][..r.ids.len()], r.ids.as_slice());
            assert!(ids[k][r.ids.len()..].iter().all(|&t| t == 99));
            assert!(mask[k][r.ids.len()..].iter().all(|&m| m == 0.0));
        }
    }
}
