//! fathom-engine: turning a model into text.
//!
//! - [`sampler`]: temperature, top-k, top-p, min-p, repetition penalty, seeded RNG.
//! - [`generate`]: the decode loop over the KV cache, with streaming detokenisation, stop
//!   strings and eos handling.

pub mod generate;
pub mod sampler;

pub use generate::{generate, FinishReason, GenerateOptions, Generation, StopMatcher, TextStream};
pub use sampler::{Sampler, SamplingParams};
