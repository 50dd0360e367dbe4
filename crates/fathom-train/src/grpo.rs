//! The GRPO objective (DeepSeekMath §4.1, DeepSeek-R1 §2.2.1) and its common variants.
//!
//! For G completions of one prompt with rewards rᵢ:
//! - advantage Âᵢ = (rᵢ − mean(r)) / (std(r) + 1e-4) for every token of completion i (std is the
//!   unbiased sample std, as TRL); Dr. GRPO drops the division (`scale_by_std = false`);
//! - per token t: ratio ρ = exp(logπ_θ − logπ_old), surrogate = min(ρ·Â, clip(ρ, 1−ε_low,
//!   1+ε_high)·Â) (ε_high > ε_low is DAPO's clip-higher);
//! - KL to the frozen reference by the k3 estimator (Schulman): D = exp(logπ_ref − logπ_θ) −
//!   (logπ_ref − logπ_θ) − 1, weighted by β (β = 0: no reference model needed);
//! - loss per token ℓ = −(surrogate − β·D), averaged per sequence then over sequences (GRPO's
//!   1/G Σᵢ 1/|oᵢ| Σ_t) or over all tokens of the batch (`token_level`, DAPO).

use candle_core::{DType, Result, Tensor};

/// log π(tokens[:, t+1] | tokens[:, ..=t]) for every position: [n, L] ids → [n, L−1]
/// log-probabilities of each next token (differentiable through the model's weights). The
/// policy, reference and sampling-policy terms of the loss all come from this.
pub fn token_logprobs(model: &fathom_model::CausalLm, tokens: &Tensor) -> Result<Tensor> {
    token_logprobs_at(model, tokens, 1.0)
}

/// As [`token_logprobs`] under the policy sampled at `temperature` (logits / T), so the ratio
/// and KL terms compare the distribution the rollouts were actually drawn from (TRL does the
/// same).
pub fn token_logprobs_at(
    model: &fathom_model::CausalLm,
    tokens: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let (_, l) = tokens.dims2()?;
    let inputs = tokens.narrow(1, 0, l - 1)?;
    let targets = tokens.narrow(1, 1, l - 1)?.contiguous()?;
    let mut logits = model.forward(&inputs, 0, None)?; // [n, L−1, V]
    if temperature != 1.0 {
        logits = (logits / temperature)?;
    }
    let logp = fathom_model::ops::log_softmax_last(&logits)?;
    logp.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)
}

/// Group-normalised advantages for `rewards` laid out as consecutive groups of `group`.
pub fn group_advantages(rewards: &[f64], group: usize, scale_by_std: bool) -> Vec<f64> {
    assert!(
        group > 0 && rewards.len() % group == 0,
        "rewards must fill whole groups"
    );
    rewards
        .chunks(group)
        .flat_map(|g| {
            let n = g.len() as f64;
            let mean = g.iter().sum::<f64>() / n;
            let var = if g.len() > 1 {
                g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0)
            } else {
                0.0
            };
            let denom = if scale_by_std { var.sqrt() + 1e-4 } else { 1.0 };
            g.iter().map(move |r| (r - mean) / denom)
        })
        .collect()
}

/// Indices of the groups whose rewards are not all equal (the others carry no learning signal;
/// DAPO's dynamic sampling drops them).
pub fn informative_groups(rewards: &[f64], group: usize) -> Vec<usize> {
    rewards
        .chunks(group)
        .enumerate()
        .filter(|(_, g)| g.iter().any(|r| (r - g[0]).abs() > 1e-12))
        .map(|(i, _)| i)
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoLossConfig {
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub beta: f64,
    /// Average over all completion tokens of the batch instead of per sequence first.
    pub token_level: bool,
}

impl Default for GrpoLossConfig {
    fn default() -> Self {
        GrpoLossConfig {
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            beta: 0.04,
            token_level: false,
        }
    }
}

/// Diagnostics of one loss evaluation (over masked tokens).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossStats {
    /// Fraction of tokens where the clipped term was the smaller one (gradient cut).
    pub clip_fraction: f64,
    /// Mean k3 KL to the reference (0 without one).
    pub kl: f64,
}

