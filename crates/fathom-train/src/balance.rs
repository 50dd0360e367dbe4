//! DeepSeek-V3's load balancing (V3 report §2.1.2, Wang et al. 2408.15664).
//!
//! - Auxiliary-loss-free: after each optimizer step, per MoE layer,
//!   b_i ← b_i + γ·sign(c̄ − c_i), c_i = tokens routed to expert i over the step, c̄ their mean.
//!   Under-loaded experts gain bias, over-loaded ones lose it. The bias (`e_score_correction_bias`)
//!   enters expert *selection* only (see `fathom_model::moe`), never the combination weights, and
//!   it is not a gradient update.
//! - Sequence-wise balance loss (complementary, tiny α): per sequence of T tokens,
//!   L = α Σ_i f_i P_i, f_i = N_r/(K_r·T) Σ_t 1[s_{i,t} ∈ TopK(s_t, K_r)],
//!   P_i = (1/T) Σ_t s_{i,t}/Σ_j s_{j,t}. As in the report's equation, the indicator takes the top-K
//!   of the *unbiased* affinities s (no bias, no group limit), not the biased selection. f is a
//!   constant; gradients flow through P. Averaged over the batch's sequences, summed over layers.
//! - MaxVio = (max_i c_i − c̄)/c̄, the report's imbalance measure.

use candle_core::{Result, Tensor, Var};
use fathom_model::moe::Routing;

/// Tokens routed to each expert.
pub fn expert_loads(experts: &[Vec<u32>], n_experts: usize) -> Vec<f64> {
    let mut c = vec![0.0; n_experts];
    for chosen in experts {
        for &e in chosen {
            c[e as usize] += 1.0;
        }
    }
    c
}

/// (max load − mean load) / mean load; 0 for no tokens.
pub fn max_violation(loads: &[f64]) -> f64 {
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    if mean == 0.0 {
        return 0.0;
    }
    let max = loads.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    (max - mean) / mean
}

/// The bias step: Δb_i = γ·sign(c̄ − c_i) (sign(0) = 0).
pub fn bias_deltas(loads: &[f64], gamma: f64) -> Vec<f64> {
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    loads
        .iter()
        .map(|&c| {
            let d = mean - c;
            if d > 0.0 {
                gamma
            } else if d < 0.0 {
                -gamma
            } else {
                0.0
            }
        })
        .collect()
}

/// Apply the bias step to a layer's `e_score_correction_bias` in place.
pub fn update_bias(bias: &Var, loads: &[f64], gamma: f64) -> Result<()> {
    let t = bias.as_tensor();
    let mut b: Vec<f32> = t.to_vec1()?;
    for (b, d) in b.iter_mut().zip(bias_deltas(loads, gamma)) {
        *b += d as f32;
    }
    bias.set(&Tensor::from_vec(b, t.shape(), t.device())?)
}

/// α Σ_i f_i P_i averaged over `batch` sequences (routing of batch·seq tokens, batch-major).
pub fn sequence_balance_loss(
    routing: &Routing,
    batch: usize,
    seq: usize,
    top_k: usize,
    alpha: f64,
) -> Result<Tensor> {
    let scores = &routing.scores; // [b·s, E], unbiased
    let e = scores.dim(1)?;
    let p = scores
        .broadcast_div(&scores.sum_keepdim(1)?)?
        .reshape((batch, seq, e))?
        .mean(1)?; // [b, E]
    let host: Vec<Vec<f32>> = scores.detach().to_vec2()?;
    let mut f = vec![0f32; batch * e];
    for (t, s) in host.iter().enumerate() {
        let mut idx: Vec<usize> = (0..e).collect();
        idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        for &i in &idx[..top_k] {
            f[(t / seq) * e + i] += (e as f64 / (top_k as f64 * seq as f64)) as f32;
        }
    }
    let f = Tensor::from_vec(f, (batch, e), scores.device())?.to_dtype(scores.dtype())?;
    (f * p)?.sum(1)?.mean_all()? * alpha
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn bias_moves_toward_balance_with_the_right_sign() {
        // Expert 0 overloaded, 2 underloaded, 1 exactly at the mean.
        let loads = [6.0, 3.0, 0.0];
        let d = bias_deltas(&loads, 0.001);
        assert_eq!(d, vec![-0.001, 0.0, 0.001]);
        let var = Var::from_slice(&[0.5f32, 0.0, -0.5], 3, &Device::Cpu).unwrap();
        update_bias(&var, &loads, 0.01).unwrap();
        let b: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        assert!((b[0] - 0.49).abs() < 1e-7 && b[1] == 0.0 && (b[2] + 0.49).abs() < 1e-7);
    }

    #[test]
    fn max_violation_and_loads() {
        let experts = vec![vec![0, 1], vec![0, 2], vec![0, 3]];
        let c = expert_loads(&experts, 4);
        assert_eq!(c, vec![3.0, 1.0, 1.0, 1.0]);
        assert!((max_violation(&c) - 1.0).abs() < 1e-12); // mean 1.5, (3 − 1.5)/1.5
        assert_eq!(max_violation(&[2.0, 2.0]), 0.0);
        assert_eq!(max_violation(&[0.0, 0.0]), 0.0);
    }

    #[test]
    fn sequence_loss_matches_hand_computation() {
        // One sequence of 2 tokens, 3 experts, top-1.
        let s = Tensor::new(&[[0.6f32, 0.3, 0.1], [0.2, 0.2, 0.6]], &Device::Cpu).unwrap();
        let r = Routing {
            experts: vec![vec![0], vec![2]],
            weights: Tensor::zeros((2, 1), DType::F32, &Device::Cpu).unwrap(),
            scores: s,
        };
        let l: f32 = sequence_balance_loss(&r, 1, 2, 1, 0.5)
            .unwrap()
            .to_scalar()
            .unwrap();
        // f = 3/(1·2)·[1, 0, 1] = [1.5, 0, 1.5]; P = [0.4, 0.25, 0.35]; Σ f P = 0.6 + 0.525.
        assert!((l - 0.5 * 1.125).abs() < 1e-6, "{l}");
        // Perfect balance gives α·1 (f_i = 1 on average and Σ P = 1).
    }
}
