//! Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1).
//!
//! q = W_UQ·RMSNorm(W_DQ·x)  (or q = W_Q·x without q-LoRA), split per head into [q_nope, q_pe];
//! [c_kv, k_pe] = W_DKV·x;  c_kv ← RMSNorm(c_kv);  [k_nope, v] = W_UKV·c_kv per head;
//! q_pe, k_pe roped (interleaved pairs), k_pe shared by all heads;
//! score = (q_nope·k_nope + q_pe·k_pe) · softmax_scale,  softmax_scale = d_qk^-½ · m² under YaRN.
//!
//! Two forms, numerically the same function:
//! - expanded (training, and the plain cache): k_nope and v are materialised per head;
//! - absorbed (the latent cache, DeepSeek-V2 §2.1.2 "absorb W_UK into W_Q, W_UV into W_O"): the cache
//!   holds only c_kv and k_pe; q_nope·k_nope = (q_nope·W_UK)·c_kv, so scores are computed against
//!   c_kv directly, the attention output stays in latent space (p·c_kv) and W_UV is applied after.
//!   W_UK and W_UV are zero-copy views of `kv_b_proj`, so weights updated by training are never
//!   stale.

use crate::attention::{attend, attend_cached, causal_softmax};
use crate::cache::{LayerCache, Segment};
use crate::linear::Linear;
use crate::norm::RmsNorm;
use crate::ops::linear;
use crate::packed_attention::{self, packed_cached_attention, CacheView};
use crate::rope::{yarn_mscale, Rope};
use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;
use fathom_core::{MlaConfig, ModelConfig, RopeScaling};

#[derive(Debug, Clone)]
pub enum QueryProj {
    /// V2-Lite: one projection.
    Full { q_proj: Linear },
    /// V2/V3: low-rank down-projection, norm, up-projection.
    LowRank {
        q_a_proj: Linear,
        q_a_layernorm: RmsNorm,
        q_b_proj: Linear,
    },
}

#[derive(Debug, Clone)]
pub struct Mla {
    pub q: QueryProj,
    pub kv_a_proj_with_mqa: Linear,
    pub kv_a_layernorm: RmsNorm,
    /// Kept dense: the absorbed decode reads W_UK / W_UV as views of it.
    pub kv_b_proj: Tensor,
    pub o_proj: Linear,
    pub dims: MlaConfig,
    pub heads: usize,
    pub softmax_scale: f64,
}

/// d_qk^-½, times m² = (0.1·mscale_all_dim·ln(factor) + 1)² under YaRN (V2 §2.1.3; official code).
pub fn mla_softmax_scale(cfg: &ModelConfig) -> f64 {
    let m = cfg.mla.as_ref().expect("MLA config");
    let base = 1.0 / (m.qk_head_dim() as f64).sqrt();
    match &cfg.rope_scaling {
        Some(RopeScaling::Yarn {
            factor,
            mscale_all_dim,
            ..
        }) if *mscale_all_dim != 0.0 => {
            let ms = yarn_mscale(*factor, *mscale_all_dim);
            base * ms * ms
        }
        _ => base,
    }
}

