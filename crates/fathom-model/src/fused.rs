//! Fused CPU kernels with hand-written backward passes: softmax, log-softmax (last dim) and RMSNorm.
//!
//! Composed from candle primitives these are 6–7 ops each, every one allocating and (in training)
//! recording its own backward node; on a 2-core CPU that overhead dominated training. Each kernel
//! runs one pass per row and registers a backward that is itself one fused pass:
//! - softmax y = e^{x−max}/Σ:           dx = y ⊙ (g − Σ_j g_j y_j)
//! - log-softmax y = x − max − log Σ:   dx = g − e^{y} Σ_j g_j
//! - RMSNorm y = x·r·w, r = (mean x² + ε)^{−½}:
//!   dx = r·(g⊙w) − x·r³·mean(g⊙w⊙x),  dw = Σ_rows g⊙x·r
//!
//! - causal attention softmax y = softmax(scale·x + causal mask) over [.., s, t] with queries at
//!   positions offset..: dx = scale · y ⊙ (g − Σ_j g_j y_j) (masked entries have y = 0)
//! - cross-entropy rows ℓ_i = logsumexp(x_i) − x_{i,t_i}: dx_i = g_i · (softmax(x_i) − onehot(t_i))
//!
//! f32 and f64 (the finite-difference tests) on CPU; other devices use the composed versions in
//! [`crate::ops`], which are numerically the same function.

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result,
    Shape, Tensor,
};
use num_traits::Float;

/// The contiguous slice a layout addresses.
fn slice<'a, T>(v: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("fused op: input must be contiguous"),
    }
}

fn last_dim(l: &Layout) -> usize {
    *l.dims().last().unwrap_or(&1)
}

macro_rules! dispatch1 {
    ($s:expr, $l:expr, $f:ident) => {
        match $s {
            CpuStorage::F32(v) => CpuStorage::F32($f(slice(v, $l)?, last_dim($l))),
            CpuStorage::F64(v) => CpuStorage::F64($f(slice(v, $l)?, last_dim($l))),
            other => candle_core::bail!("fused op: unsupported dtype {:?}", other.dtype()),
        }
    };
}

macro_rules! dispatch2 {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, $f:ident) => {
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32($f(slice(a, $l1)?, slice(b, $l2)?, last_dim($l1)))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64($f(slice(a, $l1)?, slice(b, $l2)?, last_dim($l1)))
            }
            _ => candle_core::bail!("fused op: unsupported or mismatched dtypes"),
        }
    };
}

fn softmax_rows<T: Float>(x: &[T], d: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let max = row.iter().cloned().fold(T::neg_infinity(), T::max);
        let start = out.len();
        let mut sum = T::zero();
        for &v in row {
            let e = (v - max).exp();
            sum = sum + e;
            out.push(e);
        }
        let inv = T::one() / sum;
        for v in &mut out[start..] {
            *v = *v * inv;
        }
    }
    out
}

fn log_softmax_rows<T: Float>(x: &[T], d: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let max = row.iter().cloned().fold(T::neg_infinity(), T::max);
        let sum = row.iter().fold(T::zero(), |s, &v| s + (v - max).exp());
        let shift = max + sum.ln();
        out.extend(row.iter().map(|&v| v - shift));
    }
    out
}

fn softmax_grad_rows<T: Float>(y: &[T], g: &[T], d: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(y.len());
    for (yr, gr) in y.chunks_exact(d).zip(g.chunks_exact(d)) {
        let dot = yr.iter().zip(gr).fold(T::zero(), |s, (&a, &b)| s + a * b);
        out.extend(yr.iter().zip(gr).map(|(&a, &b)| a * (b - dot)));
    }
    out
}

fn log_softmax_grad_rows<T: Float>(y: &[T], g: &[T], d: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(y.len());
    for (yr, gr) in y.chunks_exact(d).zip(g.chunks_exact(d)) {
        let sum = gr.iter().fold(T::zero(), |s, &b| s + b);
        out.extend(yr.iter().zip(gr).map(|(&a, &b)| b - a.exp() * sum));
    }
    out
}

/// A row-wise op `$op` (forward kernel `$fwd` over rows of the last dim) whose backward is the
/// row-wise op `$grad` (kernel `$bwd` over (y, g)).
macro_rules! row_op {
    ($op:ident, $name:literal, $fwd:ident, $grad:ident, $grad_name:literal, $bwd:ident) => {
        struct $op;
        struct $grad;

        impl CustomOp1 for $op {
            fn name(&self) -> &'static str {
                $name
            }
            fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
                Ok((dispatch1!(s, l, $fwd), l.shape().clone()))
            }
            fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
                Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &$grad)?))
            }
        }

        impl CustomOp2 for $grad {
            fn name(&self) -> &'static str {
                $grad_name
            }
            fn cpu_fwd(
                &self,
                s1: &CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                Ok((dispatch2!(s1, l1, s2, l2, $bwd), l1.shape().clone()))
            }
        }
    };
}

