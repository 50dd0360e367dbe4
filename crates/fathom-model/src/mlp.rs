//! The SwiGLU feed-forward block: down(silu(gate(x)) ⊙ up(x)). Dense layers, each routed expert and
//! the shared experts of DeepSeekMoE are all this block.

use crate::ops::{linear, silu};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Tensor,
    pub up_proj: Tensor,
    pub down_proj: Tensor,
    pub bias: Option<[Tensor; 3]>,
}

impl Mlp {
    pub fn load(vb: VarBuilder, hidden: usize, inter: usize, bias: bool) -> Result<Self> {
        let w = |name: &str, shape: (usize, usize)| {
            vb.pp(name)
                .get_with_hints(shape, "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)
        };
        let bias = if bias {
            Some([
                vb.pp("gate_proj")
                    .get_with_hints(inter, "bias", candle_nn::Init::Const(0.0))?,
                vb.pp("up_proj")
                    .get_with_hints(inter, "bias", candle_nn::Init::Const(0.0))?,
                vb.pp("down_proj")
                    .get_with_hints(hidden, "bias", candle_nn::Init::Const(0.0))?,
            ])
        } else {
            None
        };
        Ok(Mlp {
            gate_proj: w("gate_proj", (inter, hidden))?,
            up_proj: w("up_proj", (inter, hidden))?,
            down_proj: w("down_proj", (hidden, inter))?,
            bias,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = self.bias.as_ref();
        let g = silu(&linear(x, &self.gate_proj, b.map(|b| &b[0]))?)?;
        let u = linear(x, &self.up_proj, b.map(|b| &b[1]))?;
        linear(&(g * u)?, &self.down_proj, b.map(|b| &b[2]))
    }
}
