//! fathom-runtime: the machine side of the inference hot path — what the model's equations run
//! on, kept apart from them (`fathom-model` says what is computed, this crate how, fast, on this
//! CPU).
//!
//! - [`quant`]: llama.cpp's block formats (q4_0 … q8_0, q2_K … q6_K, iq4_nl, iq4_xs), their
//!   portable decoding, and int8 matrix products on the stored bytes — AVX2 kernels chosen at
//!   run time, a portable fallback, each tested against dequantise-then-f32.
//! - [`decode`]: a planned single-sequence decode step — preallocated buffers, one pool
//!   hand-off per layer, fused norm/quantise, SwiGLU and expert sums, MLA's absorbed attention.
//! - [`parallel`]: splitting a kernel's rows over candle's barrier pool plus the calling thread.
//! - [`rows_matmul`]: y = x·Wᵀ in f32 for a few rows (decode, batched decode) without packing W.
//!
//! Every kernel here is tested against a plain reference (`tests/kernels.rs`).

pub mod decode;
pub mod parallel;
pub mod quant;
pub mod rows_matmul;

pub use quant::{Format, Kernel, QMatrix, QuantizedActs, WeightBytes};
