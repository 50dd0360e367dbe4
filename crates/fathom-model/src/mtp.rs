//! Multi-Token Prediction module k (V3 §2.2), stored as layer num_hidden_layers + k − 1:
//! h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k−1}_i)])   (embedding half first, as vLLM and
//! transformers' MtpLayer run the real weights; the paper writes the hidden state first),
//! then one decoder block, then `shared_head.norm`; logits come from the shared lm_head.
//! h^0 is the main model's final (normed) hidden state; h^k (post shared_head.norm) feeds module k+1.
//! The checkpoint's per-module `embed_tokens` / `shared_head.head` copies equal the main ones and
//! are shared, not loaded twice.

use crate::cache::{LayerCache, Segment};
use crate::decoder::DecoderLayer;
use crate::linear::Linear;
use crate::moe::Routing;
use crate::norm::RmsNorm;
use crate::rope::Rope;
use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;
use fathom_core::ModelConfig;

#[derive(Debug, Clone)]
pub struct MtpModule {
    pub enorm: RmsNorm,
    pub hnorm: RmsNorm,
    pub eh_proj: Linear,
    pub block: DecoderLayer,
    pub shared_head_norm: RmsNorm,
}

impl MtpModule {
    /// `vb` points at `model.layers.{num_hidden_layers + k - 1}`.
    pub fn load(vb: VarBuilder, cfg: &ModelConfig, layer_idx: usize) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(MtpModule {
            enorm: RmsNorm::load(vb.pp("enorm"), d, cfg.rms_norm_eps)?,
            hnorm: RmsNorm::load(vb.pp("hnorm"), d, cfg.rms_norm_eps)?,
            eh_proj: Linear::load(vb.pp("eh_proj"), d, 2 * d, false, &cfg.weights)?,
            block: DecoderLayer::load(vb.clone(), cfg, layer_idx)?,
            shared_head_norm: RmsNorm::load(vb.pp("shared_head").pp("norm"), d, cfg.rms_norm_eps)?,
        })
    }

    /// prev_hidden [b, s, d] (h^{k−1} at positions offset..), next_embeds [b, s, d] (Emb(t_{i+k})).
    pub fn forward(
        &self,
        prev_hidden: &Tensor,
        next_embeds: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        Ok(self
            .forward_with_routing(prev_hidden, next_embeds, rope, offset, cache)?
            .0)
    }

    /// The same for decoding: `prev_hidden`, `next_embeds` [1, n, d] at positions offset.. over a
    /// cache, the block through the packed path (the packed attention kernel and host kernels that
    /// inference uses; speculative decoding drafts this way).
    pub fn forward_decode(
        &self,
        prev_hidden: &Tensor,
        next_embeds: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let h = self
            .eh_proj
            .forward(&self.project_inputs(prev_hidden, next_embeds)?)?;
        let segment = [Segment {
            start: 0,
            len: h.dim(1)?,
            offset,
        }];
        let h = self
            .block
            .forward_packed(&h, rope, &segment, &mut [cache])?;
        self.shared_head_norm.forward(&h)
    }

    /// [enorm(Emb(t_{i+k})) ; hnorm(h^{k−1}_i)].
    fn project_inputs(&self, prev_hidden: &Tensor, next_embeds: &Tensor) -> Result<Tensor> {
        Tensor::cat(
            &[
                self.enorm.forward(next_embeds)?,
                self.hnorm.forward(prev_hidden)?,
            ],
            D::Minus1,
        )
    }

    /// As `forward`, also returning the routing of the block's MoE (for balancing in training).
    pub fn forward_with_routing(
        &self,
        prev_hidden: &Tensor,
        next_embeds: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: Option<&mut LayerCache>,
    ) -> Result<(Tensor, Option<Routing>)> {
        let h = self
            .eh_proj
            .forward(&self.project_inputs(prev_hidden, next_embeds)?)?;
        let (h, routing) = self.block.forward(&h, rope, offset, cache)?;
        Ok((self.shared_head_norm.forward(&h)?, routing))
    }
}
