//! The model described to the runtime's planned decode step ([`fathom_runtime::decode`]): the
//! same weights (quantised blocks where they lie, dense tensors read in place), the same norms,
//! rope tables and routing rule as the layers here, and this crate's caches as the step's store,
//! so a planned step and a plain one can follow each other on one sequence. Tested against the
//! plain path in `tests/planned_decode.rs`.

use crate::cache::{KvCache, LayerCache};
use crate::decoder::{Attention, FeedForward};
use crate::embedding::Embeddings;
use crate::linear::{Linear, Weight};
use crate::mla::QueryProj;
use crate::mlp::Mlp;
use crate::model::CausalLm;
use crate::moe::{route_row, Gate};
use crate::norm::RmsNorm;
use crate::rope::RopeLayout;
use candle_core::{CpuStorage, DType, Storage, Tensor};
use fathom_runtime::decode::{
    self, DenseF32, KvStore, LayerKv, Matrix, MlaDims, MlaQuery, Norm, Proj,
};

fn vector(t: &Tensor, what: &str) -> Result<Vec<f32>, String> {
    Ok(DenseF32::new(t, what)?.to_vec())
}

fn norm(n: &RmsNorm, what: &str) -> Result<Norm, String> {
    Ok(Norm {
        weight: vector(&n.weight, what)?,
        eps: n.eps,
    })
}

fn proj(l: &Linear, what: &str) -> Result<Proj, String> {
    let w = match &l.weight {
        Weight::Dense(t) => Matrix::Dense(DenseF32::new(t, what)?),
        Weight::Quantized(q) => Matrix::Quant(q.clone()),
    };
    let bias = match &l.bias {
        Some(b) => Some(vector(b, &format!("{what} bias"))?),
        None => None,
    };
    Ok(Proj { w, bias })
}

fn mlp(m: &Mlp, what: &str) -> Result<decode::Mlp, String> {
    Ok(decode::Mlp {
        gate: proj(&m.gate_proj, &format!("{what}.gate_proj"))?,
        up: proj(&m.up_proj, &format!("{what}.up_proj"))?,
        down: proj(&m.down_proj, &format!("{what}.down_proj"))?,
    })
}

fn route(gate: &Gate) -> Result<decode::Route, String> {
    let cfg = gate.cfg.clone();
    let bias = match &gate.e_score_correction_bias {
        Some(b) => Some(vector(b, "e_score_correction_bias")?),
        None => None,
    };
    Ok(Box::new(move |logits, out| {
        out.extend(route_row(&cfg, bias.as_deref(), logits))
    }))
}

/// The model in the runtime's terms; `Err` says why it cannot be planned (then the plain path
/// runs): not f32 on the CPU, trained variables, or a cache kind the plan does not read.
pub fn describe(model: &CausalLm) -> Result<decode::Model, String> {
    if model.dtype != DType::F32 || !model.device.is_cpu() {
        return Err(format!("{:?} on {:?}", model.dtype, model.device));
    }
    let mut layers = Vec::with_capacity(model.layers.len());
    for (i, layer) in model.layers.iter().enumerate() {
        let at = |what: &str| format!("model.layers.{i}.{what}");
        let attn = match &layer.attn {
            Attention::Mla(m) => {
                let q = match &m.q {
                    QueryProj::Full { q_proj } => MlaQuery::Full(proj(q_proj, &at("q_proj"))?),
                    QueryProj::LowRank {
                        q_a_proj,
                        q_a_layernorm,
                        q_b_proj,
                    } => MlaQuery::LowRank {
                        a: proj(q_a_proj, &at("q_a_proj"))?,
                        norm: norm(q_a_layernorm, &at("q_a_layernorm"))?,
                        b: proj(q_b_proj, &at("q_b_proj"))?,
                    },
                };
                decode::Attention::Mla(decode::Mla {
                    q,
                    kv_a: proj(&m.kv_a_proj_with_mqa, &at("kv_a_proj_with_mqa"))?,
                    kv_a_norm: norm(&m.kv_a_layernorm, &at("kv_a_layernorm"))?,
                    kv_b: DenseF32::new(&m.kv_b_proj, &at("kv_b_proj"))?,
                    o: proj(&m.o_proj, &at("o_proj"))?,
                    heads: m.heads,
                    dims: MlaDims {
                        nope: m.dims.qk_nope_head_dim,
                        rope: m.dims.qk_rope_head_dim,
                        v: m.dims.v_head_dim,
                        rank: m.dims.kv_lora_rank,
                    },
                    scale: m.softmax_scale as f32,
                })
            }
            Attention::Gqa(g) => {
                let [q, k, v, o] = g.projections();
                let (heads, kv_heads, head_dim) = g.shape();
                decode::Attention::Gqa(decode::Gqa {
                    q: proj(q, &at("q_proj"))?,
                    k: proj(k, &at("k_proj"))?,
                    v: proj(v, &at("v_proj"))?,
                    o: proj(o, &at("o_proj"))?,
                    heads,
                    kv_heads,
                    head_dim,
                })
            }
        };
        let ffn = match &layer.ffn {
            FeedForward::Dense(m) => decode::Ffn::Dense(mlp(m, &at("mlp"))?),
            FeedForward::Moe(moe) => decode::Ffn::Moe(decode::Moe {
                router: DenseF32::new(&moe.gate.weight, &at("mlp.gate"))?,
                route: route(&moe.gate)?,
                experts: moe
                    .experts
                    .iter()
                    .enumerate()
                    .map(|(e, m)| mlp(m, &at(&format!("mlp.experts.{e}"))))
                    .collect::<Result<_, _>>()?,
                shared: match &moe.shared_experts {
                    Some(m) => Some(mlp(m, &at("mlp.shared_experts"))?),
                    None => None,
                },
                top_k: moe.gate.cfg.num_experts_per_tok,
            }),
        };
        layers.push(decode::Layer {
            attn_norm: norm(&layer.input_layernorm, &at("input_layernorm"))?,
            attn,
            ffn_norm: norm(
                &layer.post_attention_layernorm,
                &at("post_attention_layernorm"),
            )?,
            ffn,
        });
    }
    let (cos, sin) = model.rope.tables();
    Ok(decode::Model {
        embed: match &model.embed_tokens {
            Embeddings::Dense(t) => Matrix::Dense(DenseF32::new(t, "model.embed_tokens")?),
            Embeddings::Blocks { table, .. } => Matrix::Quant(table.clone()),
        },
        layers,
        norm: norm(&model.norm, "model.norm")?,
        lm_head: proj(&model.lm_head, "lm_head")?,
        rope: decode::RopeTables {
            cos: DenseF32::new(cos, "rope cos")?,
            sin: DenseF32::new(sin, "rope sin")?,
            layout: match model.rope.layout {
                RopeLayout::Interleaved => decode::RopeLayout::Interleaved,
                RopeLayout::Halves => decode::RopeLayout::Halves,
            },
        },
    })
}

