//! The causal language model: embeddings → decoder layers → final norm → lm_head, plus DeepSeek-V3's
//! MTP modules. One definition for DeepSeek-V3/V2, Qwen2 and Llama, used by training and inference.

use crate::cache::{KvCache, LayerCache, Segment};
use crate::decoder::DecoderLayer;
use crate::embedding::Embeddings;
use crate::linear::Linear;
use crate::moe::Routing;
use crate::mtp::MtpModule;
use crate::norm::RmsNorm;
use crate::rope::Rope;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use fathom_core::{FathomError, ModelConfig, WeightStore};
use fathom_runtime::decode::DecodePlan;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct CausalLm {
    pub cfg: ModelConfig,
    pub embed_tokens: Embeddings,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// [vocab, hidden]; the embedding matrix itself when tied. Quantisable like any projection:
    /// at decode it is the largest single matrix read per token.
    pub lm_head: Linear,
    pub rope: Rope,
    pub mtp: Vec<MtpModule>,
    pub device: Device,
    pub dtype: DType,
    /// The planned decode step, made on first use ([`CausalLm::decode_plan`]).
    planned: std::sync::OnceLock<Option<std::sync::Arc<DecodePlan>>>,
}

/// Output of a forward pass with the extras training and speculative decoding need.
pub struct ForwardOutput {
    /// [b, s, hidden] after the final norm.
    pub hidden: Tensor,
    /// Routing of every MoE layer, in layer order.
    pub routings: Vec<(usize, Routing)>,
}

