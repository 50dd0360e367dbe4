//! fathom-model: the architectures, one file per concept, one definition for training and inference.
//!
//! - [`norm`] RMSNorm · [`rope`] rotary embedding with YaRN / Llama 3 scaling
//! - [`mla`] Multi-head Latent Attention · [`attention`] SDPA and GQA (Qwen2/Llama)
//! - [`mlp`] SwiGLU MLP · [`moe`] DeepSeekMoE gate (`route_tokens`) and experts
//! - [`mtp`] Multi-Token Prediction module · [`decoder`] decoder block · [`model`] the causal LM
//! - [`cache`] plain and MLA latent KV caches · [`ops`] differentiable softmax/sigmoid/linear/cross-entropy
//! - [`linear`] dense or block-quantised projections (the quantised products run in
//!   `fathom-runtime`) · [`quantize`] checkpoint → quantised GGUF
//! - [`planned`] the model described to the runtime's planned decode step (tested against the
//!   plain path)
//!
//! Every op is composed from candle primitives that have a backward pass (see `tests/gradients.rs`).

pub mod attention;
pub mod cache;
pub mod decoder;
pub mod embedding;
pub mod fused;
pub mod linear;
pub mod mla;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod mtp;
pub mod norm;
pub mod ops;
pub mod packed_attention;
pub mod planned;
pub mod quantize;
pub mod rope;

pub use cache::{CachedRows, KvCache, Segment};
/// Host kernels (moved to the runtime; re-exported for the kernels still here).
pub use fathom_runtime::{parallel, rows_matmul};
pub use model::{param_counts, CausalLm, ForwardOutput};
