//! fathom-core: the checkpoint formats Fathom reads and writes.
//!
//! - [`config`]: HF `config.json` for `deepseek_v3`, `deepseek_v2`, `qwen2`, `llama` → [`ModelConfig`].
//! - [`weights`]: safetensors (single file or shards + index), f32/bf16/f16 and FP8 e4m3 with
//!   128×128 block scales, memory-mapped and loaded tensor by tensor.
//! - [`gguf`]: llama.cpp GGUF files (`deepseek2`, `qwen2`, `llama`) read as HF checkpoints, their
//!   block-quantised tensors kept as stored; and the GGUF files `fathom quantize` writes.
//! - [`tokenizer`]: `tokenizer.json` and the `chat_template` of `tokenizer_config.json`.
//!
//! Every error names the file and the field or tensor at fault ([`FathomError`]).

pub mod config;
pub mod error;
pub mod gguf;
pub mod gguf_header;
#[rustfmt::skip]
pub mod pretokenizers;
pub mod tokenizer;
pub mod weights;

pub use config::{
    Architecture, MlaConfig, ModelConfig, MoeConfig, QuantizedSource, RopeScaling, ScoringFunc,
    StoredBlocks, TopkMethod, WeightPlan, WeightQuant,
};
pub use error::{FathomError, Result};
pub use gguf::{find_gguf, GgufCheckpoint};
pub use tokenizer::{
    deepseek_tokenizer_config, ChatTemplate, TextTokenizer, DEEPSEEK_R1_CHAT_TEMPLATE,
    DEEPSEEK_SPECIAL_TOKENS,
};
pub use weights::{SourceBackend, TensorSource, WeightStore};