impl CausalLm {
    /// Build from a VarBuilder (a checkpoint or fresh variables). MTP modules are built when the
    /// config asks for them and `with_mtp` says they exist.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder, with_mtp: bool) -> Result<Self> {
        let dtype = vb.dtype();
        let device = vb.device().clone();
        let m = vb.pp("model");
        let embed_tokens = Embeddings::load(
            m.pp("embed_tokens"),
            cfg.vocab_size,
            cfg.hidden_size,
            &cfg.weights,
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(m.pp("layers").pp(i), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let quantizing = cfg.weights.quantize.is_some() || cfg.weights.stored.is_some();
        let lm_head = if cfg.tie_word_embeddings && quantizing {
            // Tied but quantised: the head reads the embedding matrix in the quantised form (as
            // stored in a GGUF file, else quantised now); lookups read the same stored blocks, or
            // the f32 rows when the table is dense.
            Linear::load(
                m.pp("embed_tokens"),
                cfg.vocab_size,
                cfg.hidden_size,
                false,
                &cfg.weights,
            )?
        } else if cfg.tie_word_embeddings {
            let table = embed_tokens
                .dense()
                .expect("no file or plan: a dense table");
            Linear::dense_weight(table.clone())
        } else if vb.contains_tensor("lm_head.weight") || cfg.weights.stored.is_some() {
            Linear::load(
                vb.pp("lm_head"),
                cfg.vocab_size,
                cfg.hidden_size,
                false,
                &cfg.weights,
            )?
        } else {
            // Fresh variables (training): N(0, 0.02) as the embeddings.
            Linear::dense_weight(vb.pp("lm_head").get_with_hints(
                (cfg.vocab_size, cfg.hidden_size),
                "weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?)
        };
        let mtp = if with_mtp {
            (0..cfg.num_nextn_predict_layers)
                .map(|k| {
                    let idx = cfg.num_hidden_layers + k;
                    MtpModule::load(m.pp("layers").pp(idx), cfg, idx)
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            vec![]
        };
        Ok(CausalLm {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg, dtype, &device)?,
            mtp,
            device,
            dtype,
            planned: Default::default(),
        })
    }

    /// Load a Hugging Face checkpoint directory. Weights are converted to `dtype` tensor by tensor;
    /// FP8 block weights are dequantised. MTP modules load when their tensors are present.
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, FathomError> {
        Self::load_quantized(dir, dtype, device, None)
    }

    /// As `load`, quantising every projection (attention, MLPs, experts, MTP `eh_proj`, lm_head)
    /// to `quant` tensor by tensor as it is read; embeddings, norms and routers stay in `dtype`.
    /// `path` may also be a GGUF file (or a directory holding one): its block-quantised tensors
    /// are used as stored (`quant` then only applies to tensors it holds as floats).
    pub fn load_quantized(
        path: &Path,
        dtype: DType,
        device: &Device,
        quant: Option<fathom_core::WeightQuant>,
    ) -> std::result::Result<Self, FathomError> {
        if let Some(file) = fathom_core::find_gguf(path) {
            return Self::load_gguf(&file, dtype, device, quant);
        }
        let dir = path;
        let mut cfg = ModelConfig::from_path(dir)?;
        cfg.weights.quantize = quant;
        let mut store = WeightStore::open(dir)?;
        if let Some(q) = &cfg.quantization {
            store = store.with_fp8_block(q.weight_block_size);
        }
        let vb = VarBuilder::from_backend(
            Box::new(fathom_core::SourceBackend(store)),
            dtype,
            device.clone(),
        );
        Self::build(&cfg, vb)
    }

    /// Load a GGUF file (llama.cpp's `deepseek2`/`qwen2`/`llama`, or one `fathom quantize` wrote).
    pub fn load_gguf(
        file: &Path,
        dtype: DType,
        device: &Device,
        quant: Option<fathom_core::WeightQuant>,
    ) -> std::result::Result<Self, FathomError> {
        let ckpt = std::sync::Arc::new(fathom_core::GgufCheckpoint::open(file)?);
        let mut cfg = ckpt.model_config()?;
        cfg.weights.quantize = quant;
        cfg.weights.stored = Some(ckpt.clone());
        let backend = fathom_core::SourceBackend(ckpt);
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        let mut model = Self::build(&cfg, vb)?;
        // Every tensor is copied out by now: unmap the file so its pages leave resident memory.
        model.cfg.weights.stored = None;
        Ok(model)
    }

    /// Build from a checkpoint's VarBuilder; MTP modules when the config asks for them and the
    /// checkpoint holds them.
    fn build(cfg: &ModelConfig, vb: VarBuilder) -> std::result::Result<Self, FathomError> {
        let has_mtp = cfg.num_nextn_predict_layers > 0
            && vb.contains_tensor(&format!(
                "model.layers.{}.eh_proj.weight",
                cfg.num_hidden_layers
            ));
        // Errors from the backend already name the file and tensor; keep the message as is.
        CausalLm::new(cfg, vb, has_mtp).map_err(|e| match e {
            candle_core::Error::Msg(m) => FathomError::Load(m),
            other => FathomError::Candle(other),
        })
    }

    /// Weight bytes one decode step reads: every always-on matrix in its stored format, the
    /// top-k routed experts of each MoE layer (k/E of the expert bytes, as decode touches only
    /// the selected ones), shared experts, kv_b_proj, routers and lm_head; one embedding row.
    /// Divided into measured memory bandwidth it gives the decode roofline. MTP modules excluded.
    pub fn weight_bytes_per_token(&self) -> usize {
        use crate::decoder::{Attention, FeedForward};
        use crate::mla::QueryProj;
        let lin = |l: &Linear| l.storage().1;
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mlp = |m: &crate::mlp::Mlp| lin(&m.gate_proj) + lin(&m.up_proj) + lin(&m.down_proj);
        let mut total = lin(&self.lm_head) + self.embed_tokens.row_bytes();
        for layer in &self.layers {
            total += match &layer.attn {
                Attention::Mla(m) => {
                    let q = match &m.q {
                        QueryProj::Full { q_proj } => lin(q_proj),
                        QueryProj::LowRank {
                            q_a_proj, q_b_proj, ..
                        } => lin(q_a_proj) + lin(q_b_proj),
                    };
                    q + lin(&m.kv_a_proj_with_mqa) + dense(&m.kv_b_proj) + lin(&m.o_proj)
                }
                Attention::Gqa(g) => g.projections().iter().map(|l| lin(l)).sum(),
            };
            total += match &layer.ffn {
                FeedForward::Dense(m) => mlp(m),
                FeedForward::Moe(moe) => {
                    let experts: usize = moe.experts.iter().map(mlp).sum();
                    let k = moe.gate.cfg.num_experts_per_tok;
                    experts * k / moe.experts.len().max(1)
                        + moe.shared_experts.as_ref().map_or(0, mlp)
                        + dense(&moe.gate.weight)
                }
            };
        }
        total
    }

    /// The storage format most projection bytes are held in (e.g. "q8_0", "f32").
    pub fn weight_format(&self) -> String {
        use crate::decoder::FeedForward;
        let mut by_format: std::collections::BTreeMap<String, usize> = Default::default();
        let mut add = |l: &Linear| {
            let (f, b) = l.storage();
            *by_format.entry(f).or_default() += b;
        };
        add(&self.lm_head);
        for layer in &self.layers {
            let mlps: Vec<&crate::mlp::Mlp> = match &layer.ffn {
                FeedForward::Dense(m) => vec![m],
                FeedForward::Moe(moe) => moe.experts.iter().collect(),
            };
            for m in mlps {
                for l in [&m.gate_proj, &m.up_proj, &m.down_proj] {
                    add(l);
                }
            }
        }
        by_format
            .into_iter()
            .max_by_key(|(_, b)| *b)
            .map(|(f, _)| f)
            .unwrap_or_else(|| "f32".into())
    }

    /// The fastest cache for this architecture: MLA's latent cache (absorbed decode) for
    /// DeepSeek models, the plain k/v cache for GQA models.
    pub fn new_cache(&self) -> KvCache {
        self.fastest_cache(self.layers.len())
    }

    /// The same kind of cache for one MTP module's block (speculative drafting).
    pub fn new_mtp_cache(&self) -> KvCache {
        self.fastest_cache(1)
    }

    fn fastest_cache(&self, layers: usize) -> KvCache {
        if self.cfg.mla.is_some() {
            KvCache::new_latent(layers)
        } else {
            KvCache::new(layers)
        }
    }

    /// The plain cache (full k and v per head): the reference the latent cache is tested against.
    pub fn new_plain_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// The runtime's planned single-sequence decode step for this model ([`crate::planned`]),
    /// made on first use from the weights as they are then; `None` where it does not apply
    /// (not f32 on the CPU, trained variables) or when the environment sets
    /// `FATHOM_PLANNED_DECODE=0` (the plain path, for side-by-side measurements).
    pub fn decode_plan(&self) -> Option<&DecodePlan> {
        self.planned
            .get_or_init(|| {
                if std::env::var("FATHOM_PLANNED_DECODE").is_ok_and(|v| v == "0") {
                    return None;
                }
                crate::planned::describe(self)
                    .and_then(DecodePlan::new)
                    .ok()
                    .map(std::sync::Arc::new)
            })
            .as_deref()
    }

    /// Logits [vocab] of `token` at position `pos` through the planned step, appending its
    /// rows to `cache`; `Ok(None)` when the plan does not apply to this model or cache (the
    /// caller runs the plain path: the latent cache for MLA, the grouped one otherwise).
    pub fn decode_planned(
        &self,
        token: u32,
        pos: usize,
        cache: &mut KvCache,
    ) -> Result<Option<Vec<f32>>> {
        let Some(plan) = self.decode_plan() else {
            return Ok(None);
        };
        let latent = self.cfg.mla.is_some();
        if cache.layers.len() != self.layers.len()
            || cache.layers.iter().any(|c| c.latent_mode != latent)
        {
            return Ok(None);
        }
        let grouped = (self.cfg.num_key_value_heads, self.cfg.head_dim);
        let mut store = crate::planned::PlanCache { cache, grouped };
        plan.step(token, pos, &mut store)
            .map(Some)
            .map_err(candle_core::Error::Msg)
    }

    /// Token embeddings for ids [b, s].
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        ids.dims2()?;
        self.embed_tokens.lookup(ids)
    }

    /// Hidden states after the final norm, for ids [b, s] at positions offset..offset+s.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        offset: usize,
        mut cache: Option<&mut KvCache>,
    ) -> Result<ForwardOutput> {
        let mut x = self.embed(ids)?;
        let mut routings = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let lc: Option<&mut LayerCache> = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let (y, r) = layer.forward(&x, &self.rope, offset, lc)?;
            if let Some(r) = r {
                routings.push((i, r));
            }
            x = y;
        }
        Ok(ForwardOutput {
            hidden: self.norm.forward(&x)?,
            routings,
        })
    }

    /// Continuous batching's forward: `ids` are the rows of several sequences packed one after
    /// another (`segments[j]` says which rows belong to sequence j and at which position its first
    /// row sits; `caches[j]` is its cache, appended to). Returns logits [rows.len(), vocab] for the
    /// packed rows listed in `rows` (typically each sequence's last row). Matches running each
    /// sequence alone through `forward` (tests/packed.rs).
    pub fn forward_packed(
        &self,
        ids: &[u32],
        segments: &[Segment],
        caches: &mut [&mut KvCache],
        rows: &[u32],
    ) -> Result<Tensor> {
        let picked = self
            .forward_packed_hidden(ids, segments, caches)?
            .index_select(&Tensor::new(rows, &self.device)?, 0)?;
        self.logits(&picked)
    }

    /// As [`forward_packed`](Self::forward_packed), returning the final normed hidden state of every
    /// packed row [T, hidden] (speculative decoding feeds them to the MTP module).
    pub fn forward_packed_hidden(
        &self,
        ids: &[u32],
        segments: &[Segment],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        if segments.len() != caches.len() {
            candle_core::bail!("{} segments but {} caches", segments.len(), caches.len())
        }
        let covered: usize = segments.iter().map(|s| s.len).sum();
        if covered != ids.len() || segments.iter().any(|s| s.start + s.len > ids.len()) {
            candle_core::bail!("segments do not tile the {} packed rows", ids.len())
        }
        let mut x = self.embed(&Tensor::new(ids, &self.device)?.unsqueeze(0)?)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let mut layer_caches: Vec<&mut LayerCache> =
                caches.iter_mut().map(|c| &mut c.layers[i]).collect();
            x = layer.forward_packed(&x, &self.rope, segments, &mut layer_caches)?;
        }
        self.norm.forward(&x.squeeze(0)?)
    }

