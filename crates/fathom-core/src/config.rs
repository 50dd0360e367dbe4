//! `config.json` → [`ModelConfig`]: one normalised description of DeepSeek-V3/V2, Qwen2 and Llama.
//!
//! Required fields are the shapes (a default there would be silently wrong); routing knobs default to
//! what the HF config class of each `model_type` defaults to. Both rope spellings are accepted: the
//! legacy `rope_theta` + `rope_scaling` of real checkpoints and transformers 5's `rope_parameters`.

use crate::error::{FathomError, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    DeepseekV3,
    DeepseekV2,
    Qwen2,
    Llama,
}

impl Architecture {
    pub fn model_type(&self) -> &'static str {
        match self {
            Architecture::DeepseekV3 => "deepseek_v3",
            Architecture::DeepseekV2 => "deepseek_v2",
            Architecture::Qwen2 => "qwen2",
            Architecture::Llama => "llama",
        }
    }
}

/// Frequency scaling applied to the rotary embedding.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// YaRN as DeepSeek uses it (V2 §2.1.3 / V3): interpolate low frequencies, keep high ones,
    /// and scale attention by mscale.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: f64,
        mscale_all_dim: f64,
    },
    /// Llama 3.1's wavelength-banded scaling (R1-Distill-Llama).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Frequency i divided by `factors[i]`: llama.cpp's `rope_freqs` tensor (how GGUF files carry
    /// Llama 3 scaling).
    FreqFactors { factors: Vec<f64> },
}

/// Multi-head latent attention shapes (DeepSeek-V2/V3).
#[derive(Debug, Clone, PartialEq)]
pub struct MlaConfig {
    /// `None`: one `q_proj` (V2-Lite); `Some(r)`: q_a_proj → q_a_layernorm → q_b_proj.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

impl MlaConfig {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Softmax,
    Sigmoid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// Plain top-k over all experts (V2-Lite).
    Greedy,
    /// Keep the `topk_group` groups with the highest max score, then top-k (V2).
    GroupLimitedGreedy,
    /// Select on score + `e_score_correction_bias`; groups ranked by the sum of their top-2 (V3).
    NoauxTc,
}

/// DeepSeekMoE shapes and routing.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub topk_method: TopkMethod,
    pub scoring_func: ScoringFunc,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
}

