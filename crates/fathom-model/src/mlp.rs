//! The SwiGLU feed-forward block: down(silu(gate(x)) ⊙ up(x)). Dense layers, each routed expert and
//! the shared experts of DeepSeekMoE are all this block.

use crate::linear::Linear;
use crate::ops::silu;
use candle_core::{Result, Tensor, D};
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
        if crate::rows_matmul::few_host_rows(x) {
            let k = x.dim(D::Minus1)?;
            let rows = x.elem_count() / k;
            if let Some(y) = self.forward_host(&x.flatten_all()?.to_vec1()?, rows) {
                let mut dims = x.dims().to_vec();
                *dims.last_mut().expect("rank ≥ 1") = y.len() / rows;
                return Tensor::from_vec(y, dims, x.device());
            }
        }
        let [g, u]: [Tensor; 2] = Linear::forward_shared(&[&self.gate_proj, &self.up_proj], x)?
            .try_into()
            .expect("two projections");
        self.down_proj.forward(&(silu(&g)? * u)?)
    }

    /// The hidden (intermediate) width: rows of gate_proj.
    pub fn intermediate_size(&self) -> usize {
        self.gate_proj.out_features()
    }

    /// The same block for a few host rows x [rows, hidden] in one pass (decode; inference only):
    /// `None` unless all three projections are dense f32 without bias and not trained.
    pub fn forward_host(&self, x: &[f32], rows: usize) -> Option<Vec<f32>> {
        let g = self.gate_proj.forward_host(x, rows)?;
        let u = self.up_proj.forward_host(x, rows)?;
        // silu(g)·u = g·σ(g)·u
        let h: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        self.down_proj.forward_host(&h, rows)
    }
}