row_op!(
    SoftmaxLast,
    "fathom-softmax-last",
    softmax_rows,
    SoftmaxGrad,
    "fathom-softmax-grad",
    softmax_grad_rows
);
row_op!(
    LogSoftmaxLast,
    "fathom-log-softmax-last",
    log_softmax_rows,
    LogSoftmaxGrad,
    "fathom-log-softmax-grad",
    log_softmax_grad_rows
);

/// RMSNorm forward over rows of x with weight w and epsilon eps.
struct RmsNormOp {
    eps: f64,
}
/// Gradient of RMSNorm: returns [dx (rows·d) ; dw (d)] flattened, split by the caller.
struct RmsNormGrad {
    eps: f64,
}

fn rms_norm_rows<T: Float>(x: &[T], w: &[T], d: usize, eps: f64) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    let eps = T::from(eps).unwrap();
    let dn = T::from(d).unwrap();
    for row in x.chunks_exact(d) {
        let ms = row.iter().fold(T::zero(), |s, &v| s + v * v) / dn;
        let r = T::one() / (ms + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(&v, &w)| v * r * w));
    }
    out
}

fn rms_norm_grad_rows<T: Float>(x: &[T], w: &[T], g: &[T], d: usize, eps: f64) -> Vec<T> {
    let rows = x.len() / d;
    let mut out = vec![T::zero(); rows * d + d];
    let (dx, dw) = out.split_at_mut(rows * d);
    let eps = T::from(eps).unwrap();
    let dn = T::from(d).unwrap();
    for ((xr, gr), dxr) in x
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let ms = xr.iter().fold(T::zero(), |s, &v| s + v * v) / dn;
        let r = T::one() / (ms + eps).sqrt();
        let mut dot = T::zero();
        for j in 0..d {
            dot = dot + gr[j] * w[j] * xr[j];
            dw[j] = dw[j] + gr[j] * xr[j] * r;
        }
        let c = r * r * r * dot / dn;
        for j in 0..d {
            dxr[j] = r * gr[j] * w[j] - xr[j] * c;
        }
    }
    out
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "fathom-rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l1);
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                CpuStorage::F32(rms_norm_rows(slice(x, l1)?, slice(w, l2)?, d, self.eps))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                CpuStorage::F64(rms_norm_rows(slice(x, l1)?, slice(w, l2)?, d, self.eps))
            }
            _ => candle_core::bail!("fused rms_norm: unsupported or mismatched dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = x.apply_op3_no_bwd(w, &g.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        let n = x.elem_count();
        let dx = both.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = both.narrow(0, n, w.elem_count())?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fathom-rms-norm-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l1);
        let n = l1.shape().elem_count() + d;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(g)) => CpuStorage::F32(
                rms_norm_grad_rows(slice(x, l1)?, slice(w, l2)?, slice(g, l3)?, d, self.eps),
            ),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(g)) => CpuStorage::F64(
                rms_norm_grad_rows(slice(x, l1)?, slice(w, l2)?, slice(g, l3)?, d, self.eps),
            ),
            _ => candle_core::bail!("fused rms_norm grad: unsupported or mismatched dtypes"),
        };
        Ok((out, Shape::from(n)))
    }
}

struct CausalSoftmax {
    scale: f64,
    offset: usize,
}
struct CausalSoftmaxGrad {
    scale: f64,
}

fn causal_softmax_rows<T: Float + Send + Sync>(
    x: &[T],
    s: usize,
    t: usize,
    scale: f64,
    offset: usize,
) -> Vec<T> {
    let scale = T::from(scale).unwrap();
    let mut out = vec![T::zero(); x.len()];
    // Rows are independent: split over the pool (serial, a long prefill's softmax was ~8 % of it
    // on one core while the other waited).
    let dst = fathom_runtime::parallel::SharedOut(out.as_mut_ptr());
    let rows = x.len() / t.max(1);
    fathom_runtime::parallel::for_chunks(rows, x.len() * 16, |range| {
        for r in range {
            // SAFETY: row r of `out` (sized above) is written by this chunk only.
            let o = unsafe { dst.slice(r * t, t) };
            softmax_row(&x[r * t..(r + 1) * t], o, r % s, scale, offset);
        }
    });
    out
}

