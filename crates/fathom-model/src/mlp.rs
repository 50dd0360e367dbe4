//! The SwiGLU feed-forward block: down(silu(gate(x)) ⊙ up(x)). Dense layers, each routed expert and
//! the shared experts of DeepSeekMoE are all this block.

use crate::linear::Linear;
use crate::ops::silu;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use fathom_core::WeightPlan;

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn load(
        vb: VarBuilder,
        hidden: usize,
        inter: usize,
        bias: bool,
        weights: &WeightPlan,
    ) -> Result<Self> {
        Ok(Mlp {
            gate_proj: Linear::load(vb.pp("gate_proj"), inter, hidden, bias, weights)?,
            up_proj: Linear::load(vb.pp("up_proj"), inter, hidden, bias, weights)?,
            down_proj: Linear::load(vb.pp("down_proj"), hidden, inter, bias, weights)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = silu(&self.gate_proj.forward(x)?)?;
        let u = self.up_proj.forward(x)?;
        self.down_proj.forward(&(g * u)?)
    }
}