/// The GRPO loss. `logp`, `old_logp`, `ref_logp`: [n, T] log-probabilities of the sampled tokens
/// under the policy (differentiable), the sampling policy and the reference; `advantages` [n];
/// `mask` [n, T] 1 on completion tokens. All in the same float dtype.
pub fn grpo_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: Option<&Tensor>,
    advantages: &Tensor,
    mask: &Tensor,
    cfg: &GrpoLossConfig,
) -> Result<(Tensor, LossStats)> {
    let adv = advantages.unsqueeze(1)?; // [n, 1]
    let ratio = (logp - old_logp.detach())?.exp()?;
    let unclipped = ratio.broadcast_mul(&adv)?;
    let clipped = ratio
        .clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)?
        .broadcast_mul(&adv)?;
    let surrogate = unclipped.minimum(&clipped)?;
    let (per_token, kl_mean) = match (ref_logp, cfg.beta) {
        (Some(r), beta) if beta != 0.0 => {
            let d = (r.detach() - logp)?;
            let kl = ((d.exp()? - &d)? - 1.0)?;
            let kl_mean = masked_mean_all(&kl, mask)?;
            ((surrogate - (kl * beta)?)?.neg()?, kl_mean)
        }
        _ => (surrogate.neg()?, 0.0),
    };
    let loss = if cfg.token_level {
        ((per_token * mask)?.sum_all()?
            / mask
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                .max(1.0))?
    } else {
        let per_seq = (per_token * mask)?
            .sum(1)?
            .broadcast_div(&mask.sum(1)?.clamp(1.0, f64::MAX)?)?;
        per_seq.mean_all()?
    };
    // Clipped when the clipped term is strictly smaller than the unclipped one.
    let cut = unclipped.gt(&clipped)?.to_dtype(mask.dtype())?;
    let clip_fraction = masked_mean_all(&cut, mask)?;
    Ok((
        loss,
        LossStats {
            clip_fraction,
            kl: kl_mean,
        },
    ))
}