    /// Logits [b, s, vocab] from normed hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Logits [b, s, vocab] for ids [b, s] (u32) at positions offset..; updates `cache` when given.
    pub fn forward(
        &self,
        ids: &Tensor,
        offset: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let out = self.forward_hidden(ids, offset, cache)?;
        self.logits(&out.hidden)
    }

    /// Logits of MTP module 1 over a whole sequence [b, n] (no cache): position i predicts t_{i+2}
    /// from h_i and t_{i+1}; returns [b, n − 1, vocab].
    pub fn mtp_logits(&self, ids: &Tensor) -> Result<Tensor> {
        let Some(module) = self.mtp.first() else {
            candle_core::bail!("this model has no MTP modules")
        };
        let n = ids.dim(1)?;
        let h = self.forward_hidden(ids, 0, None)?.hidden;
        let prev = h.narrow(1, 0, n - 1)?;
        let next = self.embed(&ids.narrow(1, 1, n - 1)?)?;
        let hk = module.forward(&prev, &next, &self.rope, 0, None)?;
        self.logits(&hk)
    }

    /// Parameters: (total, active per token). Active counts the shared experts and only
    /// `num_experts_per_tok` routed experts per MoE layer; MTP modules are excluded from both.
    pub fn param_counts(&self) -> (usize, usize) {
        param_counts(&self.cfg)
    }
}

