//! Logit distillation losses (teacher → student over the same tokenizer), per position, averaged
//! over the masked positions:
//! - forward KL, KL(p_T ‖ p_S) = Σ_v p_T (log p_T − log p_S): the student covers the teacher's
//!   mass (Hinton et al.), with temperature τ applied to both and the usual τ² gradient scale;
//! - generalised Jensen–Shannon (GKD, Agarwal et al. 2024): with M = β·p_T + (1−β)·p_S,
//!   JSD_β = β·KL(p_T ‖ M) + (1−β)·KL(p_S ‖ M); β = 0.5 is the symmetric JSD; JSD_β/β tends to
//!   forward KL as β → 0 and JSD_β/(1−β) to reverse KL as β → 1. Fathom uses the unscaled form
//!   (as TRL's `GKDTrainer`).
//!
//! The teacher side is detached: gradients flow to the student logits only.

use candle_core::{Result, Tensor, D};
use fathom_model::ops::log_softmax_last;

/// KL(p_T ‖ p_S)·τ² over [n, V] (or [.., V]) logits; `mask` [n] selects positions.
pub fn forward_kl(student: &Tensor, teacher: &Tensor, mask: &Tensor, tau: f64) -> Result<Tensor> {
    let ls = log_softmax_last(&(student / tau)?)?;
    let lt = log_softmax_last(&(teacher.detach() / tau)?)?;
    let per = (lt.exp()? * (&lt - &ls)?)?.sum(D::Minus1)?;
    Ok((masked_mean(&per, mask)? * (tau * tau))?)
}

/// Generalised JSD_β between teacher and student distributions over [n, V] logits.
pub fn generalized_jsd(
    student: &Tensor,
    teacher: &Tensor,
    mask: &Tensor,
    beta: f64,
) -> Result<Tensor> {
    let ls = log_softmax_last(student)?;
    let lt = log_softmax_last(&teacher.detach())?;
    let (ps, pt) = (ls.exp()?, lt.exp()?);
    let m = ((&pt * beta)? + (&ps * (1.0 - beta))?)?;
    let lm = m.log()?;
    let kl_t = (&pt * (&lt - &lm)?)?.sum(D::Minus1)?;
    let kl_s = (&ps * (&ls - &lm)?)?.sum(D::Minus1)?;
    let per = ((kl_t * beta)? + (kl_s * (1.0 - beta))?)?;
    masked_mean(&per, mask)
}

fn masked_mean(per: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let per = per.flatten_all()?;
    let mask = mask.flatten_all()?;
    let den = mask
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?;
    (per * mask)?.sum_all()? / den.max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    use crate::test_util::{assert_gradient_matches_fd, tensor as t};

    fn kl(p: &[f64], q: &[f64]) -> f64 {
        p.iter().zip(q).map(|(a, b)| a * (a / b).ln()).sum()
    }

    #[test]
    fn values_by_hand() {
        // Logits ln p give p directly.
        let ps = [0.5, 0.3, 0.2];
        let pt = [0.7, 0.2, 0.1];
        let student = t(&ps.map(f64::ln), (1, 3));
        let teacher = t(&pt.map(f64::ln), (1, 3));
        let mask = Tensor::new(&[1.0f64], &Device::Cpu).unwrap();
        let got = forward_kl(&student, &teacher, &mask, 1.0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((got - kl(&pt, &ps)).abs() < 1e-12);
        let beta = 0.3;
        let m: Vec<f64> = pt
            .iter()
            .zip(&ps)
            .map(|(a, b)| beta * a + (1.0 - beta) * b)
            .collect();
        let want = beta * kl(&pt, &m) + (1.0 - beta) * kl(&ps, &m);
        let got = generalized_jsd(&student, &teacher, &mask, beta)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((got - want).abs() < 1e-12);
        // Identical distributions: zero; β = 0.5 is symmetric.
        let z = generalized_jsd(&student, &student, &mask, 0.5)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(z.abs() < 1e-12);
        let a = generalized_jsd(&student, &teacher, &mask, 0.5)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let b = generalized_jsd(&teacher, &student, &mask, 0.5)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((a - b).abs() < 1e-12);
        // Masked positions do not count.
        let s2 = t(&[ps.map(f64::ln), [0.0, 5.0, -5.0]].concat(), (2, 3));
        let t2 = t(&[pt.map(f64::ln), [9.0, 0.0, 0.0]].concat(), (2, 3));
        let m2 = Tensor::new(&[1.0f64, 0.0], &Device::Cpu).unwrap();
        let got = forward_kl(&s2, &t2, &m2, 1.0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((got - kl(&pt, &ps)).abs() < 1e-12);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let base = [0.3, -1.2, 0.8, 0.1, 2.0, -0.4];
        let teacher = t(&[1.0, 0.2, -0.5, -1.0, 0.5, 0.9], (2, 3));
        let mask = Tensor::new(&[1.0f64, 1.0], &Device::Cpu).unwrap();
        type LossFn = fn(&Tensor, &Tensor, &Tensor) -> Tensor;
        let losses: [(&str, LossFn); 2] = [
            ("kl", |s, t, m| forward_kl(s, t, m, 2.0).unwrap()),
            ("jsd", |s, t, m| generalized_jsd(s, t, m, 0.3).unwrap()),
        ];
        for (name, f) in losses {
            assert_gradient_matches_fd(name, &base, (2, 3), 1e-7, |x| f(x, &teacher, &mask));
        }
    }
}
