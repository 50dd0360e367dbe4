//! fathom-engine: turning a model into text.
//!
//! - [`sampler`]: temperature, top-k, top-p, min-p, repetition penalty, seeded RNG.
//! - [`generate`]: the decode loop over the KV cache, with streaming detokenisation, stop
//!   strings and eos handling.
//! - [`scheduler`]: continuous batching — an engine thread decoding every active sequence in one
//!   packed forward per step, chunked prefill, bounded admission by KV memory.
//! - [`prefix_cache`]: block-hashed reuse of shared prompt prefixes' KV, LRU-evicted.
//! - [`speculative`]: MTP speculative decoding — drafting with the MTP module, verification,
//!   rejection sampling, acceptance statistics.

pub mod generate;
pub mod prefix_cache;
pub mod sampler;
pub mod scheduler;
pub mod speculative;

pub use generate::{
    generate, FinishReason, GenerateOptions, Generation, StopMatcher, TextStream,
    DEFAULT_DRAFT_TOKENS,
};
pub use prefix_cache::PrefixCache;
pub use sampler::{token_logprobs, Sampler, SamplingParams};
pub use scheduler::{
    generate_batch, BatchOutput, Engine, EngineMetrics, Event, Request, SchedulerConfig,
    SubmitError, TokenLogprob, DEFAULT_SPEC_MAX_BATCH,
};
pub use speculative::{default_draft_tokens, SpecStats};
