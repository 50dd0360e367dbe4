//! `fathom train --config FILE.toml` / `--preset NAME`: the model shape (a DeepSeek-V3
//! architecture), the data, the optimiser and schedule, balancing and MTP settings.
//!
//! Relative paths in `[data]` are resolved against the current directory (run from the repo root
//! for the presets). Unknown keys are errors, so a typo never silently falls back to a default.

use crate::error::{Result, TrainError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The model shape: a DeepSeek-V3 (MLA + DeepSeekMoE with sigmoid `noaux_tc` routing + MTP).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// Vocabulary size; the tokenizer is trained to this size when `[data].tokenizer` is absent.
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// None: a plain `q_proj` (V2-Lite style); Some(r): q-LoRA.
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Hidden size of the dense MLP of the first `first_k_dense_replace` layers.
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    #[serde(default = "one")]
    pub n_group: usize,
    #[serde(default = "one")]
    pub topk_group: usize,
    #[serde(default)]
    pub first_k_dense_replace: usize,
    #[serde(default = "unit")]
    pub routed_scaling_factor: f64,
    /// MTP depth D (0 disables MTP).
    #[serde(default)]
    pub num_nextn_predict_layers: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn one() -> usize {
    1
}
fn unit() -> f64 {
    1.0
}
fn default_theta() -> f64 {
    10000.0
}
fn default_eps() -> f64 {
    1e-6
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Text files (one document each) or JSONL files (`{"text": ...}` per line).
    pub train: Vec<PathBuf>,
    /// A tokenizer directory; absent → a byte-level BPE is trained on `train` into the run dir.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Synthetic arithmetic problems mixed into the corpus (the reasoning track); 0 = none.
    #[serde(default)]
    pub arithmetic_problems: usize,
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    pub seq_len: usize,
}

fn default_val_fraction() -> f64 {
    0.05
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub max_steps: usize,
    pub batch_size: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_adam_eps")]
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables.
    #[serde(default = "unit")]
    pub grad_clip: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    pub eval_every: usize,
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    pub save_every: usize,
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
}

fn default_wd() -> f64 {
    0.1
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_adam_eps() -> f64 {
    1e-8
}
fn default_log_every() -> usize {
    10
}
fn default_eval_batches() -> usize {
    8
}
fn default_keep() -> usize {
    2
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BalanceConfig {
    /// γ of the auxiliary-loss-free bias update (V3: 0.001); 0 switches it off.
    #[serde(default = "default_gamma")]
    pub bias_update_speed: f64,
    /// α of the sequence-wise balance loss (V3: 1e-4); 0 switches it off.
    #[serde(default = "default_alpha")]
    pub seq_aux_alpha: f64,
}

fn default_gamma() -> f64 {
    0.001
}
fn default_alpha() -> f64 {
    1e-4
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            bias_update_speed: default_gamma(),
            seq_aux_alpha: default_alpha(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MtpConfig {
    /// λ: the MTP loss is λ/D · Σ_k L_k (V3: 0.3, later 0.1).
    #[serde(default = "default_lambda")]
    pub loss_weight: f64,
}

fn default_lambda() -> f64 {
    0.3
}

impl Default for MtpConfig {
    fn default() -> Self {
        MtpConfig {
            loss_weight: default_lambda(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelShape,
    pub data: DataConfig,
    pub train: OptimConfig,
    #[serde(default)]
    pub balance: BalanceConfig,
    #[serde(default)]
    pub mtp: MtpConfig,
}

/// Presets shipped in the binary: (name, TOML).
pub const PRESETS: [(&str, &str); 3] = [
    ("tiny", include_str!("../presets/tiny.toml")),
    ("default", include_str!("../presets/default.toml")),
    ("small", include_str!("../presets/small.toml")),
];

impl TrainConfig {
    pub fn from_toml(text: &str, source: &str) -> Result<Self> {
        let cfg: TrainConfig = toml::from_str(text).map_err(|e| TrainError::Config {
            file: source.into(),
            msg: e.to_string(),
        })?;
        cfg.validate(source)?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::Io {
            path: path.into(),
            source: e,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    pub fn preset(name: &str) -> Result<Self> {
        let (_, text) =
            PRESETS
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| TrainError::Config {
                    file: format!("--preset {name}"),
                    msg: format!(
                        "unknown preset; choose one of: {}",
                        PRESETS.map(|(n, _)| n).join(", ")
                    ),
                })?;
        Self::from_toml(text, &format!("preset '{name}'"))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Checks that name the offending field.
    pub fn validate(&self, source: &str) -> Result<()> {
        let bad = |field: &str, msg: String| {
            Err(TrainError::Config {
                file: source.into(),
                msg: format!("{field}: {msg}"),
            })
        };
        let m = &self.model;
        for (field, v) in [
            ("model.vocab_size", m.vocab_size),
            ("model.hidden_size", m.hidden_size),
            ("model.num_hidden_layers", m.num_hidden_layers),
            ("model.num_attention_heads", m.num_attention_heads),
            ("model.kv_lora_rank", m.kv_lora_rank),
            ("model.qk_nope_head_dim", m.qk_nope_head_dim),
            ("model.v_head_dim", m.v_head_dim),
            ("model.n_routed_experts", m.n_routed_experts),
            ("model.num_experts_per_tok", m.num_experts_per_tok),
            ("model.n_group", m.n_group),
            ("model.topk_group", m.topk_group),
            ("data.seq_len", self.data.seq_len),
            ("train.batch_size", self.train.batch_size),
            ("train.grad_accum", self.train.grad_accum),
            ("train.eval_every", self.train.eval_every),
            ("train.save_every", self.train.save_every),
            ("train.log_every", self.train.log_every),
        ] {
            if v == 0 {
                return bad(field, "must be > 0".into());
            }
        }
        if m.qk_rope_head_dim % 2 != 0 || m.qk_rope_head_dim == 0 {
            return bad(
                "model.qk_rope_head_dim",
                format!("must be even and > 0, got {}", m.qk_rope_head_dim),
            );
        }
        if m.num_experts_per_tok > m.n_routed_experts {
            return bad(
                "model.num_experts_per_tok",
                format!(
                    "{} exceeds n_routed_experts = {}",
                    m.num_experts_per_tok, m.n_routed_experts
                ),
            );
        }
        if m.n_routed_experts % m.n_group != 0 {
            return bad(
                "model.n_group",
                format!(
                    "n_routed_experts = {} is not divisible by n_group = {}",
                    m.n_routed_experts, m.n_group
                ),
            );
        }
        if m.topk_group > m.n_group {
            return bad(
                "model.topk_group",
                format!("{} exceeds n_group = {}", m.topk_group, m.n_group),
            );
        }
        if m.num_experts_per_tok > m.topk_group * (m.n_routed_experts / m.n_group) {
            return bad(
                "model.num_experts_per_tok",
                "more than the experts in topk_group groups".into(),
            );
        }
        if m.first_k_dense_replace > m.num_hidden_layers {
            return bad(
                "model.first_k_dense_replace",
                "exceeds num_hidden_layers".into(),
            );
        }
        if self.data.seq_len + m.num_nextn_predict_layers > m.max_position_embeddings {
            return bad(
                "data.seq_len",
                format!(
                    "seq_len {} (+ MTP depth) exceeds model.max_position_embeddings {}",
                    self.data.seq_len, m.max_position_embeddings
                ),
            );
        }
        if self.data.train.is_empty() && self.data.arithmetic_problems == 0 {
            return bad(
                "data.train",
                "no training files and no arithmetic_problems".into(),
            );
        }
        if !(0.0..0.5).contains(&self.data.val_fraction) || self.data.val_fraction == 0.0 {
            return bad("data.val_fraction", "must be in (0, 0.5)".into());
        }
        let t = &self.train;
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return bad("train.lr", format!("must be > 0, got {}", t.lr));
        }
        if t.min_lr < 0.0 || t.min_lr > t.lr {
            return bad("train.min_lr", "must be in [0, lr]".into());
        }
        if !(0.0..1.0).contains(&t.beta1) || !(0.0..1.0).contains(&t.beta2) {
            return bad("train.beta1/beta2", "must be in [0, 1)".into());
        }
        if t.grad_clip < 0.0 || t.weight_decay < 0.0 {
            return bad(
                "train.grad_clip/weight_decay",
                "must be non-negative".into(),
            );
        }
        if self.balance.bias_update_speed < 0.0 || self.balance.seq_aux_alpha < 0.0 {
            return bad("balance", "γ and α must be non-negative".into());
        }
        Ok(())
    }

    /// The Hugging Face `config.json` of this shape (`DeepseekV3ForCausalLM`).
    pub fn hf_config(&self, vocab_size: usize) -> Value {
        let m = &self.model;
        json!({
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "vocab_size": vocab_size,
            "hidden_size": m.hidden_size,
            "intermediate_size": m.intermediate_size,
            "moe_intermediate_size": m.moe_intermediate_size,
            "num_hidden_layers": m.num_hidden_layers,
            "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_attention_heads,
            "n_shared_experts": m.n_shared_experts,
            "n_routed_experts": m.n_routed_experts,
            "routed_scaling_factor": m.routed_scaling_factor,
            "kv_lora_rank": m.kv_lora_rank,
            "q_lora_rank": m.q_lora_rank,
            "qk_rope_head_dim": m.qk_rope_head_dim,
            "v_head_dim": m.v_head_dim,
            "qk_nope_head_dim": m.qk_nope_head_dim,
            "topk_method": "noaux_tc",
            "n_group": m.n_group,
            "topk_group": m.topk_group,
            "num_experts_per_tok": m.num_experts_per_tok,
            "first_k_dense_replace": m.first_k_dense_replace,
            "moe_layer_freq": 1,
            "norm_topk_prob": true,
            "scoring_func": "sigmoid",
            "hidden_act": "silu",
            "max_position_embeddings": m.max_position_embeddings,
            "initializer_range": 0.02,
            "rms_norm_eps": m.rms_norm_eps,
            "use_cache": true,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "tie_word_embeddings": m.tie_word_embeddings,
            "rope_theta": m.rope_theta,
            "rope_scaling": null,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "num_nextn_predict_layers": m.num_nextn_predict_layers,
            "torch_dtype": "float32",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_validate() {
        for (name, _) in PRESETS {
            let c = TrainConfig::preset(name).unwrap();
            let hf = c.hf_config(c.model.vocab_size);
            fathom_core::ModelConfig::from_value(hf, Path::new("config.json")).unwrap();
        }
        assert!(TrainConfig::preset("huge").is_err());
    }

    #[test]
    fn bad_configs_name_the_field() {
        let base = PRESETS[0].1;
        let cases = [
            (
                "num_experts_per_tok = 4",
                "num_experts_per_tok = 99",
                "num_experts_per_tok",
            ),
            ("n_group = 4", "n_group = 3", "model.n_group"),
            ("lr = ", "lr = -", "train.lr"),
            ("seq_len = ", "seq_len = 100000 #", "data.seq_len"),
            ("[train]", "[train]\nbogus_key = 1", "bogus_key"),
        ];
        for (from, to, expect) in cases {
            assert!(base.contains(from), "preset lacks {from}");
            let text = base.replacen(from, to, 1);
            let err = TrainConfig::from_toml(&text, "x.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains("x.toml"), "{err}");
            assert!(err.contains(expect), "{err} should name {expect}");
        }
    }
}