/// This crate's cache as the planned step's store: MLA layers in latent mode (c_kv, k_pe),
/// GQA layers in their grouped buffers ([kv_heads, capacity, head_dim]).
pub struct PlanCache<'a> {
    pub cache: &'a mut KvCache,
    /// (kv_heads, head_dim) of GQA layers; unused for MLA.
    pub grouped: (usize, usize),
}

/// The filled part of a [1 or kv_heads, capacity, d] cache buffer, `f` on (values, capacity·d).
fn with_buffer(t: Option<&Tensor>, f: &mut dyn FnMut(&[f32], usize)) -> Result<(), String> {
    let Some(t) = t else {
        return Err("the cache buffer is empty".into());
    };
    let (_, cap, d) = t.dims3().map_err(|e| e.to_string())?;
    let (guard, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(v)) = &*guard else {
        return Err("the cache is not f32 on the CPU".into());
    };
    if !layout.is_contiguous() {
        return Err("the cache buffer is not contiguous".into());
    }
    f(
        &v[layout.start_offset()..layout.start_offset() + t.elem_count()],
        cap * d,
    );
    Ok(())
}

impl KvStore for PlanCache<'_> {
    fn append(&mut self, layer: usize, a: &[f32], b: &[f32]) -> Result<(), String> {
        let c: &mut LayerCache = self
            .cache
            .layers
            .get_mut(layer)
            .ok_or_else(|| format!("the cache has no layer {layer}"))?;
        let dev = candle_core::Device::Cpu;
        let err = |e: candle_core::Error| e.to_string();
        if c.latent_mode {
            c.latent
                .append(&Tensor::from_slice(a, (1, 1, a.len()), &dev).map_err(err)?)
                .map_err(err)?;
            c.k_rope
                .append(&Tensor::from_slice(b, (1, 1, b.len()), &dev).map_err(err)?)
                .map_err(err)?;
        } else {
            let (kvh, d) = self.grouped;
            let shape = (kvh, 1, d);
            c.k_grouped
                .append(&Tensor::from_slice(a, shape, &dev).map_err(err)?)
                .map_err(err)?;
            c.v_grouped
                .append(&Tensor::from_slice(b, shape, &dev).map_err(err)?)
                .map_err(err)?;
        }
        Ok(())
    }

    fn len(&self, layer: usize) -> usize {
        self.cache.layers.get(layer).map_or(0, |c| {
            if c.latent_mode {
                c.latent.len()
            } else {
                c.k_grouped.len()
            }
        })
    }

    fn with_layer(&self, layer: usize, f: &mut dyn FnMut(LayerKv<'_>)) -> Result<(), String> {
        let c = self
            .cache
            .layers
            .get(layer)
            .ok_or_else(|| format!("the cache has no layer {layer}"))?;
        let (first, second) = if c.latent_mode {
            (c.latent.data(), c.k_rope.data())
        } else {
            (c.k_grouped.data(), c.v_grouped.data())
        };
        let (mut inner, mut mismatch) = (Ok(()), false);
        with_buffer(first, &mut |a, stride| {
            inner = with_buffer(second, &mut |b, stride_b| {
                if c.latent_mode {
                    f(LayerKv::Latent { c_kv: a, k_pe: b })
                } else if stride == stride_b && a.len() == b.len() {
                    f(LayerKv::Grouped { k: a, v: b, stride })
                } else {
                    mismatch = true;
                }
            });
        })?;
        if mismatch {
            return Err(format!("layer {layer}: k and v buffers differ in capacity"));
        }
        inner
    }
}
