//! AdamW (Loshchilov & Hutter) with decoupled weight decay, PyTorch's semantics:
//! θ ← θ − lr·λ·θ; m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; θ ← θ − lr·m̂/(√v̂ + ε),
//! m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ). Decay applies to matrices (rank ≥ 2: projections, embeddings),
//! not to norms or biases. Linear warm-up then cosine decay to `min_lr`; global-norm clipping.
//!
//! Moments live on the host in f32 so the state saves and restores bit-exactly for `--resume`.

use crate::error::{io_err, Result, TrainError};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// A named trainable parameter.
pub struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
}

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken (t of the bias correction).
    pub t: u64,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    pub fn new(params: &[Param], beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        let zeros = || {
            params
                .iter()
                .map(|p| vec![0f32; p.var.elem_count()])
                .collect()
        };
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            t: 0,
            m: zeros(),
            v: zeros(),
        }
    }

    /// One update with gradients `grads` (host f32, one vector per parameter) at learning rate lr.
    pub fn step(&mut self, params: &[Param], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = self.eps as f32;
        for (i, p) in params.iter().enumerate() {
            let t = p.var.as_tensor();
            let mut theta: Vec<f32> = t.flatten_all()?.to_vec1()?;
            let decay = if p.decay {
                1.0 - (lr * self.weight_decay) as f32
            } else {
                1.0
            };
            let (m, v, g) = (&mut self.m[i], &mut self.v[i], &grads[i]);
            for j in 0..theta.len() {
                theta[j] *= decay;
                m[j] = b1 * m[j] + (1.0 - b1) * g[j];
                v[j] = b2 * v[j] + (1.0 - b2) * g[j] * g[j];
                let denom = v[j].sqrt() / bc2_sqrt + eps;
                theta[j] -= step_size * m[j] / denom;
            }
            p.var
                .set(&Tensor::from_vec(theta, t.shape(), t.device())?)?;
        }
        Ok(())
    }

    pub fn save(&self, params: &[Param], path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let shape = p.var.shape().clone();
            tensors.push((
                format!("m.{}", p.name),
                Tensor::from_slice(&self.m[i], &shape, &Device::Cpu)?,
            ));
            tensors.push((
                format!("v.{}", p.name),
                Tensor::from_slice(&self.v[i], &shape, &Device::Cpu)?,
            ));
        }
        let meta: HashMap<String, String> = [("t".to_string(), self.t.to_string())].into();
        let map: HashMap<String, Tensor> = tensors.into_iter().collect();
        candle_core::safetensors::save(&map, path).map_err(|e| TrainError::Checkpoint {
            path: path.into(),
            msg: e.to_string(),
        })?;
        // candle's save takes no metadata; the step count lives beside it.
        let t_path = path.with_extension("json");
        std::fs::write(&t_path, serde_json::to_string(&meta).unwrap()).map_err(io_err(&t_path))
    }

    pub fn load(&mut self, params: &[Param], path: &Path) -> Result<()> {
        let bad = |msg: String| TrainError::Checkpoint {
            path: path.into(),
            msg,
        };
        let tensors =
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| bad(e.to_string()))?;
        for (i, p) in params.iter().enumerate() {
            for (key, dst) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let name = format!("{key}.{}", p.name);
                let t = tensors
                    .get(&name)
                    .ok_or_else(|| bad(format!("missing optimizer tensor {name}")))?;
                if t.elem_count() != dst.len() || t.dtype() != DType::F32 {
                    return Err(bad(format!("{name}: shape/dtype differs from the model")));
                }
                *dst = t.flatten_all()?.to_vec1()?;
            }
        }
        let t_path = path.with_extension("json");
        let text = std::fs::read_to_string(&t_path).map_err(io_err(&t_path))?;
        let meta: HashMap<String, String> =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        self.t = meta
            .get("t")
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| bad("optimizer step count missing".into()))?;
        Ok(())
    }
}

/// Learning rate at `step` (0-based): linear warm-up to `lr`, then cosine to `min_lr` at `max_steps`.
pub fn lr_at(step: usize, lr: f64, min_lr: f64, warmup: usize, max_steps: usize) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = max_steps.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Scale gradients in place so their global L2 norm is at most `max_norm` (0 = no clipping).
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let norm = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = (max_norm / (norm + 1e-6)) as f32;
        for g in grads.iter_mut().flat_map(|g| g.iter_mut()) {
            *g *= scale;
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_hand_computed_steps() {
        // One scalar parameter θ=1, g=0.5, lr=0.1, wd=0.1, β=(0.9, 0.999), ε=1e-8.
        let var = Var::from_slice(&[1.0f32], 1, &Device::Cpu).unwrap();
        let params = vec![Param {
            name: "w".into(),
            var: var.clone(),
            decay: true,
        }];
        let mut opt = AdamW::new(&params, 0.9, 0.999, 1e-8, 0.1);
        opt.step(&params, &[vec![0.5]], 0.1).unwrap();
        // Step 1: m̂ = g, v̂ = g² → update = lr·sign(g) (≈); θ = 1·(1 − 0.01) − 0.1 = 0.89.
        let v1: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        assert!((v1[0] - 0.89).abs() < 1e-6, "{}", v1[0]);
        opt.step(&params, &[vec![-0.25]], 0.1).unwrap();
        let m = 0.9 * 0.05 + 0.1 * -0.25;
        let v = 0.999 * 0.00025 + 0.001 * 0.0625;
        let mh = m / (1.0 - 0.81);
        let vh = v / (1.0 - 0.998001);
        let expect = 0.89 * 0.99 - 0.1 * mh / ((vh as f64).sqrt() + 1e-8);
        let v2: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        assert!(
            (v2[0] as f64 - expect).abs() < 1e-6,
            "{} vs {expect}",
            v2[0]
        );
    }

    #[test]
    fn schedule_and_clipping() {
        assert!((lr_at(0, 1.0, 0.1, 10, 100) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 1.0, 0.1, 10, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 1.0, 0.1, 10, 100) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 1.0, 0.1, 10, 100) - 0.55).abs() < 1e-12);
        assert!((lr_at(100, 1.0, 0.1, 10, 100) - 0.1).abs() < 1e-12);
        let mut g = vec![vec![3.0f32], vec![4.0]];
        assert!((clip_grad_norm(&mut g, 1.0) - 5.0).abs() < 1e-12);
        assert!((g[0][0] - 0.6).abs() < 1e-5 && (g[1][0] - 0.8).abs() < 1e-5);
        let mut g = vec![vec![0.3f32]];
        clip_grad_norm(&mut g, 1.0);
        assert_eq!(g[0][0], 0.3);
    }
}
