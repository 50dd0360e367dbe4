//! `fathom quantize`: a checkpoint directory (f32/bf16/f16 or FP8 blocks) → a directory holding
//! `model.gguf` with llama.cpp block-quantised projections, plus its config and tokenizer files.
//!
//! Tensors are read one at a time (FP8 blocks dequantised per tensor), so the full-precision model
//! is never resident. Quantised: every projection (`*_proj`, `kv_a_proj_with_mqa`, experts, shared experts, MTP
//! `eh_proj`) and `lm_head`. Token embeddings are stored f16 (half the bytes; they are expanded to
//! f32 at load since lookups read rows, and a block format there costs quality for nothing at
//! runtime: measured 0.029 vs 0.003 relative logit change on the V3 fixture at q8_0). Kept f32: norms, routers and `e_score_correction_bias` (quantisation noise
//! flips routing) and MLA's `kv_b_proj` (absorbed decode reads it as W_UK/W_UV views). A format
//! whose block does not divide a row falls back to q8_0, else f32. Tensor names stay HF names and
//! the config is embedded, so the file loads without translation.

use crate::linear::{block_format_for, ggml_format};
use candle_core::quantized::{GgmlDType, QTensor};
use fathom_core::gguf::write_fathom_gguf;
use fathom_core::{FathomError, ModelConfig, WeightQuant, WeightStore};
use std::path::Path;

/// What `fathom quantize --to` writes: one format for every quantised tensor, or one of
/// llama.cpp's k-quant mixtures ([`Mixture`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantTarget {
    Uniform(WeightQuant),
    Mixture(Mixture),
}

/// llama.cpp's Q4_K_M and Q5_K_M, as `llama_tensor_get_type` (src/llama-quant.cpp) picks per
/// tensor for a model without 8 experts (not Falcon): q4_K (q5_K) by default; `lm_head` q6_K;
/// the attention value projection (`attn_v`) and every FFN down-projection (dense, routed and
/// shared experts) of a layer i with `use_more_bits(i, n)` q6_K; rows that a 256-block does not
/// divide fall back q4_K → q5_0, q5_K → q5_1, q6_K → q8_0 (then f32). What Fathom keeps in float
/// whatever the target stays so (see the module doc): embeddings f16, `kv_b_proj`, norms,
/// routers — where llama.cpp would store `token_embd` and `attn_kv_b` in blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mixture {
    Q4KM,
    Q5KM,
}