/// One row of [`causal_softmax_rows`]: query i at position offset + i sees keys 0..=offset + i.
fn softmax_row<T: Float>(row: &[T], o: &mut [T], i: usize, scale: T, offset: usize) {
    let visible = (offset + i + 1).min(row.len());
    let max = row[..visible]
        .iter()
        .fold(T::neg_infinity(), |m, &v| m.max(v * scale));
    let mut sum = T::zero();
    for j in 0..visible {
        let e = (row[j] * scale - max).exp();
        o[j] = e;
        sum = sum + e;
    }
    let inv = T::one() / sum;
    for v in &mut o[..visible] {
        *v = *v * inv;
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fathom-causal-softmax"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let (s, t) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let out = match st {
            CpuStorage::F32(v) => CpuStorage::F32(causal_softmax_rows(
                slice(v, l)?,
                s,
                t,
                self.scale,
                self.offset,
            )),
            CpuStorage::F64(v) => CpuStorage::F64(causal_softmax_rows(
                slice(v, l)?,
                s,
                t,
                self.scale,
                self.offset,
            )),
            other => candle_core::bail!("fused op: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(
            &g.contiguous()?,
            &CausalSoftmaxGrad { scale: self.scale },
        )?))
    }
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "fathom-causal-softmax-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn scaled<T: Float>(y: &[T], g: &[T], d: usize, scale: f64) -> Vec<T> {
            let scale = T::from(scale).unwrap();
            let mut out = softmax_grad_rows(y, g, d);
            for v in &mut out {
                *v = *v * scale;
            }
            out
        }
        let d = last_dim(l1);
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(scaled(slice(a, l1)?, slice(b, l2)?, d, self.scale))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64(scaled(slice(a, l1)?, slice(b, l2)?, d, self.scale))
            }
            _ => candle_core::bail!("fused op: unsupported or mismatched dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }
}

struct CrossEntropyRows;
struct CrossEntropyGrad;

fn ce_rows<T: Float>(x: &[T], t: &[u32], v: usize) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(t.len());
    for (row, &target) in x.chunks_exact(v).zip(t) {
        if target as usize >= v {
            candle_core::bail!("cross-entropy: target {target} outside the vocabulary of {v}");
        }
        let max = row.iter().cloned().fold(T::neg_infinity(), T::max);
        let sum = row.iter().fold(T::zero(), |s, &x| s + (x - max).exp());
        out.push(max + sum.ln() - row[target as usize]);
    }
    Ok(out)
}

fn ce_grad_rows<T: Float>(x: &[T], t: &[u32], g: &[T], v: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for ((row, &target), &gi) in x.chunks_exact(v).zip(t).zip(g) {
        let max = row.iter().cloned().fold(T::neg_infinity(), T::max);
        let start = out.len();
        let mut sum = T::zero();
        for &x in row {
            let e = (x - max).exp();
            sum = sum + e;
            out.push(e);
        }
        let scale = gi / sum;
        for v in &mut out[start..] {
            *v = *v * scale;
        }
        out[start + target as usize] = out[start + target as usize] - gi;
    }
    out
}

impl CustomOp2 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "fathom-cross-entropy"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let v = last_dim(l1);
        let CpuStorage::U32(t) = s2 else {
            candle_core::bail!("cross-entropy: targets must be u32")
        };
        let t = slice(t, l2)?;
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(ce_rows(slice(x, l1)?, t, v)?),
            CpuStorage::F64(x) => CpuStorage::F64(ce_rows(slice(x, l1)?, t, v)?),
            other => candle_core::bail!("fused op: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from(t.len())))
    }
    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(x.apply_op3_no_bwd(t, &g.contiguous()?, &CrossEntropyGrad)?),
            None,
        ))
    }
}

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fathom-cross-entropy-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let v = last_dim(l1);
        let CpuStorage::U32(t) = s2 else {
            candle_core::bail!("cross-entropy: targets must be u32")
        };
        let t = slice(t, l2)?;
        let out = match (s1, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                CpuStorage::F32(ce_grad_rows(slice(x, l1)?, t, slice(g, l3)?, v))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                CpuStorage::F64(ce_grad_rows(slice(x, l1)?, t, slice(g, l3)?, v))
            }
            _ => candle_core::bail!("fused op: unsupported or mismatched dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Fused causal softmax of raw scores [.., s, t] (queries at positions offset..), scaled by `scale`.
pub fn causal_softmax(x: &Tensor, scale: f64, offset: usize) -> Result<Option<Tensor>> {
    if !fusable(x) {
        return Ok(None);
    }
    Ok(Some(
        x.contiguous()?.apply_op1(CausalSoftmax { scale, offset })?,
    ))
}

/// Per-row cross-entropy of logits [n, V] against u32 targets [n] → [n].
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Option<Tensor>> {
    if !fusable(logits) {
        return Ok(None);
    }
    Ok(Some(logits.contiguous()?.apply_op2(
        &targets.to_dtype(DType::U32)?.contiguous()?,
        CrossEntropyRows,
    )?))
}

fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Fused softmax over the last dim (None when the device/dtype has no fused kernel).
pub fn softmax_last(x: &Tensor) -> Result<Option<Tensor>> {
    if !fusable(x) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(SoftmaxLast)?))
}

