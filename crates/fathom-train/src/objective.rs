//! The pretraining objective on a batch of token windows [b, n + 1]:
//! L = L_LM + (λ/D)·Σ_{k=1..D} L_k + Σ_layers L_Bal.
//!
//! - L_LM: next-token cross-entropy, position i predicts t_{i+1}.
//! - L_k (V3 §2.2): MTP module k predicts t_{i+k+1} at position i from h^{k−1}_i and Emb(t_{i+k}),
//!   h^0 the main model's final hidden state; valid for i < n − k, so module k sees n − k positions.
//! - L_Bal: the sequence-wise balance loss of every MoE layer, MTP blocks included (see `balance`).
//!
//! An optional loss mask [b, n + 1] (1 = learn this token as a target) restricts every term's
//! targets, for SFT on assistant tokens; the mean is over unmasked targets.

use crate::balance::sequence_balance_loss;
use candle_core::{DType, Result, Tensor};
use fathom_model::moe::Routing;
use fathom_model::ops::cross_entropy_rows;
use fathom_model::CausalLm;

pub struct LossParts {
    pub total: Tensor,
    pub lm: Tensor,
    /// L_k for k = 1..D.
    pub mtp: Vec<Tensor>,
    /// Σ over MoE layers of the sequence-wise balance loss (zero when α = 0).
    pub balance: Tensor,
    /// (HF layer index, routing) of every MoE layer run, MTP blocks at num_hidden_layers + k − 1.
    pub routings: Vec<(usize, Routing)>,
}

impl LossParts {
    /// Mean of the MTP losses L_k (None without MTP modules).
    pub fn mtp_mean(&self) -> Result<Option<f64>> {
        if self.mtp.is_empty() {
            return Ok(None);
        }
        let mut s = 0.0;
        for l in &self.mtp {
            s += scalar(l)?;
        }
        Ok(Some(s / self.mtp.len() as f64))
    }
}

/// Mean cross-entropy of logits [b, s, V] against targets [b, s] (u32), over positions where
/// `mask` [b, s] is 1 (all positions when None).
pub fn masked_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    let nll = cross_entropy_rows(&logits.reshape((b * s, v))?, &targets.reshape(b * s)?)?;
    match mask {
        None => nll.mean_all(),
        Some(m) => {
            let m = m.reshape(b * s)?.to_dtype(nll.dtype())?;
            let count = m.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            (nll * m)?.sum_all()? / count.max(1.0)
        }
    }
}

/// Compute every loss term for `tokens` [b, n + 1] (u32).
pub fn pretrain_loss(
    model: &CausalLm,
    tokens: &Tensor,
    loss_mask: Option<&Tensor>,
    mtp_weight: f64,
    balance_alpha: f64,
) -> Result<LossParts> {
    let (b, n1) = tokens.dims2()?;
    let n = n1 - 1;
    let inputs = tokens.narrow(1, 0, n)?;
    let out = model.forward_hidden(&inputs, 0, None)?;
    let mask_at = |start: usize, len: usize| -> Result<Option<Tensor>> {
        loss_mask.map(|m| m.narrow(1, start, len)).transpose()
    };
    let lm = masked_cross_entropy(
        &model.logits(&out.hidden)?,
        &tokens.narrow(1, 1, n)?,
        mask_at(1, n)?.as_ref(),
    )?;
    let mut routings = out.routings;
    let mut mtp = Vec::new();
    let mut prev = out.hidden;
    let depth = model.mtp.len();
    for (k0, module) in model.mtp.iter().enumerate() {
        let k = k0 + 1;
        if k >= n {
            break;
        }
        let len = n - k;
        let next = model.embed(&tokens.narrow(1, k, len)?)?;
        let (hk, r) =
            module.forward_with_routing(&prev.narrow(1, 0, len)?, &next, &model.rope, 0, None)?;
        if let Some(r) = r {
            routings.push((model.cfg.num_hidden_layers + k0, r));
        }
        let lk = masked_cross_entropy(
            &model.logits(&hk)?,
            &tokens.narrow(1, k + 1, len)?,
            mask_at(k + 1, len)?.as_ref(),
        )?;
        mtp.push(lk);
        prev = hk;
    }
    let mut balance = Tensor::zeros((), lm.dtype(), lm.device())?;
    if balance_alpha > 0.0 {
        if let Some(moe) = &model.cfg.moe {
            for (layer, r) in &routings {
                let seq = if *layer >= model.cfg.num_hidden_layers {
                    n - (layer - model.cfg.num_hidden_layers + 1)
                } else {
                    n
                };
                balance = (balance
                    + sequence_balance_loss(r, b, seq, moe.num_experts_per_tok, balance_alpha)?)?;
            }
        }
    }
    let mut total = (&lm + &balance)?;
    if !mtp.is_empty() {
        let sum = Tensor::stack(&mtp, 0)?.sum_all()?;
        total = (total + (sum * (mtp_weight / depth as f64))?)?;
    }
    Ok(LossParts {
        total,
        lm,
        mtp,
        balance,
        routings,
    })
}

/// Scalar value of a 0-d tensor as f64.
pub fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}