/// Parameter counts from the config alone (main model; MTP excluded), (total, active).
pub fn param_counts(cfg: &ModelConfig) -> (usize, usize) {
    let d = cfg.hidden_size;
    let embed = cfg.vocab_size * d;
    let head = if cfg.tie_word_embeddings {
        0
    } else {
        cfg.vocab_size * d
    };
    let attn = match &cfg.mla {
        Some(m) => {
            let h = cfg.num_attention_heads;
            let q = match m.q_lora_rank {
                None => d * h * m.qk_head_dim(),
                Some(r) => d * r + r + r * h * m.qk_head_dim(),
            };
            q + d * (m.kv_lora_rank + m.qk_rope_head_dim)
                + m.kv_lora_rank
                + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
                + h * m.v_head_dim * d
        }
        None => {
            let (h, kv, hd) = (
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
            );
            let bias = if cfg.qkv_bias {
                h * hd + 2 * kv * hd
            } else {
                0
            } + if cfg.o_bias { d } else { 0 };
            d * h * hd + 2 * d * kv * hd + h * hd * d + bias
        }
    };
    let mlp = |inter: usize| 3 * d * inter;
    let (mut total, mut active) = (embed + head + d, embed + head + d);
    for i in 0..cfg.num_hidden_layers {
        let norms = 2 * d;
        total += attn + norms;
        active += attn + norms;
        match (&cfg.moe, cfg.is_moe_layer(i)) {
            (Some(m), true) => {
                let expert = mlp(m.moe_intermediate_size);
                let shared = m.n_shared_experts * expert;
                let gate = m.n_routed_experts * d;
                total += m.n_routed_experts * expert + shared + gate;
                active += m.num_experts_per_tok * expert + shared + gate;
            }
            _ => {
                total += mlp(cfg.intermediate_size);
                active += mlp(cfg.intermediate_size);
            }
        }
    }
    (total, active)
}
