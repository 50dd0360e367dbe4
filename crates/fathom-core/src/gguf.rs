//! GGUF checkpoints: llama.cpp's files (`deepseek2`, `qwen2`, `llama`) and the ones
//! `fathom quantize` writes.
//!
//! A llama.cpp file is translated on the fly into the Hugging Face view the model code reads:
//! its metadata becomes a `config.json` value ([`GgufCheckpoint::hf_config`]), its tensor names map
//! to HF names, and its layout quirks are undone per tensor:
//! - routed experts are stacked 3-D (`ffn_*_exps` [E, out, in]); each expert is a contiguous byte
//!   range, so one expert is a slice of the stored blocks, never dequantised;
//! - MLA's `kv_b_proj` is split into `attn_k_b` (transposed, [H, r, d_nope]) and `attn_v_b`
//!   ([H, d_v, r]); they are joined back into [H·(d_nope+d_v), r] (held f32, as the absorbed
//!   decode reads it);
//! - Llama's q/k rows are permuted for llama.cpp's interleaved RoPE; the permutation is undone on
//!   whole rows (still quantised);
//! - YaRN: llama.cpp stores `yarn_log_multiplier` = 0.1·mscale_all_dim and no `mscale`; it assumes
//!   mscale = mscale_all_dim (true of every released DeepSeek model), and so do we;
//! - MTP modules are not converted by llama.cpp (`skip_mtp`), so GGUF models have none;
//! - Llama 3 RoPE scaling arrives as the `rope_freqs` tensor (per-frequency divisors).
//!
//! Files Fathom writes keep HF tensor names and embed the `config.json` they came from under
//! `fathom.config_json`, so nothing is translated. Block-quantised tensors are handed to the
//! projections as stored ([`QuantizedSource`]); everything else is dequantised to f32.

use crate::config::{ModelConfig, QuantizedSource, RopeScaling, StoredBlocks};
use crate::error::{FathomError, Result};
use crate::gguf_header::{read_header, Header, StoredType};
use candle_core::quantized::gguf_file::Value as GValue;
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use fathom_runtime::WeightBytes;
use memmap2::Mmap;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// Metadata key holding the HF config of a Fathom-written file.
pub const FATHOM_CONFIG_KEY: &str = "fathom.config_json";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// HF tensor names, config embedded (`fathom quantize`).
    Fathom,
    /// llama.cpp names and metadata of this `general.architecture`.
    DeepSeek2,
    Qwen2,
    Llama,
}

/// Where an HF tensor lives in a llama.cpp file.
#[derive(Debug)]
enum Source {
    Tensor(String),
    /// Expert `index` of a stacked [E, out, in] tensor.
    Expert(String, usize),
    /// kv_b_proj rebuilt from attn_k_b and attn_v_b.
    KvB {
        k_b: String,
        v_b: String,
    },
    /// Llama q/k: undo the converter's row permutation for `heads` heads.
    Unpermute(String, usize),
}

pub struct GgufCheckpoint {
    path: PathBuf,
    /// Shared with the projections that use their stored blocks where they lie.
    mmap: std::sync::Arc<Mmap>,
    header: Header,
    layout: Layout,
}

impl std::fmt::Debug for GgufCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GgufCheckpoint({})", self.path.display())
    }
}

fn arch_prefix(layout: Layout) -> &'static str {
    match layout {
        Layout::DeepSeek2 => "deepseek2",
        Layout::Qwen2 => "qwen2",
        Layout::Llama => "llama",
        Layout::Fathom => "fathom",
    }
}