/// FP8 block quantisation of a checkpoint (`quantization_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizationConfig {
    pub quant_method: String,
    pub fmt: String,
    pub weight_block_size: [usize; 2],
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head dim for standard attention (Qwen2/Llama); unused by MLA.
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2: always; Llama/DeepSeek: `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (`attention_bias` on Llama/DeepSeek; never on Qwen2).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub mla: Option<MlaConfig>,
    pub moe: Option<MoeConfig>,
    pub num_nextn_predict_layers: usize,
    pub quantization: Option<QuantizationConfig>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The parsed file, kept so a checkpoint written back carries every field it came with.
    pub raw: Value,
    /// Runtime choice, not part of config.json: how projection weights are held (see
    /// `fathom_model::linear`).
    pub weights: WeightPlan,
}

/// A block-quantised tensor as a file stores it: its format, row-major shape and bytes — a range
/// of the memory-mapped file itself when the tensor is used where it lies (zero-copy), or a
/// buffer when the layout had to be rewritten.
#[derive(Debug, Clone)]
pub struct StoredBlocks {
    pub format: fathom_runtime::Format,
    pub dims: Vec<usize>,
    pub bytes: fathom_runtime::WeightBytes,
}

/// Block-quantised weights as a file stores them (GGUF), handed to projections unchanged.
pub trait QuantizedSource: Send + Sync + std::fmt::Debug {
    /// Tensor `name` (HF naming, [out, in]) in its stored block format, or `None` when the file
    /// holds it as floats (or not at all): the caller then reads it as a dense tensor.
    fn quantized(&self, name: &str) -> Result<Option<StoredBlocks>>;
}

/// How projection weights are held at runtime.
#[derive(Debug, Clone, Default)]
pub struct WeightPlan {
    /// Quantise float weights to this llama.cpp format while loading.
    pub quantize: Option<WeightQuant>,
    /// Weights already stored block-quantised: used as stored, never expanded to f32.
    pub stored: Option<std::sync::Arc<dyn QuantizedSource>>,
}

/// Quantised weight formats (llama.cpp's GGML block formats) Fathom can hold projections in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightQuant {
    Q8_0,
    Q4_0,
    Q4K,
    Q6K,
}

impl WeightQuant {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(WeightQuant::Q8_0),
            "q4_0" => Ok(WeightQuant::Q4_0),
            "q4_k" | "q4k" => Ok(WeightQuant::Q4K),
            "q6_k" | "q6k" => Ok(WeightQuant::Q6K),
            other => Err(format!(
                "unknown quantisation {other:?} (choose q8_0, q6_k, q4_k, q4_0)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightQuant::Q8_0 => "q8_0",
            WeightQuant::Q4_0 => "q4_0",
            WeightQuant::Q4K => "q4_k",
            WeightQuant::Q6K => "q6_k",
        }
    }
}

impl ModelConfig {
    /// Read and validate `DIR/config.json` (or a direct path to a json file).
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| FathomError::io(&file, e))?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| FathomError::Config {
            file: file.clone(),
            field: "<json>".into(),
            msg: e.to_string(),
        })?;
        Self::from_value(raw, &file)
    }

    pub fn from_value(raw: Value, file: &Path) -> Result<Self> {
        let f = Fields {
            v: &raw,
            file: file.to_path_buf(),
        };
        let model_type = f.req_str("model_type")?;
        let arch = match model_type.as_str() {
            "deepseek_v3" => Architecture::DeepseekV3,
            "deepseek_v2" => Architecture::DeepseekV2,
            "qwen2" => Architecture::Qwen2,
            "llama" => Architecture::Llama,
            other => {
                return Err(f.err(
                    "model_type",
                    format!("unsupported model_type {other:?} (supported: deepseek_v3, deepseek_v2, qwen2, llama)"),
                ))
            }
        };
        let is_deepseek = matches!(arch, Architecture::DeepseekV3 | Architecture::DeepseekV2);
        let hidden_size = f.req_usize("hidden_size")?;
        let num_attention_heads = f.req_usize("num_attention_heads")?;
        let num_key_value_heads = f
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(f.err(
                "num_key_value_heads",
                format!("{num_key_value_heads} must be non-zero and divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = f
            .opt_usize("head_dim")?
            .unwrap_or(hidden_size / num_attention_heads);

        let (rope_theta, rope_scaling) = parse_rope(&f)?;

        let mla = if is_deepseek {
            Some(MlaConfig {
                q_lora_rank: f.opt_usize("q_lora_rank")?,
                kv_lora_rank: f.req_usize("kv_lora_rank")?,
                qk_nope_head_dim: f.req_usize("qk_nope_head_dim")?,
                qk_rope_head_dim: f.req_usize("qk_rope_head_dim")?,
                v_head_dim: f.req_usize("v_head_dim")?,
            })
        } else {
            None
        };
        if let Some(m) = &mla {
            if m.qk_rope_head_dim % 2 != 0 {
                return Err(f.err("qk_rope_head_dim", "must be even".into()));
            }
        }

        let moe = if is_deepseek {
            match f.opt_usize("n_routed_experts")? {
                None | Some(0) => None,
                Some(n_routed) => {
                    let v3 = arch == Architecture::DeepseekV3;
                    let topk_method = match f
                        .opt_str("topk_method")?
                        .unwrap_or_else(|| {
                            if v3 {
                                "noaux_tc".into()
                            } else {
                                "greedy".into()
                            }
                        })
                        .as_str()
                    {
                        "greedy" => TopkMethod::Greedy,
                        "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
                        "noaux_tc" => TopkMethod::NoauxTc,
                        other => {
                            return Err(
                                f.err("topk_method", format!("unknown topk_method {other:?}"))
                            )
                        }
                    };
                    let scoring_func = match f
                        .opt_str("scoring_func")?
                        .unwrap_or_else(|| {
                            if v3 {
                                "sigmoid".into()
                            } else {
                                "softmax".into()
                            }
                        })
                        .as_str()
                    {
                        "softmax" => ScoringFunc::Softmax,
                        "sigmoid" => ScoringFunc::Sigmoid,
                        other => {
                            return Err(
                                f.err("scoring_func", format!("unknown scoring_func {other:?}"))
                            )
                        }
                    };
                    let n_group = f.opt_usize("n_group")?.unwrap_or(1).max(1);
                    let topk_group = f.opt_usize("topk_group")?.unwrap_or(n_group).max(1);
                    let num_experts_per_tok = f.req_usize("num_experts_per_tok")?;
                    if n_routed % n_group != 0 {
                        return Err(f.err(
                            "n_group",
                            format!("{n_group} does not divide n_routed_experts {n_routed}"),
                        ));
                    }
                    if topk_group > n_group {
                        return Err(
                            f.err("topk_group", format!("{topk_group} > n_group {n_group}"))
                        );
                    }
                    if num_experts_per_tok == 0 || num_experts_per_tok > n_routed {
                        return Err(f.err(
                            "num_experts_per_tok",
                            format!("{num_experts_per_tok} must be in 1..={n_routed}"),
                        ));
                    }
                    Some(MoeConfig {
                        n_routed_experts: n_routed,
                        n_shared_experts: f.opt_usize("n_shared_experts")?.unwrap_or(0),
                        num_experts_per_tok,
                        moe_intermediate_size: f.req_usize("moe_intermediate_size")?,
                        first_k_dense_replace: f.opt_usize("first_k_dense_replace")?.unwrap_or(0),
                        moe_layer_freq: f.opt_usize("moe_layer_freq")?.unwrap_or(1).max(1),
                        n_group,
                        topk_group,
                        topk_method,
                        scoring_func,
                        norm_topk_prob: f.opt_bool("norm_topk_prob")?.unwrap_or(v3),
                        routed_scaling_factor: f.opt_f64("routed_scaling_factor")?.unwrap_or(1.0),
                    })
                }
            }
        } else {
            None
        };

        let quantization = match raw.get("quantization_config") {
            None | Some(Value::Null) => None,
            Some(q) => {
                let qf = Fields {
                    v: q,
                    file: file.to_path_buf(),
                };
                let method = qf
                    .req_str("quant_method")
                    .map_err(|_| f.err("quantization_config.quant_method", "missing".into()))?;
                if method != "fp8" {
                    return Err(f.err(
                        "quantization_config.quant_method",
                        format!("unsupported quant_method {method:?} (supported: fp8)"),
                    ));
                }
                let fmt = qf.opt_str("fmt")?.unwrap_or_else(|| "e4m3".into());
                if fmt != "e4m3" {
                    return Err(f.err(
                        "quantization_config.fmt",
                        format!("unsupported fp8 format {fmt:?}"),
                    ));
                }
                let block = match q.get("weight_block_size") {
                    Some(Value::Array(a)) if a.len() == 2 => {
                        let r = a[0].as_u64().filter(|&x| x > 0);
                        let c = a[1].as_u64().filter(|&x| x > 0);
                        match (r, c) {
                            (Some(r), Some(c)) => [r as usize, c as usize],
                            _ => {
                                return Err(f.err(
                                    "quantization_config.weight_block_size",
                                    "expected two positive integers".into(),
                                ))
                            }
                        }
                    }
                    None | Some(Value::Null) => [128, 128],
                    _ => {
                        return Err(f.err(
                            "quantization_config.weight_block_size",
                            "expected [rows, cols]".into(),
                        ))
                    }
                };
                Some(QuantizationConfig {
                    quant_method: method,
                    fmt,
                    weight_block_size: block,
                })
            }
        };

        let eos_token_ids = match raw.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            _ => vec![],
        };
        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let cfg = ModelConfig {
            arch,
            vocab_size: f.req_usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.req_usize("intermediate_size")?,
            num_hidden_layers: f.req_usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias: arch == Architecture::Qwen2 || attention_bias,
            o_bias: arch != Architecture::Qwen2 && attention_bias,
            mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
            mla,
            moe,
            num_nextn_predict_layers: f.opt_usize("num_nextn_predict_layers")?.unwrap_or(0),
            quantization,
            bos_token_id: f.opt_usize("bos_token_id")?.map(|x| x as u32),
            eos_token_ids,
            raw: raw.clone(),
            weights: WeightPlan::default(),
        };
        if let Some(act) = f.opt_str("hidden_act")? {
            if act != "silu" {
                return Err(f.err(
                    "hidden_act",
                    format!("unsupported activation {act:?} (supported: silu)"),
                ));
            }
        }
        Ok(cfg)
    }

    /// Does layer `i` use DeepSeekMoE (otherwise a dense MLP)? `first_k_dense_replace` dense layers
    /// first, then every `moe_layer_freq`-th layer (V2/V3 official semantics).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        match &self.moe {
            Some(m) => i >= m.first_k_dense_replace && i % m.moe_layer_freq == 0,
            None => false,
        }
    }

    /// Rotary dimension: the decoupled rope part for MLA, the whole head otherwise.
    pub fn rope_dim(&self) -> usize {
        match &self.mla {
            Some(m) => m.qk_rope_head_dim,
            None => self.head_dim,
        }
    }

    /// Values cached per token per layer by the plain (expanded) cache and by the latent cache.
    pub fn kv_values_per_token_per_layer(&self) -> usize {
        match &self.mla {
            // Latent cache: normalised c_kv plus the shared roped key (V2 §2.1.2).
            Some(m) => m.kv_lora_rank + m.qk_rope_head_dim,
            None => 2 * self.num_key_value_heads * self.head_dim,
        }
    }
}

fn parse_rope(f: &Fields) -> Result<(f64, Option<RopeScaling>)> {
    // transformers 5 writes `rope_parameters` (with rope_theta inside); real checkpoints write
    // `rope_theta` + `rope_scaling`. Accept both; `rope_scaling` wins when both are present.
    let params = match f.v.get("rope_scaling") {
        Some(Value::Object(_)) => f.v.get("rope_scaling"),
        _ => match f.v.get("rope_parameters") {
            Some(Value::Object(_)) => f.v.get("rope_parameters"),
            _ => None,
        },
    };
    let field = if matches!(f.v.get("rope_scaling"), Some(Value::Object(_))) {
        "rope_scaling"
    } else {
        "rope_parameters"
    };
    let theta = match f.opt_f64("rope_theta")? {
        Some(t) => t,
        None => params
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .unwrap_or(10000.0),
    };
    let Some(p) = params else {
        return Ok((theta, None));
    };
    let pf = Fields {
        v: p,
        file: f.file.clone(),
    };
    let named = |k: &str| format!("{field}.{k}");
    let kind = pf
        .opt_str("rope_type")?
        .or(pf.opt_str("type")?)
        .unwrap_or_else(|| "default".into());
    let need = |k: &str| -> Result<f64> {
        pf.opt_f64(k)?
            .ok_or_else(|| f.err(&named(k), "missing".into()))
    };
    let scaling = match kind.as_str() {
        "default" => None,
        "yarn" => {
            let orig = pf
                .opt_usize("original_max_position_embeddings")?
                .or(f.opt_usize("max_position_embeddings")?)
                .ok_or_else(|| {
                    f.err(&named("original_max_position_embeddings"), "missing".into())
                })?;
            Some(RopeScaling::Yarn {
                factor: need("factor")?,
                original_max_position_embeddings: orig,
                beta_fast: pf.opt_f64("beta_fast")?.unwrap_or(32.0),
                beta_slow: pf.opt_f64("beta_slow")?.unwrap_or(1.0),
                mscale: pf.opt_f64("mscale")?.unwrap_or(1.0),
                mscale_all_dim: pf.opt_f64("mscale_all_dim")?.unwrap_or(0.0),
            })
        }
        "llama3" => Some(RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: pf
                .opt_usize("original_max_position_embeddings")?
                .ok_or_else(|| {
                    f.err(&named("original_max_position_embeddings"), "missing".into())
                })?,
        }),
        "linear" => Some(RopeScaling::Linear {
            factor: need("factor")?,
        }),
        other => {
            return Err(f.err(
                &named("type"),
                format!("unsupported rope scaling {other:?}"),
            ))
        }
    };
    Ok((theta, scaling))
}

/// Typed access to a JSON object whose errors name the file and the field.
struct Fields<'a> {
    v: &'a Value,
    file: PathBuf,
}

impl Fields<'_> {
    fn err(&self, field: &str, msg: String) -> FathomError {
        FathomError::Config {
            file: self.file.clone(),
            field: field.to_string(),
            msg,
        }
    }
    fn get(&self, k: &str) -> Option<&Value> {
        match self.v.get(k) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }
    fn req_usize(&self, k: &str) -> Result<usize> {
        self.opt_usize(k)?
            .ok_or_else(|| self.err(k, "required field is missing".into()))
    }
    fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.err(k, format!("expected a non-negative integer, found {v}"))),
        }
    }
    fn opt_f64(&self, k: &str) -> Result<Option<f64>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(k, format!("expected a number, found {v}"))),
        }
    }
    fn opt_bool(&self, k: &str) -> Result<Option<bool>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(k, format!("expected true/false, found {v}"))),
        }
    }
    fn opt_str(&self, k: &str) -> Result<Option<String>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.err(k, format!("expected a string, found {v}"))),
        }
    }
    fn req_str(&self, k: &str) -> Result<String> {
        self.opt_str(k)?
            .ok_or_else(|| self.err(k, "required field is missing".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_value(v, Path::new("/m/config.json"))
    }

    fn v3() -> Value {
        json!({"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
            "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
            "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
            "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
            "norm_topk_prob": true, "routed_scaling_factor": 2.5, "first_k_dense_replace": 3,
            "moe_intermediate_size": 2048, "moe_layer_freq": 1, "num_nextn_predict_layers": 1,
            "rope_theta": 10000, "max_position_embeddings": 163840,
            "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 4096},
            "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [128, 128]},
            "eos_token_id": 1, "bos_token_id": 0, "tie_word_embeddings": false})
    }

    #[test]
    fn real_v3_config_parses() {
        let c = parse(v3()).unwrap();
        assert_eq!(c.arch, Architecture::DeepseekV3);
        let moe = c.moe.as_ref().unwrap();
        assert_eq!(moe.topk_method, TopkMethod::NoauxTc);
        assert_eq!(moe.scoring_func, ScoringFunc::Sigmoid);
        assert!(!c.is_moe_layer(2) && c.is_moe_layer(3));
        assert_eq!(c.kv_values_per_token_per_layer(), 576);
        assert_eq!(
            c.quantization.as_ref().unwrap().weight_block_size,
            [128, 128]
        );
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::Yarn { factor, original_max_position_embeddings: 4096, .. }) if factor == 40.0)
        );
        assert_eq!(c.eos_token_ids, vec![1]);
    }

    #[test]
    fn null_q_lora_and_rope_parameters() {
        let mut v = v3();
        v["q_lora_rank"] = Value::Null;
        v.as_object_mut().unwrap().remove("rope_scaling");
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 50000.0});
        let c = parse(v).unwrap();
        assert_eq!(c.mla.unwrap().q_lora_rank, None);
        assert_eq!(c.rope_theta, 50000.0);
        assert_eq!(c.rope_scaling, None);
    }

    #[test]
    fn errors_name_file_and_field() {
        let mut v = v3();
        v.as_object_mut().unwrap().remove("kv_lora_rank");
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("/m/config.json") && e.contains("kv_lora_rank"),
            "{e}"
        );

        let mut v = v3();
        v["model_type"] = json!("gpt2");
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("model_type") && e.contains("gpt2"), "{e}");

        let mut v = v3();
        v["n_group"] = json!(7);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("n_group"), "{e}");

        let mut v = v3();
        v["hidden_size"] = json!("big");
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("hidden_size") && e.contains("integer"), "{e}");
    }

    #[test]
    fn qwen2_has_qkv_bias_only() {
        let c = parse(json!({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": true,
            "eos_token_id": [3, 4]}))
        .unwrap();
        assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![3, 4]);
        assert_eq!(c.kv_values_per_token_per_layer(), 2 * 1 * 4);
    }
}
