//! Scaled dot-product attention with a causal mask, and the grouped-query attention block of
//! Qwen2/Llama (q/k/v projections, optional qkv bias, half-split rope, shared KV heads).

use crate::cache::{LayerCache, Segment};
use crate::linear::Linear;
use crate::ops::softmax_last;
use crate::packed_attention::{self, packed_cached_attention, CacheView};
use crate::rope::Rope;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use fathom_core::ModelConfig;

/// softmax(q kᵀ · scale + causal mask) v for q [b, h, s, d] at positions offset.., k/v [b, h, t, *].
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, offset: usize) -> Result<Tensor> {
    let raw = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    causal_softmax(&raw, scale, offset)?.matmul(&v.contiguous()?)
}

/// softmax(scale·x + causal mask) for raw scores x [b, h, s, t], queries at positions offset..
/// (the fused CPU kernel, else the composition).
pub fn causal_softmax(x: &Tensor, scale: f64, offset: usize) -> Result<Tensor> {
    match crate::fused::causal_softmax(x, scale, offset)? {
        Some(p) => Ok(p),
        None => causal_softmax_composed(x, scale, offset),
    }
}

/// softmax(scale·x + causal mask) from candle primitives, for x [b, h, s, t] with queries at
/// positions offset.. (the fused kernel computes the same).
pub fn causal_softmax_composed(x: &Tensor, scale: f64, offset: usize) -> Result<Tensor> {
    let (_, _, s, t) = x.dims4()?;
    let scores = (x * scale)?;
    let scores = if s > 1 {
        // Query i sits at position offset + i and may see keys 0..=offset + i.
        let mask: Vec<f32> = (0..s)
            .flat_map(|i| {
                (0..t).map(move |j| {
                    if j > offset + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (s, t), x.device())?.to_dtype(scores.dtype())?;
        scores.broadcast_add(&mask)?
    } else {
        scores
    };
    softmax_last(&scores)
}

/// Append this step's k/v [b, heads, s, *] to the plain layer cache (when decoding
/// incrementally), then attend over everything cached. (MLA's expanded path; GQA groups its
/// query heads over the grouped cache instead, see `GqaAttention::forward`.)
pub fn attend_cached(
    q: &Tensor,
    k: Tensor,
    v: Tensor,
    scale: f64,
    offset: usize,
    cache: Option<&mut LayerCache>,
) -> Result<Tensor> {
    let (k, v) = match cache {
        Some(c) => c.append(&k, &v)?,
        None => (k, v),
    };
    attend(q, &k, &v, scale, offset)
}

#[derive(Debug, Clone)]
pub struct GqaAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl GqaAttention {
    /// The four projections, for accounting (bytes read per token).
    pub fn projections(&self) -> [&Linear; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }

    /// (heads, kv_heads, head_dim).
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.heads, self.kv_heads, self.head_dim)
    }

    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (h, kvh, d, hid) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.hidden_size,
        );
        let q = &cfg.weights;
        Ok(GqaAttention {
            q_proj: Linear::load(vb.pp("q_proj"), h * d, hid, cfg.qkv_bias, q)?,
            k_proj: Linear::load(vb.pp("k_proj"), kvh * d, hid, cfg.qkv_bias, q)?,
            v_proj: Linear::load(vb.pp("v_proj"), kvh * d, hid, cfg.qkv_bias, q)?,
            o_proj: Linear::load(vb.pp("o_proj"), hid, h * d, cfg.o_bias, q)?,
            heads: h,
            kv_heads: kvh,
            head_dim: d,
        })
    }

    /// q [b, s, h·d], k and v [b, s, kv_heads·d] (before rope).
    fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let [q, k, v]: [Tensor; 3] =
            Linear::forward_shared(&[&self.q_proj, &self.k_proj, &self.v_proj], x)?
                .try_into()
                .expect("three projections");
        Ok((q, k, v))
    }

    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(x)?;
        self.o_proj
            .forward(&self.attend(&q, &k, &v, rope, offset, cache)?)
    }

    /// A packed batch x [1, T, hidden] of several sequences' rows (`segments`, one cache each):
    /// projections once over all rows, attention per sequence.
    pub fn forward_packed(
        &self,
        x: &Tensor,
        rope: &Rope,
        segments: &[Segment],
        caches: &mut [&mut LayerCache],
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(x)?;
        let kernel_ok = packed_attention::kernel_available(x.device(), x.dtype());
        let out = packed_attention::attend_split(
            &[&q, &k, &v],
            segments,
            caches,
            kernel_ok,
            |t, segs, cs| self.attend_packed(&t[0], &t[1], &t[2], rope, segs, cs),
            |t, s, c| self.attend(&t[0], &t[1], &t[2], rope, s.offset, Some(c)),
        )?;
        self.o_proj.forward(&out)
    }

    /// A packed batch of short segments (decode steps, draft verification): rope at each row's
    /// position over all rows at once, k/v appended to each sequence's grouped cache, then one
    /// kernel over all sequences ([`packed_attention`]). Output [1, T, h·d] before o_proj.
    fn attend_packed(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rope: &Rope,
        segments: &[Segment],
        caches: &mut [&mut LayerCache],
    ) -> Result<Tensor> {
        let (rows, d) = (q.dim(1)?, self.head_dim);
        let positions = packed_attention::row_positions(segments);
        // [T, heads, d] → [1, heads, T, d] for rope, and back.
        let roped = |t: &Tensor, heads: usize| -> Result<Tensor> {
            rope.apply_at(
                &t.reshape((rows, heads, d))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .unsqueeze(0)?,
                &positions,
            )?
            .squeeze(0)
        };
        let q = roped(q, self.heads)?.transpose(0, 1)?.contiguous()?; // [T, h, d]
        let k = roped(k, self.kv_heads)?; // [kvh, T, d]
        let v = v
            .reshape((rows, self.kv_heads, d))?
            .transpose(0, 1)?
            .contiguous()?;
        for (s, c) in segments.iter().zip(caches.iter_mut()) {
            c.append_grouped(&k.narrow(1, s.start, s.len)?, &v.narrow(1, s.start, s.len)?)?;
        }
        let views: Vec<CacheView> = caches
            .iter()
            .map(|c| CacheView {
                keys: &c.k_grouped,
                rope_keys: None,
                values: &c.v_grouped,
            })
            .collect();
        let scale = 1.0 / (d as f64).sqrt();
        packed_cached_attention(&q, None, segments, &views, scale)?.reshape((
            1,
            rows,
            self.heads * d,
        ))
    }

    /// Attention of one sequence's projected rows at positions offset..: [b, s, h·d] before o_proj.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (b, s, _) = q.dims3()?;
        let shape = |t: &Tensor, h: usize| t.reshape((b, s, h, self.head_dim))?.transpose(1, 2);
        let q = shape(q, self.heads)?;
        let k = shape(k, self.kv_heads)?;
        let v = shape(v, self.kv_heads)?;
        let q = rope.apply(&q.contiguous()?, offset)?;
        let k = rope.apply(&k.contiguous()?, offset)?;
        let (kvh, rep, d) = (self.kv_heads, self.heads / self.kv_heads, self.head_dim);
        let scale = 1.0 / (d as f64).sqrt();
        // Group the query heads by the kv head they share (head = kv·rep + r): [b·kvh, rep·s, d],
        // so one batched matmul per kv head serves all its query heads and k/v are never repeated.
        let q = q.reshape((b * kvh, rep * s, d))?;
        let k = k.reshape((b * kvh, s, d))?;
        let v = v.contiguous()?.reshape((b * kvh, s, d))?;
        let (k, v) = match cache {
            Some(c) => c.append_grouped(&k, &v)?,
            None => (k, v),
        };
        let t = k.dim(1)?;
        let raw = q.matmul(&k.t()?)?; // [b·kvh, rep·s, t]
        let probs = causal_softmax(&raw.reshape((b * kvh, rep, s, t))?, scale, offset)?;
        let out = probs.reshape((b * kvh, rep * s, t))?.matmul(&v)?; // [b·kvh, rep·s, d]
        out.reshape((b, self.heads, s, d))?
            .transpose(1, 2)?
            .reshape((b, s, self.heads * d))
    }
}