/// Whether a GGUF file's pages are faulted in at load (default); `FATHOM_NO_PREFETCH=1` maps
/// lazily instead (lower RSS when only part of a file is used, slower first tokens).
fn prefetch_weights() -> bool {
    !matches!(
        std::env::var("FATHOM_NO_PREFETCH").as_deref(),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

impl GgufCheckpoint {
    /// Open and validate a `.gguf` file: header, metadata and that every tensor lies inside it.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| FathomError::io(path, e))?;
        let mut options = memmap2::MmapOptions::new();
        if prefetch_weights() {
            // Fault every page in while loading (MAP_POPULATE, as llama.cpp's mmap prefetch):
            // a page first touched mid-decode costs a fault, and one the kernel reclaimed from
            // the page cache in the meantime (proactive reclaim pages out cold *unmapped* file
            // pages) costs a disk read inside the token's time.
            options.populate();
        }
        // SAFETY: read-only map; the file is not expected to change while loaded.
        let mmap = unsafe { options.map(&file) }.map_err(|e| FathomError::io(path, e))?;
        let content = read_header(&mmap).map_err(|e| FathomError::Config {
            file: path.to_path_buf(),
            field: "<gguf header>".into(),
            msg: format!("not a readable GGUF file: {e}"),
        })?;
        let layout = if content.metadata.contains_key(FATHOM_CONFIG_KEY) {
            Layout::Fathom
        } else {
            match content.metadata.get("general.architecture") {
                Some(GValue::String(a)) if a == "deepseek2" => Layout::DeepSeek2,
                Some(GValue::String(a)) if a == "qwen2" => Layout::Qwen2,
                Some(GValue::String(a)) if a == "llama" => Layout::Llama,
                Some(GValue::String(a)) => {
                    return Err(FathomError::Config {
                        file: path.to_path_buf(),
                        field: "general.architecture".into(),
                        msg: format!(
                            "unsupported architecture {a:?} (supported: deepseek2, qwen2, llama)"
                        ),
                    })
                }
                _ => {
                    return Err(FathomError::Config {
                        file: path.to_path_buf(),
                        field: "general.architecture".into(),
                        msg: "missing".into(),
                    })
                }
            }
        };
        let ckpt = GgufCheckpoint {
            path: path.to_path_buf(),
            mmap: std::sync::Arc::new(mmap),
            header: content,
            layout,
        };
        for name in ckpt.header.tensors.keys() {
            ckpt.raw(name)?;
        }
        Ok(ckpt)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Metadata value, for inspection.
    pub fn metadata(&self, key: &str) -> Option<&GValue> {
        self.header.metadata.get(key)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &String> {
        self.header.tensors.keys()
    }

    /// (stored format, row-major shape) of a stored tensor.
    pub fn tensor_info(&self, gguf_name: &str) -> Option<(StoredType, Vec<usize>)> {
        self.header
            .tensors
            .get(gguf_name)
            .map(|i| (i.ty, i.dims.clone()))
    }

    fn err(&self, tensor: &str, msg: impl Into<String>) -> FathomError {
        FathomError::weights(&self.path, tensor, msg)
    }

    fn field_err(&self, field: &str, msg: impl Into<String>) -> FathomError {
        FathomError::Config {
            file: self.path.clone(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    /// (format, row-major dims, byte range in the file) of a stored tensor, bounds-checked.
    fn raw(&self, name: &str) -> Result<(StoredType, Vec<usize>, std::ops::Range<usize>)> {
        let info = self
            .header
            .tensors
            .get(name)
            .ok_or_else(|| self.err(name, "missing from the GGUF file"))?;
        let dims = info.dims.clone();
        let elems = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let (block, block_bytes) = info.ty.block();
        let Some(elems) = elems.filter(|e| e % block == 0) else {
            return Err(self.err(
                name,
                format!(
                    "shape {dims:?} does not fill whole {} blocks of {block}",
                    info.ty
                ),
            ));
        };
        let size = elems / block * block_bytes;
        let start = self.header.data_offset.saturating_add(info.offset) as usize;
        if start
            .checked_add(size)
            .is_none_or(|end| end > self.mmap.len())
        {
            return Err(self.err(
                name,
                format!(
                    "data [{start}, +{size}) runs past the end of the file ({} bytes): truncated or corrupt",
                    self.mmap.len()
                ),
            ));
        }
        Ok((info.ty, dims, start..start + size))
    }

    /// The tensor a single-tensor source names, in its stored format (experts sliced, Llama rows
    /// unpermuted), with its range in the file when it is one (`None`: rewritten). `KvB` is two
    /// tensors and is joined by `load_f32` instead.
    fn slice(&self, src: &Source) -> Result<Slice<'_>> {
        let mapped = |ty, dims, range: std::ops::Range<usize>| Slice {
            ty,
            dims,
            bytes: Cow::Borrowed(&self.mmap[range.clone()]),
            at: Some(range),
        };
        match src {
            Source::Tensor(n) => {
                let (ty, dims, range) = self.raw(n)?;
                Ok(mapped(ty, dims, range))
            }
            Source::Expert(n, e) => {
                let (ty, dims, range) = self.raw(n)?;
                if dims.len() != 3 || *e >= dims[0] {
                    return Err(self.err(
                        n,
                        format!(
                            "expected stacked experts [E, out, in] with E > {e}, found {dims:?}"
                        ),
                    ));
                }
                let per = range.len() / dims[0];
                let start = range.start + e * per;
                Ok(mapped(ty, dims[1..].to_vec(), start..start + per))
            }
            Source::Unpermute(n, heads) => self.unpermute(n, *heads),
            Source::KvB { k_b, .. } => Err(self.err(k_b, "kv_b_proj is two tensors, not one")),
        }
    }

    /// Undo convert_hf_to_gguf's `permute`: rows (head, pair, half) were reordered to
    /// (head, half, pair); whole rows move, so quantised blocks stay intact.
    fn unpermute(&self, name: &str, heads: usize) -> Result<Slice<'_>> {
        let (ty, dims, range) = self.raw(name)?;
        let bytes = &self.mmap[range];
        if dims.len() != 2 || heads == 0 || dims[0] % (2 * heads) != 0 {
            return Err(self.err(
                name,
                format!("cannot undo the RoPE permutation of {dims:?} for {heads} heads"),
            ));
        }
        let rows = dims[0];
        let row_bytes = bytes.len() / rows;
        let half = rows / heads / 2;
        let mut out = vec![0u8; bytes.len()];
        for h in 0..heads {
            for i in 0..half {
                for j in 0..2 {
                    // stored row (h, i, j) ← HF row (h, j, i)
                    let src = (h * half + i) * 2 + j;
                    let dst = (h * 2 + j) * half + i;
                    out[dst * row_bytes..(dst + 1) * row_bytes]
                        .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
                }
            }
        }
        Ok(Slice {
            ty,
            dims,
            bytes: Cow::Owned(out),
            at: None,
        })
    }

    /// A source in its stored blocks (`None` when stored as floats): a range of the mapped file
    /// for whole tensors and experts (zero-copy), a rewritten buffer for Llama's unpermuted rows.
    fn stored_blocks(&self, src: &Source) -> Result<Option<StoredBlocks>> {
        let s = self.slice(src)?;
        let StoredType::Block(format) = s.ty else {
            return Ok(None);
        };
        let bytes = match s.at {
            Some(range) => WeightBytes::shared(self.mmap.clone(), range)
                .expect("raw() checked the range against the file"),
            None => WeightBytes::owned(s.bytes.into_owned()),
        };
        Ok(Some(StoredBlocks {
            format,
            dims: s.dims,
            bytes,
        }))
    }

    fn meta(&self, key: &str) -> Option<&GValue> {
        self.header
            .metadata
            .get(&format!("{}.{key}", arch_prefix(self.layout)))
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>> {
        let full = format!("{}.{key}", arch_prefix(self.layout));
        match self.header.metadata.get(&full) {
            None => Ok(None),
            Some(v) => v
                .to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .or_else(|_| v.to_i32().map(|x| x as u64))
                .map(Some)
                .map_err(|e| self.field_err(&full, e.to_string())),
        }
    }

    fn req_u64(&self, key: &str) -> Result<u64> {
        self.meta_u64(key)?.ok_or_else(|| {
            self.field_err(&format!("{}.{key}", arch_prefix(self.layout)), "missing")
        })
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            // Shortest decimal of the f32 (0.8, not 0.79999998): what the config it came from said.
            Some(GValue::F32(x)) => Ok(Some(x.to_string().parse().unwrap_or(*x as f64))),
            Some(GValue::F64(x)) => Ok(Some(*x)),
            Some(other) => Err(self.field_err(
                &format!("{}.{key}", arch_prefix(self.layout)),
                format!("expected a float, found {:?}", other.value_type()),
            )),
        }
    }

    /// The Hugging Face `config.json` this file describes.
    pub fn hf_config(&self) -> Result<Value> {
        if self.layout == Layout::Fathom {
            let text = match self.header.metadata.get(FATHOM_CONFIG_KEY) {
                Some(GValue::String(s)) => s,
                _ => return Err(self.field_err(FATHOM_CONFIG_KEY, "expected a string")),
            };
            return serde_json::from_str(text)
                .map_err(|e| self.field_err(FATHOM_CONFIG_KEY, e.to_string()));
        }
        let has = |n: &str| self.header.tensors.contains_key(n);
        let layers = self.req_u64("block_count")?;
        let hidden = self.req_u64("embedding_length")?;
        let heads = self.req_u64("attention.head_count")?;
        let vocab = match self.meta_u64("vocab_size")? {
            Some(v) => v,
            None => match self.tensor_info("token_embd.weight") {
                Some((_, d)) => d[0] as u64,
                None => return Err(self.err("token_embd.weight", "missing from the GGUF file")),
            },
        };
        let mut c = json!({
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self.meta_u64("feed_forward_length")?.unwrap_or(0),
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "max_position_embeddings": self.meta_u64("context_length")?.unwrap_or(4096),
            "rms_norm_eps": self.meta_f64("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
            "rope_theta": self.meta_f64("rope.freq_base")?.unwrap_or(10000.0),
            "tie_word_embeddings": !has("output.weight"),
            "hidden_act": "silu",
        });
        let o = c.as_object_mut().expect("object");
        if let Some(id) = self.token_id("tokenizer.ggml.bos_token_id") {
            o.insert("bos_token_id".into(), json!(id));
        }
        if let Some(id) = self.token_id("tokenizer.ggml.eos_token_id") {
            o.insert("eos_token_id".into(), json!(id));
        }
        match self.layout {
            Layout::DeepSeek2 => {
                let rope = self.req_u64("rope.dimension_count")?;
                let kv_lora = self.req_u64("attention.kv_lora_rank")?;
                let k_len = match self.meta_u64("attention.key_length_mla")? {
                    Some(k) => k,
                    None => self.req_u64("attention.key_length")?,
                };
                let v_len = match self.meta_u64("attention.value_length_mla")? {
                    Some(v) => v,
                    None => self.req_u64("attention.value_length")?,
                };
                let gating = self.meta_u64("expert_gating_func")?.unwrap_or(1);
                let sigmoid = gating == 2 || has("blk.1.exp_probs_b.bias");
                let groups = self.meta_u64("expert_group_count")?.unwrap_or(1);
                let experts = self.meta_u64("expert_count")?.unwrap_or(0);
                o.insert(
                    "model_type".into(),
                    json!(if sigmoid {
                        "deepseek_v3"
                    } else {
                        "deepseek_v2"
                    }),
                );
                o.insert("num_key_value_heads".into(), json!(heads));
                o.insert("kv_lora_rank".into(), json!(kv_lora));
                o.insert(
                    "q_lora_rank".into(),
                    json!(self.meta_u64("attention.q_lora_rank")?),
                );
                o.insert("qk_rope_head_dim".into(), json!(rope));
                o.insert("qk_nope_head_dim".into(), json!(k_len - rope));
                o.insert("v_head_dim".into(), json!(v_len));
                o.insert(
                    "first_k_dense_replace".into(),
                    json!(self.meta_u64("leading_dense_block_count")?.unwrap_or(0)),
                );
                o.insert("moe_layer_freq".into(), json!(1));
                o.insert("num_nextn_predict_layers".into(), json!(0));
                if experts > 0 {
                    o.insert("n_routed_experts".into(), json!(experts));
                    o.insert(
                        "num_experts_per_tok".into(),
                        json!(self.req_u64("expert_used_count")?),
                    );
                    o.insert(
                        "n_shared_experts".into(),
                        json!(self.meta_u64("expert_shared_count")?.unwrap_or(0)),
                    );
                    o.insert(
                        "moe_intermediate_size".into(),
                        json!(self.req_u64("expert_feed_forward_length")?),
                    );
                    o.insert(
                        "routed_scaling_factor".into(),
                        json!(self.meta_f64("expert_weights_scale")?.unwrap_or(1.0)),
                    );
                    let norm = matches!(self.meta("expert_weights_norm"), Some(GValue::Bool(true)));
                    o.insert("norm_topk_prob".into(), json!(norm));
                    o.insert(
                        "scoring_func".into(),
                        json!(if sigmoid { "sigmoid" } else { "softmax" }),
                    );
                    let method = if sigmoid {
                        "noaux_tc"
                    } else if groups > 1 {
                        "group_limited_greedy"
                    } else {
                        "greedy"
                    };
                    o.insert("topk_method".into(), json!(method));
                    o.insert("n_group".into(), json!(groups));
                    o.insert(
                        "topk_group".into(),
                        json!(self.meta_u64("expert_group_used_count")?.unwrap_or(1)),
                    );
                }
                if let Some(GValue::String(t)) = self.meta("rope.scaling.type") {
                    if t == "yarn" {
                        // llama.cpp keeps 0.1·mscale_all_dim and assumes mscale = mscale_all_dim.
                        let m = 10.0
                            * self
                                .meta_f64("rope.scaling.yarn_log_multiplier")?
                                .unwrap_or(0.1);
                        o.insert("rope_scaling".into(), json!({
                            "type": "yarn",
                            "factor": self.meta_f64("rope.scaling.factor")?.unwrap_or(1.0),
                            "original_max_position_embeddings": self.meta_u64("rope.scaling.original_context_length")?.unwrap_or(4096),
                            "beta_fast": self.meta_f64("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
                            "beta_slow": self.meta_f64("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
                            "mscale": m,
                            "mscale_all_dim": m,
                        }));
                    }
                }
            }
            Layout::Qwen2 | Layout::Llama => {
                o.insert(
                    "model_type".into(),
                    json!(if self.layout == Layout::Qwen2 {
                        "qwen2"
                    } else {
                        "llama"
                    }),
                );
                o.insert(
                    "num_key_value_heads".into(),
                    json!(self.meta_u64("attention.head_count_kv")?.unwrap_or(heads)),
                );
                if let Some(k) = self.meta_u64("attention.key_length")? {
                    o.insert("head_dim".into(), json!(k));
                }
                if self.layout == Layout::Llama {
                    o.insert("attention_bias".into(), json!(has("blk.0.attn_q.bias")));
                }
                if let (Some(GValue::String(t)), Some(f)) = (
                    self.meta("rope.scaling.type"),
                    self.meta_f64("rope.scaling.factor")?,
                ) {
                    if t == "linear" {
                        o.insert(
                            "rope_scaling".into(),
                            json!({"type": "linear", "factor": f}),
                        );
                    }
                }
            }
            Layout::Fathom => unreachable!(),
        }
        Ok(c)
    }

    fn token_id(&self, key: &str) -> Option<u64> {
        self.header
            .metadata
            .get(key)
            .and_then(|v| v.to_u32().map(u64::from).or_else(|_| v.to_u64()).ok())
    }

    /// The model config (HF semantics), with GGUF-only details applied.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let raw = self.hf_config()?;
        let mut cfg = ModelConfig::from_value(raw, &self.path)?;
        if self.header.tensors.contains_key("rope_freqs.weight") {
            let f = self.load_gguf_f32("rope_freqs.weight")?;
            let factors: Vec<f32> = f.flatten_all()?.to_vec1()?;
            cfg.rope_scaling = Some(RopeScaling::FreqFactors {
                factors: factors.into_iter().map(f64::from).collect(),
            });
        }
        Ok(cfg)
    }

    fn source(&self, hf: &str) -> Option<Source> {
        if self.layout == Layout::Fathom {
            return Some(Source::Tensor(hf.to_string()));
        }
        let t = |s: String| Some(Source::Tensor(s));
        match hf {
            "model.embed_tokens.weight" => return t("token_embd.weight".into()),
            "model.norm.weight" => return t("output_norm.weight".into()),
            "lm_head.weight" => return t("output.weight".into()),
            _ => {}
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (layer, name) = rest.split_once('.')?;
        let blk = format!("blk.{layer}");
        let (module, kind) = name.rsplit_once('.')?; // kind: weight | bias | e_score_correction_bias
        if let Some(e) = module.strip_prefix("mlp.experts.") {
            let (idx, proj) = e.split_once('.')?;
            let stacked = match proj {
                "gate_proj" => "ffn_gate_exps",
                "up_proj" => "ffn_up_exps",
                "down_proj" => "ffn_down_exps",
                _ => return None,
            };
            return Some(Source::Expert(
                format!("{blk}.{stacked}.{kind}"),
                idx.parse().ok()?,
            ));
        }
        let gg = match module {
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" => "ffn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.q_a_proj" => "attn_q_a",
            "self_attn.q_a_layernorm" => "attn_q_a_norm",
            "self_attn.q_b_proj" => "attn_q_b",
            "self_attn.kv_a_proj_with_mqa" => "attn_kv_a_mqa",
            "self_attn.kv_a_layernorm" => "attn_kv_a_norm",
            "self_attn.kv_b_proj" => {
                let old = format!("{blk}.attn_kv_b.weight");
                if self.header.tensors.contains_key(&old) {
                    return t(old);
                }
                return Some(Source::KvB {
                    k_b: format!("{blk}.attn_k_b.weight"),
                    v_b: format!("{blk}.attn_v_b.weight"),
                });
            }
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            "mlp.gate" if kind == "e_score_correction_bias" => {
                return t(format!("{blk}.exp_probs_b.bias"))
            }
            "mlp.gate" => "ffn_gate_inp",
            "mlp.shared_experts.gate_proj" => "ffn_gate_shexp",
            "mlp.shared_experts.up_proj" => "ffn_up_shexp",
            "mlp.shared_experts.down_proj" => "ffn_down_shexp",
            _ => return None,
        };
        let name = format!("{blk}.{gg}.{kind}");
        if self.layout == Layout::Llama && kind == "weight" {
            let heads = |key: &str| self.meta_u64(key).ok().flatten().map(|h| h as usize);
            match gg {
                "attn_q" => return Some(Source::Unpermute(name, heads("attention.head_count")?)),
                "attn_k" => {
                    let h = heads("attention.head_count_kv")
                        .or_else(|| heads("attention.head_count"))?;
                    return Some(Source::Unpermute(name, h));
                }
                _ => {}
            }
        }
        t(name)
    }

    fn present(&self, src: &Source) -> bool {
        let has = |n: &str| self.header.tensors.contains_key(n);
        match src {
            Source::Tensor(n) | Source::Expert(n, _) | Source::Unpermute(n, _) => has(n),
            Source::KvB { k_b, v_b } => has(k_b) && has(v_b),
        }
    }

    /// Whether an HF-named tensor can be read from this file.
    pub fn contains(&self, hf: &str) -> bool {
        self.source(hf).is_some_and(|s| self.present(&s))
    }

    fn load_gguf_f32(&self, name: &str) -> Result<Tensor> {
        self.slice(&Source::Tensor(name.to_string()))?
            .to_f32(self, name)
    }

    /// An HF-named tensor as f32 (dequantised when stored in blocks).
    pub fn load_f32(&self, hf: &str) -> Result<Tensor> {
        let src = self
            .source(hf)
            .filter(|s| self.present(s))
            .ok_or_else(|| self.err(hf, "missing from the GGUF file"))?;
        match src {
            Source::KvB { k_b, v_b } => {
                let k = self.load_gguf_f32(&k_b)?; // [H, r, d_nope]
                let v = self.load_gguf_f32(&v_b)?; // [H, d_v, r]
                let (h, r, _) = k.dims3()?;
                let joined = Tensor::cat(&[&k.transpose(1, 2)?, &v], 1)?; // [H, d_nope + d_v, r]
                let rows = joined.dim(1)?;
                Ok(joined.reshape((h * rows, r))?.contiguous()?)
            }
            other => self.slice(&other)?.to_f32(self, hf),
        }
    }

    /// The tokenizer the metadata describes (byte-level BPE, llama.cpp's `gpt2` model).
    pub fn tokenizer(&self) -> Result<crate::tokenizer::TextTokenizer> {
        crate::tokenizer::TextTokenizer::from_gguf_metadata(&self.header.metadata, &self.path)
    }
}

/// A tensor's stored bytes, borrowed from the map (`at`: their range in the file) or rewritten.
struct Slice<'a> {
    ty: StoredType,
    dims: Vec<usize>,
    bytes: Cow<'a, [u8]>,
    at: Option<std::ops::Range<usize>>,
}

impl Slice<'_> {
    /// The values as an f32 tensor (block formats through the runtime's decoding).
    fn to_f32(&self, ckpt: &GgufCheckpoint, name: &str) -> Result<Tensor> {
        let n: usize = self.dims.iter().product();
        let b = &self.bytes;
        let values: Vec<f32> = match self.ty {
            StoredType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            StoredType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            StoredType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            StoredType::Block(f) => {
                let mut out = vec![0f32; n];
                fathom_runtime::quant::dequantize(f, b, &mut out);
                out
            }
        };
        if values.len() != n {
            return Err(ckpt.err(
                name,
                format!("{} values for shape {:?}", values.len(), self.dims),
            ));
        }
        Ok(Tensor::from_vec(values, self.dims.clone(), &Device::Cpu)?)
    }
}

impl QuantizedSource for GgufCheckpoint {
    fn quantized(&self, hf: &str) -> Result<Option<StoredBlocks>> {
        let Some(src) = self.source(hf).filter(|s| self.present(s)) else {
            return Ok(None);
        };
        if matches!(src, Source::KvB { .. }) {
            return Ok(None);
        }
        self.stored_blocks(&src)
    }
}

/// Model construction reads non-projection tensors (norms, embeddings, routers) through this, via
/// `SourceBackend`; the same checkpoint, shared, is the [`QuantizedSource`] of the projections.
impl crate::weights::TensorSource for std::sync::Arc<GgufCheckpoint> {
    fn load_f32(&self, name: &str) -> Result<Tensor> {
        GgufCheckpoint::load_f32(self, name)
    }
    fn contains(&self, name: &str) -> bool {
        GgufCheckpoint::contains(self, name)
    }
    fn file_of(&self, _name: &str) -> PathBuf {
        self.path.clone()
    }
}

/// Write a Fathom GGUF: HF tensor names, `config` embedded under [`FATHOM_CONFIG_KEY`].
/// Atomic: written to a temporary file beside `path`, synced, then renamed.
pub fn write_fathom_gguf(
    path: &Path,
    config: &Value,
    extra: &[(&str, String)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    let tmp = path.with_extension("gguf.tmp");
    let cfg_text = serde_json::to_string(config).expect("json");
    let mut meta: Vec<(String, GValue)> = vec![
        (
            "general.architecture".into(),
            GValue::String("fathom".into()),
        ),
        (FATHOM_CONFIG_KEY.into(), GValue::String(cfg_text)),
    ];
    for (k, v) in extra {
        meta.push((k.to_string(), GValue::String(v.clone())));
    }
    let meta_refs: Vec<(&str, &GValue)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    {
        let file = std::fs::File::create(&tmp).map_err(|e| FathomError::io(&tmp, e))?;
        let mut w = std::io::BufWriter::new(file);
        candle_core::quantized::gguf_file::write(&mut w, &meta_refs, &tensor_refs)?;
        let file = w
            .into_inner()
            .map_err(|e| FathomError::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| FathomError::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| FathomError::io(path, e))?;
    Ok(())
}

/// The single `.gguf` file a path names: the file itself, or the only one in a directory.
pub fn find_gguf(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        return (path.extension().and_then(|e| e.to_str()) == Some("gguf"))
            .then(|| path.to_path_buf());
    }
    let entries = std::fs::read_dir(path).ok()?;
    let mut ggufs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("gguf"))
        .collect();
    let has_safetensors = path.join("model.safetensors").exists()
        || path.join("model.safetensors.index.json").exists();
    if ggufs.len() == 1 && !has_safetensors {
        ggufs.pop()
    } else {
        None
    }
}