impl Mla {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let m = cfg.mla.clone().expect("MLA config");
        let (hid, h) = (cfg.hidden_size, cfg.num_attention_heads);
        let w = |name: &str, out: usize, inp: usize| {
            vb.pp(name).get_with_hints(
                (out, inp),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )
        };
        let lin = |name: &str, out: usize, inp: usize| {
            Linear::load(vb.pp(name), out, inp, false, &cfg.weights)
        };
        let q = match m.q_lora_rank {
            None => QueryProj::Full {
                q_proj: lin("q_proj", h * m.qk_head_dim(), hid)?,
            },
            Some(r) => QueryProj::LowRank {
                q_a_proj: lin("q_a_proj", r, hid)?,
                q_a_layernorm: RmsNorm::load(vb.pp("q_a_layernorm"), r, 1e-6)?,
                q_b_proj: lin("q_b_proj", h * m.qk_head_dim(), r)?,
            },
        };
        Ok(Mla {
            q,
            kv_a_proj_with_mqa: lin(
                "kv_a_proj_with_mqa",
                m.kv_lora_rank + m.qk_rope_head_dim,
                hid,
            )?,
            kv_a_layernorm: RmsNorm::load(vb.pp("kv_a_layernorm"), m.kv_lora_rank, 1e-6)?,
            kv_b_proj: w(
                "kv_b_proj",
                h * (m.qk_nope_head_dim + m.v_head_dim),
                m.kv_lora_rank,
            )?,
            o_proj: lin("o_proj", hid, h * m.v_head_dim)?,
            softmax_scale: mla_softmax_scale(cfg),
            dims: m,
            heads: h,
        })
    }

    /// (heads, d_nope, d_rope, d_v, kv_lora_rank).
    fn head_dims(&self) -> (usize, usize, usize, usize, usize) {
        let m = &self.dims;
        (
            self.heads,
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
            m.kv_lora_rank,
        )
    }

    /// The two input projections of x [b, s, hidden]: queries [b, s, h·d_qk] and the joint
    /// down-projection [c_kv ‖ k_pe] [b, s, kv_lora_rank + d_rope] (before its norm and rope).
    pub fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        // Both read x: quantised once for the two when they run on stored blocks.
        let (q, ckv) = match &self.q {
            QueryProj::Full { q_proj } => {
                let both = Linear::forward_shared(&[q_proj, &self.kv_a_proj_with_mqa], x)?;
                let [q, ckv]: [Tensor; 2] = both.try_into().expect("two projections");
                (q, ckv)
            }
            QueryProj::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => {
                let both = Linear::forward_shared(&[q_a_proj, &self.kv_a_proj_with_mqa], x)?;
                let [qa, ckv]: [Tensor; 2] = both.try_into().expect("two projections");
                (q_b_proj.forward(&q_a_layernorm.forward(&qa)?)?, ckv)
            }
        };
        Ok((q, ckv))
    }

    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (q, ckv) = self.project(x)?;
        self.o_proj
            .forward(&self.attend(&q, &ckv, rope, offset, cache)?)
    }

    /// A packed batch x [1, T, hidden] whose rows are runs of several sequences (`segments`, each
    /// with its own cache): the projections run once over all rows, attention per sequence.
    pub fn forward_packed(
        &self,
        x: &Tensor,
        rope: &Rope,
        segments: &[Segment],
        caches: &mut [&mut LayerCache],
    ) -> Result<Tensor> {
        let (q, ckv) = self.project(x)?;
        let kernel_ok = caches.iter().all(|c| c.latent_mode)
            && packed_attention::kernel_available(x.device(), x.dtype());
        let out = packed_attention::attend_split(
            &[&q, &ckv],
            segments,
            caches,
            kernel_ok,
            |t, segs, cs| self.attend_packed(&t[0], &t[1], rope, segs, cs),
            |t, s, c| self.attend(&t[0], &t[1], rope, s.offset, Some(c)),
        )?;
        self.o_proj.forward(&out)
    }

    /// The absorbed form for a packed batch of short segments (decode steps, draft verification):
    /// every per-row step is batched over all rows — absorption q_nope·W_UK, the c_kv norm, rope at
    /// each row's own position, W_UV — and the scores/softmax/latent sum run in one kernel over the
    /// sequences' latent caches ([`packed_attention`]). Output [1, T, h·d_v] before o_proj.
    fn attend_packed(
        &self,
        q: &Tensor,
        ckv: &Tensor,
        rope: &Rope,
        segments: &[Segment],
        caches: &mut [&mut LayerCache],
    ) -> Result<Tensor> {
        let (h, dn, dr, dv, r) = self.head_dims();
        let rows = q.dim(1)?;
        let positions = packed_attention::row_positions(segments);
        let q = q.reshape((rows, h, dn + dr))?;
        let w = self.kv_b_proj.reshape((h, dn + dv, r))?;
        let q_lat = q
            .narrow(D::Minus1, 0, dn)?
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&w.narrow(1, 0, dn)?)? // [h, T, r]
            .transpose(0, 1)?
            .contiguous()?;
        let q_pe = rope
            .apply_at(
                &q.narrow(D::Minus1, dn, dr)?
                    .transpose(0, 1)?
                    .contiguous()?
                    .unsqueeze(0)?,
                &positions,
            )?
            .squeeze(0)?
            .transpose(0, 1)?
            .contiguous()?; // [T, h, d_rope]
        let c_kv = self.kv_a_layernorm.forward(&ckv.narrow(D::Minus1, 0, r)?)?;
        let k_pe = rope
            .apply_at(
                &ckv.narrow(D::Minus1, r, dr)?
                    .reshape((1, 1, rows, dr))?
                    .contiguous()?,
                &positions,
            )?
            .reshape((1, rows, dr))?;
        for (s, c) in segments.iter().zip(caches.iter_mut()) {
            c.latent.append(&c_kv.narrow(1, s.start, s.len)?)?;
            c.k_rope.append(&k_pe.narrow(1, s.start, s.len)?)?;
        }
        let views: Vec<CacheView> = caches
            .iter()
            .map(|c| CacheView {
                keys: &c.latent,
                rope_keys: Some(&c.k_rope),
                values: &c.latent,
            })
            .collect();
        let o_lat =
            packed_cached_attention(&q_lat, Some(&q_pe), segments, &views, self.softmax_scale)?; // [T, h, r]
        o_lat
            .transpose(0, 1)?
            .contiguous()?
            .matmul(&w.narrow(1, dn, dv)?.transpose(1, 2)?)? // [h, T, d_v]
            .transpose(0, 1)?
            .reshape((1, rows, h * dv))
    }

    /// Attention of one sequence's projected rows (q, ckv from `project`) at positions offset..:
    /// the output before o_proj [b, s, h·d_v]. Absorbed over a latent cache, expanded otherwise.
    pub fn attend(
        &self,
        q: &Tensor,
        ckv: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        match cache {
            Some(c) if c.latent_mode => self.attend_absorbed(q, ckv, rope, offset, c),
            other => self.attend_expanded(q, ckv, rope, offset, other),
        }
    }

    /// The absorbed form over the latent cache (c_kv, k_pe appended for this step's tokens).
    fn attend_absorbed(
        &self,
        q: &Tensor,
        ckv: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let (b, s, _) = q.dims3()?;
        let (h, dn, dr, dv, r) = self.head_dims();
        let q = q.reshape((b, s, h, dn + dr))?;
        let q_pe = rope.apply(
            &q.narrow(D::Minus1, dn, dr)?.transpose(1, 2)?.contiguous()?,
            offset,
        )?; // [b, h, s, d_rope]

        let c_kv = self.kv_a_layernorm.forward(&ckv.narrow(D::Minus1, 0, r)?)?;
        let k_pe = rope
            .apply(
                &ckv.narrow(D::Minus1, r, dr)?
                    .reshape((b, 1, s, dr))?
                    .contiguous()?,
                offset,
            )?
            .reshape((b, s, dr))?;
        let c_all = cache.latent.append(&c_kv)?; // [b, t, r]
        let pe_all = cache.k_rope.append(&k_pe)?; // [b, t, d_rope]
        let t = c_all.dim(1)?;

        // A long prefill attends in the expanded form: keys and values expanded from the cached
        // latents cost t·r·h·(d_nope + d_v) once, then every score and weighted sum runs over
        // d_nope + d_rope (d_v) per head instead of 2·r + d_rope — at s = t = 512 on a V3 layout
        // 2.4× fewer multiply-adds. (vLLM and SGLang do the same: MHA for prefill, the absorbed
        // MQA form for decode.) The same softmax over the same logits; the cache stays latent.
        let absorbed = h * s * t * (2 * r + dr) + s * h * r * (dn + dv);
        let expanded = h * s * t * (dn + dr + dv) + t * r * h * (dn + dv);
        if expanded < absorbed {
            let kv = linear(&c_all, &self.kv_b_proj, None)?
                .reshape((b, t, h, dn + dv))?
                .transpose(1, 2)?; // [b, h, t, d_nope + d_v]
            let k_pe = pe_all.unsqueeze(1)?.broadcast_as((b, h, t, dr))?;
            let k = Tensor::cat(&[&kv.narrow(D::Minus1, 0, dn)?, &k_pe], D::Minus1)?;
            let v = kv.narrow(D::Minus1, dn, dv)?;
            let q_nope = q.narrow(D::Minus1, 0, dn)?.transpose(1, 2)?; // [b, h, s, d_nope]
            let q = Tensor::cat(&[&q_nope, &q_pe], D::Minus1)?;
            let out = attend(&q, &k, &v, self.softmax_scale, offset)?; // [b, h, s, d_v]
            return out.transpose(1, 2)?.reshape((b, s, h * dv));
        }

        // q_nope as [h, b·s, d_nope] for the per-head absorption.
        let q_nope = q
            .narrow(D::Minus1, 0, dn)?
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((h, b * s, dn))?;
        // W_UKV = kv_b_proj viewed as [h, d_nope + d_v, r].
        let w = self.kv_b_proj.reshape((h, dn + dv, r))?;
        let q_lat = q_nope
            .matmul(&w.narrow(1, 0, dn)?)? // [h, b·s, r]
            .reshape((h, b, s, r))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((b, h * s, r))?;
        let scores = (q_lat.matmul(&c_all.transpose(1, 2)?)?
            + q_pe
                .reshape((b, h * s, dr))?
                .matmul(&pe_all.transpose(1, 2)?)?)?;
        let probs = causal_softmax(&scores.reshape((b, h, s, t))?, self.softmax_scale, offset)?;
        let o_lat = probs
            .reshape((b, h * s, t))?
            .matmul(&c_all)? // [b, h·s, r]
            .reshape((b, h, s, r))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((h, b * s, r))?;
        let o = o_lat
            .matmul(&w.narrow(1, dn, dv)?.transpose(1, 2)?)? // [h, b·s, d_v]
            .reshape((h, b, s, dv))?
            .permute((1, 2, 0, 3))?
            .contiguous()?
            .reshape((b, s, h * dv))?;
        Ok(o)
    }

    /// The expanded form (training; the plain cache).
    fn attend_expanded(
        &self,
        q: &Tensor,
        ckv: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (b, s, _) = q.dims3()?;
        let m = &self.dims;
        let h = self.heads;
        let q = q.reshape((b, s, h, m.qk_head_dim()))?.transpose(1, 2)?; // [b, h, s, d_qk]
        let q_nope = q.narrow(D::Minus1, 0, m.qk_nope_head_dim)?;
        let q_pe = rope.apply(
            &q.narrow(D::Minus1, m.qk_nope_head_dim, m.qk_rope_head_dim)?
                .contiguous()?,
            offset,
        )?;

        let c_kv = self
            .kv_a_layernorm
            .forward(&ckv.narrow(D::Minus1, 0, m.kv_lora_rank)?)?;
        let k_pe = ckv
            .narrow(D::Minus1, m.kv_lora_rank, m.qk_rope_head_dim)?
            .reshape((b, 1, s, m.qk_rope_head_dim))?;
        let k_pe = rope.apply(&k_pe.contiguous()?, offset)?;

        let kv = linear(&c_kv, &self.kv_b_proj, None)?
            .reshape((b, s, h, m.qk_nope_head_dim + m.v_head_dim))?
            .transpose(1, 2)?; // [b, h, s, d_nope + d_v]
        let k_nope = kv.narrow(D::Minus1, 0, m.qk_nope_head_dim)?;
        let v = kv
            .narrow(D::Minus1, m.qk_nope_head_dim, m.v_head_dim)?
            .contiguous()?;
        let k = Tensor::cat(
            &[&k_nope, &k_pe.broadcast_as((b, h, s, m.qk_rope_head_dim))?],
            D::Minus1,
        )?;
        let q = Tensor::cat(&[&q_nope, &q_pe], D::Minus1)?;

        let out = attend_cached(&q, k, v, self.softmax_scale, offset, cache)?; // [b, h, s, d_v]
        out.transpose(1, 2)?.reshape((b, s, h * m.v_head_dim))
    }
}