impl QuantTarget {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q4_k_m" => Ok(QuantTarget::Mixture(Mixture::Q4KM)),
            "q5_k_m" => Ok(QuantTarget::Mixture(Mixture::Q5KM)),
            other => WeightQuant::parse(other)
                .map(QuantTarget::Uniform)
                .map_err(|_| {
                    format!(
                    "unknown quantisation {other:?} (choose q8_0, q6_k, q4_k, q4_0, q4_k_m, q5_k_m)"
                )
                }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantTarget::Uniform(q) => q.name(),
            QuantTarget::Mixture(Mixture::Q4KM) => "q4_k_m",
            QuantTarget::Mixture(Mixture::Q5KM) => "q5_k_m",
        }
    }

    /// The format most tensors get (the report's "quantized" count).
    fn base(self) -> GgmlDType {
        match self {
            QuantTarget::Uniform(q) => ggml_format(q),
            QuantTarget::Mixture(Mixture::Q4KM) => GgmlDType::Q4K,
            QuantTarget::Mixture(Mixture::Q5KM) => GgmlDType::Q5K,
        }
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one
/// between get the larger type.
pub fn use_more_bits(i_layer: usize, n_layers: usize) -> bool {
    let (i, n) = (i_layer as i64, n_layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The layer index in an HF tensor name (`model.layers.{i}.…`).
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The block type of quantisable tensor `name` with `cols` columns under a mixture; `layers`
/// counts the layers in the file (for `use_more_bits`). `None`: no block fits, stays float.
pub fn mixture_format(mix: Mixture, name: &str, cols: usize, layers: usize) -> Option<GgmlDType> {
    let base = match mix {
        Mixture::Q4KM => GgmlDType::Q4K,
        Mixture::Q5KM => GgmlDType::Q5K,
    };
    let more_bits = layer_of(name).is_some_and(|i| use_more_bits(i, layers));
    let attn_v = name.ends_with("self_attn.v_proj.weight");
    let ffn_down = name.ends_with("down_proj.weight");
    let output = name == "lm_head.weight" || name.ends_with("shared_head.head.weight");
    let want = if output || ((attn_v || ffn_down) && more_bits) {
        GgmlDType::Q6K
    } else {
        base
    };
    let fallback = match want {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        _ => GgmlDType::Q8_0,
    };
    [want, fallback]
        .into_iter()
        .find(|f| cols % f.block_size() == 0)
}

/// What `quantize_checkpoint` did.
#[derive(Debug, Default)]
pub struct QuantizeReport {
    pub tensors: usize,
    /// Tensors stored in the requested format.
    pub quantized: usize,
    /// Tensors stored in another block format: rows that did not fit the format's blocks
    /// (q8_0, or a mixture's fallback), or a mixture's larger type (q6_K).
    pub fell_back: usize,
    pub input_bytes: u64,
    pub output_bytes: u64,
}

/// Whether an HF tensor is a matrix worth quantising (see the module doc for the rule).
pub fn is_quantizable(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && !name.ends_with("kv_b_proj.weight")
        && (name.ends_with("_proj.weight")
            || name.ends_with("kv_a_proj_with_mqa.weight")
            || name == "lm_head.weight"
            || name.ends_with("shared_head.head.weight"))
}

const COPIED: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Quantise `src` to `format`, writing `out/model.gguf`, `out/config.json` and the tokenizer files.
/// `out` must not exist (or be empty); it is assembled in a temporary sibling and renamed, so a
/// failed run leaves nothing half-written. `progress(done, total, name)` is called per tensor.
pub fn quantize_checkpoint(
    src: &Path,
    target: QuantTarget,
    out: &Path,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<QuantizeReport, FathomError> {
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(FathomError::io(
            out,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "output directory exists and is not empty",
            ),
        ));
    }
    let cfg = ModelConfig::from_path(src)?;
    let mut store = WeightStore::open(src)?;
    if let Some(q) = &cfg.quantization {
        store = store.with_fp8_block(q.weight_block_size);
    }
    let want = target.base();
    let layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers;
    let names: Vec<String> = store
        .names()
        .filter(|n| !(n.ends_with("_scale_inv") && cfg.quantization.is_some()))
        .cloned()
        .collect();
    let mut report = QuantizeReport::default();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        progress(i, names.len(), name);
        let raw = store.raw(name)?;
        report.input_bytes += raw.bytes.len() as u64;
        let t = store.load_f32(name)?;
        let dtype = if is_quantizable(name, t.dims()) {
            let chosen = match target {
                QuantTarget::Uniform(format) => block_format_for(format, t.dim(1)?),
                QuantTarget::Mixture(mix) => mixture_format(mix, name, t.dim(1)?, layers),
            };
            match chosen {
                Some(f) if f == want => report.quantized += 1,
                Some(_) => report.fell_back += 1,
                None => {}
            }
            chosen.unwrap_or(GgmlDType::F32)
        } else if name.ends_with("embed_tokens.weight") {
            GgmlDType::F16
        } else {
            GgmlDType::F32
        };
        let q = QTensor::quantize(&t, dtype)?;
        report.output_bytes += q.storage_size_in_bytes() as u64;
        tensors.push((name.clone(), q));
    }
    report.tensors = tensors.len();
    progress(names.len(), names.len(), "");

    // The weights are no longer FP8 blocks: drop that part of the config.
    let mut config = cfg.raw.clone();
    if let Some(o) = config.as_object_mut() {
        o.remove("quantization_config");
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| FathomError::io(parent, e))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        out.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("quantized"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| FathomError::io(&tmp, e))?;
    let result = (|| {
        write_fathom_gguf(
            &tmp.join("model.gguf"),
            &config,
            &[
                ("fathom.quantized_from", src.display().to_string()),
                ("fathom.weight_format", target.name().to_string()),
            ],
            &tensors,
        )?;
        let cfg_path = tmp.join("config.json");
        std::fs::write(
            &cfg_path,
            serde_json::to_string_pretty(&config).expect("json"),
        )
        .map_err(|e| FathomError::io(&cfg_path, e))?;
        for f in COPIED {
            let from = src.join(f);
            if from.is_file() {
                std::fs::copy(&from, tmp.join(f)).map_err(|e| FathomError::io(&from, e))?;
            }
        }
        if out.exists() {
            std::fs::remove_dir(out).map_err(|e| FathomError::io(out, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| FathomError::io(out, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_bits_layers_are_llama_cpps() {
        let pick = |n| (0..n).filter(|&i| use_more_bits(i, n)).collect::<Vec<_>>();
        assert_eq!(pick(12), [0, 3, 6, 9, 10, 11]);
        // DeepSeek-V2-Lite's 27 layers.
        assert_eq!(pick(27), [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26]);
    }

    #[test]
    fn mixtures_pick_per_tensor_with_llama_cpps_fallbacks() {
        use GgmlDType::*;
        let f = |mix, name: &str, cols| mixture_format(mix, name, cols, 12);
        for (mix, base, base_fallback) in [(Mixture::Q4KM, Q4K, Q5_0), (Mixture::Q5KM, Q5K, Q5_1)] {
            assert_eq!(f(mix, "lm_head.weight", 512), Some(Q6K));
            assert_eq!(f(mix, "lm_head.weight", 128), Some(Q8_0));
            assert_eq!(
                f(mix, "model.layers.3.self_attn.v_proj.weight", 256),
                Some(Q6K)
            );
            assert_eq!(
                f(mix, "model.layers.4.self_attn.v_proj.weight", 256),
                Some(base)
            );
            assert_eq!(
                f(mix, "model.layers.0.mlp.down_proj.weight", 256),
                Some(Q6K)
            );
            let expert = "model.layers.4.mlp.experts.7.down_proj.weight";
            assert_eq!(f(mix, expert, 256), Some(base));
            let shared = "model.layers.11.mlp.shared_experts.down_proj.weight";
            assert_eq!(f(mix, shared, 256), Some(Q6K));
            // Only the value and down projections get the extra bits.
            assert_eq!(
                f(mix, "model.layers.0.self_attn.q_proj.weight", 256),
                Some(base)
            );
            assert_eq!(f(mix, "model.layers.0.mlp.up_proj.weight", 256), Some(base));
            assert_eq!(
                f(mix, "model.layers.4.self_attn.o_proj.weight", 128),
                Some(base_fallback)
            );
            assert_eq!(f(mix, "model.layers.4.self_attn.o_proj.weight", 48), None);
        }
        assert_eq!(
            QuantTarget::parse("Q4_K_M"),
            Ok(QuantTarget::Mixture(Mixture::Q4KM))
        );
        assert_eq!(
            QuantTarget::parse("q8_0"),
            Ok(QuantTarget::Uniform(WeightQuant::Q8_0))
        );
        assert!(QuantTarget::parse("q3_k_m").unwrap_err().contains("q5_k_m"));
    }
}