/// Fused log-softmax over the last dim.
pub fn log_softmax_last(x: &Tensor) -> Result<Option<Tensor>> {
    if !fusable(x) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(LogSoftmaxLast)?))
}

/// Fused RMSNorm over the last dim with weight w [d].
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !fusable(x) || w.dtype() != x.dtype() {
        return Ok(None);
    }
    Ok(Some(
        x.contiguous()?
            .apply_op2(&w.contiguous()?, RmsNormOp { eps })?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::causal_softmax_composed;
    use crate::norm::RmsNorm;
    use crate::ops::{log_softmax_last_composed, softmax_last_composed};
    use candle_core::{Device, Var};

    fn assert_close(a: &[f64], b: &[f64], what: &str) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() < 1e-12 * (1.0 + y.abs()),
                "{what}: {x} vs {y}"
            );
        }
    }

    fn check(
        shape: &[usize],
        fused: &dyn Fn(&Tensor) -> Result<Tensor>,
        composed: &dyn Fn(&Tensor) -> Result<Tensor>,
        what: &str,
    ) {
        let x = Var::randn(0f64, 2.0, shape, &Device::Cpu).unwrap();
        let y = fused(x.as_tensor()).unwrap();
        let c = Tensor::randn(0f64, 1.0, y.shape(), &Device::Cpu).unwrap();
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
            let y = f(x.as_tensor()).unwrap();
            let g = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            (flat(&y), flat(g.get(x.as_tensor()).unwrap()))
        };
        let (yf, gf) = run(fused);
        let (yc, gc) = run(composed);
        assert_close(&yf, &yc, &format!("{what} value"));
        assert_close(&gf, &gc, &format!("{what} gradient"));
    }

    #[test]
    fn fused_kernels_equal_their_compositions_in_value_and_gradient() {
        check(
            &[3, 5, 7],
            &|x| Ok(softmax_last(x)?.unwrap()),
            &softmax_last_composed,
            "softmax",
        );
        check(
            &[4, 9],
            &|x| Ok(log_softmax_last(x)?.unwrap()),
            &log_softmax_last_composed,
            "log-softmax",
        );
        for offset in [0, 3] {
            check(
                &[2, 3, 4, 4 + offset],
                &|x| Ok(causal_softmax(x, 0.7, offset)?.unwrap()),
                &|x| causal_softmax_composed(x, 0.7, offset),
                "causal softmax",
            );
        }
        let w = Var::randn(0f64, 1.0, 6, &Device::Cpu).unwrap();
        let norm = RmsNorm {
            weight: w.as_tensor().clone(),
            eps: 1e-6,
        };
        check(
            &[2, 3, 6],
            &|x| norm.forward(x),
            &|x| norm.forward_composed(x),
            "rms norm",
        );
        // The weight gradient too.
        let x = Tensor::randn(0f64, 1.0, (5, 6), &Device::Cpu).unwrap();
        let gw = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Vec<f64> {
            let g = f(&x)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            g.get(w.as_tensor()).unwrap().to_vec1().unwrap()
        };
        assert_close(
            &gw(&|x| norm.forward(x)),
            &gw(&|x| norm.forward_composed(x)),
            "rms norm weight grad",
        );
        let targets = Tensor::new(&[2u32, 0, 8, 5], &Device::Cpu).unwrap();
        check(
            &[4, 9],
            &|x| Ok(cross_entropy_rows(x, &targets)?.unwrap()),
            &|x| {
                log_softmax_last_composed(x)?
                    .gather(&targets.unsqueeze(1)?, 1)?
                    .neg()?
                    .squeeze(1)
            },
            "cross-entropy",
        );
        let bad = Tensor::new(&[9u32, 0, 0, 0], &Device::Cpu).unwrap();
        let x = Tensor::zeros((4, 9), DType::F32, &Device::Cpu).unwrap();
        assert!(
            cross_entropy_rows(&x, &bad).is_err(),
            "out-of-vocabulary target is an error"
        );
    }
}
