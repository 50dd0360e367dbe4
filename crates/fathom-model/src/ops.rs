//! Differentiable building blocks.
//!
//! candle's fused `softmax_last_dim` and `rms_norm` have no backward pass (gradients silently
//! vanish). On CPU (f32/f64) softmax and log-softmax run Fathom's own fused kernels with backward
//! passes ([`crate::fused`]); elsewhere the compositions below (the same function). Each has an f64
//! finite-difference gradient test, and the fused and composed forms are tested equal.

use candle_core::{DType, Result, Tensor, D};

/// softmax over the last dim: exp(x - max) / Σ exp(x - max).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    match crate::fused::softmax_last(x)? {
        Some(y) => Ok(y),
        None => softmax_last_composed(x),
    }
}

/// log-softmax over the last dim.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    match crate::fused::log_softmax_last(x)? {
        Some(y) => Ok(y),
        None => log_softmax_last_composed(x),
    }
}

/// softmax from candle primitives.
pub fn softmax_last_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// log-softmax from candle primitives.
pub fn log_softmax_last_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// σ(x) = 1 / (1 + e^{-x}).
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// SiLU(x) = x·σ(x): candle's unary op (it has a backward; FD-tested in tests/gradients.rs).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// y = x Wᵀ (+ b) for x of any rank ≥ 2; W is [out, in].
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = match x.dims() {
        [b0, s, i] => x
            .reshape((b0 * s, *i))?
            .matmul(&w.t()?)?
            .reshape((*b0, *s, w.dim(0)?))?,
        _ => x.matmul(&w.t()?)?,
    };
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Mean cross-entropy of logits [n, V] against targets [n] (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    cross_entropy_rows(logits, targets)?.mean_all()
}

/// Per-row cross-entropy −log softmax(x_i)[t_i] of logits [n, V] → [n] (fused on CPU).
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if let Some(l) = crate::fused::cross_entropy_rows(logits, targets)? {
        return Ok(l);
    }
    let lp = log_softmax_last(logits)?;
    let picked = lp.gather(&targets.unsqueeze(1)?.to_dtype(DType::U32)?, 1)?;
    picked.neg()?.squeeze(1)
}
