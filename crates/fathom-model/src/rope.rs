//! Rotary position embedding (RoFormer) with the frequency scalings real checkpoints use: YaRN
//! (DeepSeek-V2/V3), Llama 3 and linear.
//!
//! Two layouts: DeepSeek rotates interleaved pairs (x₀,x₁),(x₂,x₃)… ("complex" rope of the official
//! code); Qwen2/Llama rotate the two halves (x_i, x_{i+d/2}). For YaRN, cos/sin carry
//! mscale(s, mscale)/mscale(s, mscale_all_dim) and the attention scale gains m² (see [`yarn_mscale`]).

use candle_core::{DType, Device, Result, Tensor, D};
use fathom_core::{ModelConfig, RopeScaling};

/// YaRN's attention temperature: 0.1·m·ln(s) + 1 for s > 1 (V2 paper, eq. for √(1/t)).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// Inverse frequencies for a rotary dim, and the factor applied to cos/sin.
pub fn inv_freq(dim: usize, base: f64, scaling: Option<&RopeScaling>) -> (Vec<f64>, f64) {
    let default: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64))
        .collect();
    match scaling {
        None => (default, 1.0),
        Some(RopeScaling::Linear { factor }) => (default.iter().map(|f| f / factor).collect(), 1.0),
        Some(RopeScaling::FreqFactors { factors }) => (
            default
                .iter()
                .enumerate()
                .map(|(i, f)| f / factors.get(i).copied().unwrap_or(1.0))
                .collect(),
            1.0,
        ),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let f = default
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect();
            (f, 1.0)
        }
        Some(RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
        }) => {
            // Dimension index at which a frequency makes `rot` full turns over the original context.
            let correction_dim = |rot: f64| {
                dim as f64
                    * ((*original_max_position_embeddings as f64)
                        / (rot * 2.0 * std::f64::consts::PI))
                        .ln()
                    / (2.0 * base.ln())
            };
            let low = correction_dim(*beta_fast).floor().max(0.0);
            let high = correction_dim(*beta_slow).ceil().min(dim as f64 - 1.0);
            let high = if low == high { high + 0.001 } else { high };
            let f = default
                .iter()
                .enumerate()
                .map(|(i, &extrap)| {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let keep = 1.0 - ramp; // 1: keep the original (extrapolated) frequency
                    (extrap / factor) * (1.0 - keep) + extrap * keep
                })
                .collect();
            let att = if *mscale != 0.0 && *mscale_all_dim != 0.0 {
                yarn_mscale(*factor, *mscale) / yarn_mscale(*factor, *mscale_all_dim)
            } else {
                yarn_mscale(*factor, 1.0)
            };
            (f, att)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs (2i, 2i+1) rotate together (DeepSeek).
    Interleaved,
    /// Pairs (i, i + d/2) rotate together (Qwen2, Llama).
    Halves,
}

#[derive(Debug, Clone)]
pub struct Rope {
    /// [max_pos, dim/2]
    cos: Tensor,
    sin: Tensor,
    pub layout: RopeLayout,
    pub dim: usize,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let dim = cfg.rope_dim();
        let layout = if cfg.mla.is_some() {
            RopeLayout::Interleaved
        } else {
            RopeLayout::Halves
        };
        let (freqs, att) = inv_freq(dim, cfg.rope_theta, cfg.rope_scaling.as_ref());
        let max_pos = cfg.max_position_embeddings.max(1);
        let mut cos = Vec::with_capacity(max_pos * dim / 2);
        let mut sin = Vec::with_capacity(max_pos * dim / 2);
        for p in 0..max_pos {
            for &f in &freqs {
                // f32 angle, as the reference computes it, then cos/sin scaled.
                let a = (p as f32 * f as f32) as f64;
                cos.push(a.cos() * att);
                sin.push(a.sin() * att);
            }
        }
        let cos = Tensor::from_vec(cos, (max_pos, dim / 2), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_pos, dim / 2), dev)?.to_dtype(dtype)?;
        Ok(Rope {
            cos,
            sin,
            layout,
            dim,
        })
    }

    /// The cos and sin tables [max_positions, dim/2] (attention factor included).
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Rotate x [b, h, s, dim] whose first position is `offset`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let s = x.dim(2)?;
        self.check(offset + s)?;
        let cos = self.cos.narrow(0, offset, s)?;
        let sin = self.sin.narrow(0, offset, s)?;
        self.rotate(x, &cos, &sin)
    }

    /// Rotate x [b, h, s, dim] whose rows sit at the given positions (a packed batch of several
    /// sequences' rows).
    pub fn apply_at(&self, x: &Tensor, positions: &[u32]) -> Result<Tensor> {
        if positions.len() != x.dim(2)? {
            candle_core::bail!("{} positions for {} rows", positions.len(), x.dim(2)?)
        }
        self.check(positions.iter().max().map_or(0, |&p| p as usize + 1))?;
        let idx = Tensor::new(positions, self.cos.device())?;
        let cos = self.cos.index_select(&idx, 0)?;
        let sin = self.sin.index_select(&idx, 0)?;
        self.rotate(x, &cos, &sin)
    }

    fn check(&self, end: usize) -> Result<()> {
        if end > self.max_positions() {
            candle_core::bail!(
                "position {end} is beyond max_position_embeddings {}",
                self.max_positions()
            );
        }
        Ok(())
    }

    /// x [b, h, s, dim] rotated by angles with cos/sin [s, dim/2].
    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, h, s, d) = x.dims4()?;
        let cos = cos.to_dtype(x.dtype())?;
        let sin = sin.to_dtype(x.dtype())?;
        let half = d / 2;
        match self.layout {
            RopeLayout::Interleaved => {
                let xp = x.reshape((b, h, s, half, 2))?;
                let x0 = xp.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
                let x1 = xp.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
                let o0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
                let o1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
                Tensor::stack(&[o0, o1], D::Minus1)?.reshape((b, h, s, d))
            }
            RopeLayout::Halves => {
                let x0 = x.narrow(D::Minus1, 0, half)?;
                let x1 = x.narrow(D::Minus1, half, half)?;
                let o0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
                let o1 = (x1.broadcast_mul(&cos)? + x0.broadcast_mul(&sin)?)?;
                Tensor::cat(&[o0, o1], D::Minus1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_keeps_high_and_interpolates_low_frequencies() {
        let s = RopeScaling::Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 1.0,
        };
        let (base, _) = inv_freq(64, 10000.0, None);
        let (f, att) = inv_freq(64, 10000.0, Some(&s));
        assert_eq!(f[0], base[0]); // fastest rotation untouched
        assert!((f[31] - base[31] / 40.0).abs() < 1e-15); // slowest fully interpolated
        assert_eq!(att, 1.0); // mscale == mscale_all_dim
        assert!((yarn_mscale(40.0, 1.0) - (0.1 * 40f64.ln() + 1.0)).abs() < 1e-15);
    }
}
