//! fathom-train: training DeepSeek-architecture models on the same definition inference uses.
//!
//! - [`config`]: the TOML run config and presets (`fathom train --preset tiny`).
//! - [`tokenizer_train`]: byte-level BPE with DeepSeek's special tokens and R1 chat template.
//! - [`data`]: text/JSONL (+ [`arithmetic`]) → memory-mapped token stores, seeded batches.
//! - [`objective`]: LM + MTP (λ/D·ΣL_k) + sequence-wise balance loss.
//! - [`balance`]: auxiliary-loss-free bias update, balance loss, MaxVio.
//! - [`optim`]: AdamW, warm-up + cosine schedule, gradient clipping.
//! - [`checkpoint`]: atomic HF checkpoint directories.
//! - [`metrics`]: JSONL metrics and PNG plots.
//! - [`pretrain`]: the loop, with exact resume.
//! - [`tasks`]: verifiable tasks (arithmetic, countdown, JSONL) with disjoint train/held-out splits.
//! - [`sft_data`]: chat conversations → token ids with the assistant-target loss mask.
//! - [`rewards`]: rule-based accuracy and format rewards, composable with weights.
//! - [`distill`]: logit distillation losses (forward KL with temperature, generalised JSD).
//! - [`evaluate`]: held-out accuracy, format rate and pass@k through the inference engine.
//! - [`grpo`]: group-normalised advantages and the clipped GRPO objective with k3 KL.
//! - [`posttrain`]: what SFT, GRPO and distillation share (run dir, resume, AdamW, metrics).
//! - [`sft`]: `fathom sft` and logit distillation: masked loss on assistant tokens, packing.
//! - [`grpo_train`]: `fathom grpo`: rollouts through the engine, rewards, μ inner steps, eval.
//! - [`traces`]: SFT data from tasks: reference answers and reward-filtered teacher traces.

pub mod arithmetic;
pub mod balance;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod distill;
pub mod error;
pub mod evaluate;
pub mod grpo;
pub mod grpo_train;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod posttrain;
pub mod pretrain;
pub mod rewards;
pub mod sft;
pub mod sft_data;
pub mod tasks;
#[cfg(test)]
mod test_util;
pub mod tokenizer_train;
pub mod traces;

pub use config::TrainConfig;
pub use error::{Result, TrainError};
pub use pretrain::{train, TrainOptions, TrainSummary, TrainableModel};
