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

/// What `quantize_checkpoint` did.
#[derive(Debug, Default)]
pub struct QuantizeReport {
    pub tensors: usize,
    /// Tensors stored in the requested format.
    pub quantized: usize,
    /// Tensors whose rows did not fit the format's blocks and were stored as q8_0 instead.
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
    format: WeightQuant,
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
    let want = ggml_format(format);
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
            let chosen = block_format_for(format, t.dim(1)?);
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
                ("fathom.weight_format", format.name().to_string()),
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
