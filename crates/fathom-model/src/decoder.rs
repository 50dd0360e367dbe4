//! One pre-norm decoder block: h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h)), with MLA or GQA
//! attention and a dense MLP or DeepSeekMoE feed-forward.

use crate::attention::GqaAttention;
use crate::cache::{LayerCache, Segment};
use crate::mla::Mla;
use crate::mlp::Mlp;
use crate::moe::{Moe, Routing};
use crate::norm::RmsNorm;
use crate::rope::Rope;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use fathom_core::ModelConfig;

#[derive(Debug, Clone)]
pub enum Attention {
    Mla(Mla),
    Gqa(GqaAttention),
}

#[derive(Debug, Clone)]
pub enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub ffn: FeedForward,
}

impl DecoderLayer {
    /// `layer_idx` decides dense vs MoE (MTP blocks pass num_hidden_layers + k − 1).
    pub fn load(vb: VarBuilder, cfg: &ModelConfig, layer_idx: usize) -> Result<Self> {
        let attn = if cfg.mla.is_some() {
            Attention::Mla(Mla::load(vb.pp("self_attn"), cfg)?)
        } else {
            Attention::Gqa(GqaAttention::load(vb.pp("self_attn"), cfg)?)
        };
        let ffn = if cfg.is_moe_layer(layer_idx) {
            FeedForward::Moe(Moe::load(vb.pp("mlp"), cfg)?)
        } else {
            FeedForward::Dense(Mlp::load(
                vb.pp("mlp"),
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.mlp_bias,
                &cfg.weights,
            )?)
        };
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(
                vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            attn,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            ffn,
        })
    }

    /// Returns the block output and, for MoE blocks, the routing it used.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: Option<&mut LayerCache>,
    ) -> Result<(Tensor, Option<Routing>)> {
        let h = self.input_layernorm.forward(x)?;
        let a = match &self.attn {
            Attention::Mla(m) => m.forward(&h, rope, offset, cache)?,
            Attention::Gqa(g) => g.forward(&h, rope, offset, cache)?,
        };
        self.feed_forward(x, &a)
    }

    /// A packed batch x [1, T, hidden] of several sequences (continuous batching): attention per
    /// sequence over its own cache, everything else over all rows at once.
    pub fn forward_packed(
        &self,
        x: &Tensor,
        rope: &Rope,
        segments: &[Segment],
        caches: &mut [&mut LayerCache],
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let a = match &self.attn {
            Attention::Mla(m) => m.forward_packed(&h, rope, segments, caches)?,
            Attention::Gqa(g) => g.forward_packed(&h, rope, segments, caches)?,
        };
        Ok(self.feed_forward(x, &a)?.0)
    }

    /// The second half of the block: h = x + attn; out = h + FFN(RMSNorm(h)).
    fn feed_forward(&self, x: &Tensor, attn: &Tensor) -> Result<(Tensor, Option<Routing>)> {
        let x = (x + attn)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        let (f, routing) = match &self.ffn {
            FeedForward::Dense(m) => (m.forward(&h)?, None),
            FeedForward::Moe(m) => {
                let (y, r) = m.forward_with_routing(&h)?;
                (y, Some(r))
            }
        };
        Ok(((x + f)?, routing))
    }
}