fn masked_mean_all(x: &Tensor, mask: &Tensor) -> Result<f64> {
    let num = (x.detach() * mask)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let den = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(if den > 0.0 { num / den } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn token_logprobs_are_the_log_softmax_at_the_next_token() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/deepseek_v3_tiny");
        let model = fathom_model::CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let ids: Vec<u32> = vec![0, 5, 17, 42, 99, 7, 3, 250];
        let tokens = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let got: Vec<f32> = token_logprobs(&model, &tokens)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let logits: Vec<Vec<f32>> = model
            .forward(&tokens, 0, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for t in 0..ids.len() - 1 {
            let row = &logits[t];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
            let want = row[ids[t + 1] as usize] - lse;
            assert!((got[t] - want).abs() < 1e-4, "t {t}: {} vs {want}", got[t]);
        }
    }

    use crate::test_util::{assert_gradient_matches_fd, tensor as t};

    #[test]
    fn advantages_by_hand() {
        // Group [1, 0, 0, 1]: mean 0.5, unbiased std = sqrt(1/3) = 0.57735.
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0, 2.0, 2.0], 2, true);
        let s = (0.5f64).sqrt(); // group [1, 0]: std = sqrt(0.5)
        assert!((a[0] - 0.5 / (s + 1e-4)).abs() < 1e-12);
        assert!((a[1] + 0.5 / (s + 1e-4)).abs() < 1e-12);
        assert_eq!(&a[4..], &[0.0, 0.0]); // equal rewards → no signal
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0], 4, true);
        let s = (1.0f64 / 3.0).sqrt();
        assert!((a[0] - 0.5 / (s + 1e-4)).abs() < 1e-12);
        // Dr. GRPO: centred only.
        assert_eq!(group_advantages(&[3.0, 1.0], 2, false), vec![1.0, -1.0]);
        assert_eq!(
            informative_groups(&[1.0, 0.0, 2.0, 2.0, 0.0, 5.0], 2),
            vec![0, 2]
        );
    }

    #[test]
    fn clipped_loss_and_k3_kl_by_hand() {
        // Two sequences, two tokens each; the second sequence's last token is padding.
        let logp = t(
            &[0.1f64.ln(), 0.5f64.ln(), 0.4f64.ln(), 0.9f64.ln()],
            (2, 2),
        );
        let old = t(
            &[0.05f64.ln(), 0.5f64.ln(), 0.5f64.ln(), 0.1f64.ln()],
            (2, 2),
        );
        let reference = t(
            &[0.2f64.ln(), 0.5f64.ln(), 0.4f64.ln(), 0.9f64.ln()],
            (2, 2),
        );
        let adv = Tensor::new(&[1.0f64, -1.0], &Device::Cpu).unwrap();
        let mask = t(&[1.0, 1.0, 1.0, 0.0], (2, 2));
        let cfg = GrpoLossConfig {
            epsilon_low: 0.2,
            epsilon_high: 0.28,
            beta: 0.1,
            token_level: false,
        };
        let (loss, stats) = grpo_loss(&logp, &old, Some(&reference), &adv, &mask, &cfg).unwrap();
        // Token (0,0): ratio 2.0, A=+1 → min(2.0, 1.28) = 1.28 (clipped); k3 with ref/π = 2:
        //   2 − ln 2 − 1 = 0.30685.  Token (0,1): ratio 1 → 1; KL 0.
        // Token (1,0): ratio 0.8, A=−1 → min(−0.8, −0.8) = −0.8 (at the boundary: not cut); KL 0.
        let k = 2.0 - 2f64.ln() - 1.0;
        let seq0 = -((1.28 - 0.1 * k) + 1.0) / 2.0;
        let seq1 = -(-0.8);
        let want = (seq0 + seq1) / 2.0;
        let got = loss.to_scalar::<f64>().unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        assert!((stats.kl - k / 3.0).abs() < 1e-12);
        assert!((stats.clip_fraction - 1.0 / 3.0).abs() < 1e-12);
        // Token-level normalisation: Σ over the 3 real tokens / 3.
        let tl = GrpoLossConfig {
            token_level: true,
            ..cfg
        };
        let (loss, _) = grpo_loss(&logp, &old, Some(&reference), &adv, &mask, &tl).unwrap();
        let want = (-(1.28 - 0.1 * k) - 1.0 + 0.8) / 3.0;
        assert!((loss.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
        // β = 0 ignores the reference entirely.
        let nb = GrpoLossConfig { beta: 0.0, ..cfg };
        let (a, s) = grpo_loss(&logp, &old, Some(&reference), &adv, &mask, &nb).unwrap();
        let (b, _) = grpo_loss(&logp, &old, None, &adv, &mask, &nb).unwrap();
        assert_eq!(a.to_scalar::<f64>().unwrap(), b.to_scalar::<f64>().unwrap());
        assert_eq!(s.kl, 0.0);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        // Away from the clip boundaries (where the objective has kinks), f64.
        let base = [-1.2, -0.7, -2.0, -0.3, -1.5, -0.9];
        let old = t(&[-1.25, -0.72, -1.9, -0.35, -1.0, -0.95], (2, 3));
        let reference = t(&[-1.0, -0.8, -2.1, -0.2, -1.4, -1.0], (2, 3));
        let adv = Tensor::new(&[0.7f64, -1.3], &Device::Cpu).unwrap();
        let mask = t(&[1.0, 1.0, 1.0, 1.0, 1.0, 0.0], (2, 3));
        for token_level in [false, true] {
            let cfg = GrpoLossConfig {
                epsilon_low: 0.2,
                epsilon_high: 0.3,
                beta: 0.05,
                token_level,
            };
            assert_gradient_matches_fd(
                &format!("token_level {token_level}"),
                &base,
                (2, 3),
                1e-7,
                |x| {
                    grpo_loss(x, &old, Some(&reference), &adv, &mask, &cfg)
                        .unwrap()
                        .0
                },
            );
        }
    }
}
