//! RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x²) + ε) · w, computed in the input dtype
//! (f32 for inference, f64 in gradient tests): a fused CPU kernel with its own backward
//! ([`crate::fused`]), or composed from candle primitives elsewhere.

use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match crate::fused::rms_norm(x, &self.weight, self.eps)? {
            Some(y) => Ok(y),
            None => self.forward_composed(x),
        }
    }

    /// The same function from candle primitives (non-CPU devices; tests).
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (ms + self.eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv)?.broadcast_mul(&self.weight)
    }
}
