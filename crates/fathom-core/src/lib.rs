//! fathom-core: the checkpoint formats Fathom reads and writes.
//!
//! - [`config`]: HF `config.json` for `deepseek_v3`, `deepseek_v2`, `qwen2`, `llama` → [`ModelConfig`].
//! - [`weights`]: safetensors (single file or shards + index), f32/bf16/f16 and FP8 e4m3 with
//!   128×128 block scales, memory-mapped and loaded tensor by tensor.
//! - [`tokenizer`]: `tokenizer.json` and the `chat_template` of `tokenizer_config.json`.
//!
//! Every error names the file and the field or tensor at fault ([`FathomError`]).

pub mod config;
pub mod error;
pub mod tokenizer;
pub mod weights;

pub use config::{
    Architecture, MlaConfig, ModelConfig, MoeConfig, RopeScaling, ScoringFunc, TopkMethod,
    WeightQuant,
};
pub use error::{FathomError, Result};
pub use tokenizer::{
    deepseek_tokenizer_config, ChatTemplate, TextTokenizer, DEEPSEEK_R1_CHAT_TEMPLATE,
    DEEPSEEK_SPECIAL_TOKENS,
};
pub use weights::WeightStore;
