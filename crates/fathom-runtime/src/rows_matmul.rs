//! y = x·Wᵀ for a few rows of x (decode, continuous batching's decode step) without packing.
//!
//! candle's CPU matmul (the `gemm` crate) packs the weight matrix into panels on every call: right
//! for prefill, where many rows share the packed panels, but for 1–64 rows the packing copies as
//! many bytes as the product reads, and profiling a 16-sequence decode step of the default model
//! put ~30 % of its time in gemm's driver. Here each group of four weight rows (contiguous in
//! W [n, k]) is read once and multiplied with every row of x while it sits in L1: the weight
//! traffic is paid once per step, whatever the batch. Inference only: no backward is recorded, so
//! `fathom-model`'s `Linear` uses it only for tensors that do not track gradients.
//!
//! The inner products run 8 lanes wide with fused multiply-adds when the CPU has AVX2 and FMA
//! (runtime-detected), else in portable Rust; f32 sums in a different order than `gemm`'s, so
//! results agree to rounding (tested).

use crate::parallel::{for_chunks, SharedOut};
use candle_core::{DType, Result, Tensor};

/// Up to this many rows use the kernel (measured at 32 and 64 rows, 2 threads: faster than candle's
/// GEMM for the default model, 10.4k → 16.8k tok/s, and the dense Qwen2-150m, 236 → 395 tok/s);
/// longer prefill chunks go to the GEMM.
pub const MAX_ROWS: usize = 64;

pub fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Σ a_i b_i with 8 independent partial sums (one 8-lane vector; hides the add latency chain);
/// `FMA` fuses each multiply-add (only inside an AVX2+FMA function, where it inlines to vector
/// FMAs — elsewhere `mul_add` would be a library call).
#[inline(always)]
fn dot8<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = if FMA {
                x[l].mul_add(y[l], acc[l])
            } else {
                acc[l] + x[l] * y[l]
            };
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot8::<true>(a, b)
}

/// Σ a_i b_i over the shorter of the two slices.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked at runtime).
        return unsafe { dot_avx2(a, b) };
    }
    dot_portable(a, b)
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    dot8::<false>(a, b)
}

/// acc += w · x (axpy) for the attention output sums: 8-lane FMAs where the CPU has AVX2 and
/// FMA (each element rounds once, as `mul_add`), else separate multiply and add.
pub fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked at runtime).
        unsafe { axpy_avx2(acc, w, x) };
        return;
    }
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += w * v;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(acc: &mut [f32], w: f32, x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a = w.mul_add(v, *a);
    }
}

/// y [rows, n] = x [rows, k] · W[n, k]ᵀ in portable Rust (CPUs without AVX2/FMA); output (r, j)
/// goes to `out` + r·ld + j.
///
/// # Safety
/// `out` covers rows × ld floats (ld ≥ n) that no other thread writes meanwhile.
unsafe fn rows_times_wt(
    x: &[f32],
    rows: usize,
    w: &[f32],
    n: usize,
    k: usize,
    out: SharedOut,
    ld: usize,
) {
    // Weight rows in blocks that stay in L1 (4 × k floats) while every x row passes over them.
    for j0 in (0..n).step_by(4) {
        let j1 = (j0 + 4).min(n);
        for r in 0..rows {
            let xr = &x[r * k..(r + 1) * k];
            for j in j0..j1 {
                *out.at(r * ld + j) = dot_portable(xr, &w[j * k..(j + 1) * k]);
            }
        }
    }
}

/// The sum of a vector's eight lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// The AVX2 kernel. Up to [`FEW_ROWS`] rows: [`few_rows_avx2`]. More: register blocks of 2 rows
/// of x × 4 rows of W, eight independent 8-lane FMA accumulators, so each loaded x chunk serves
/// four weight rows and each weight chunk two x rows (arithmetic matters at batch sizes); an odd
/// last row passes over each block of four weight rows after the pairs, while it is in L1.
/// Output (r, j) goes to `out` + r·ld + j.
///
/// # Safety
/// The CPU has AVX2 and FMA; `out` covers rows × ld floats (ld ≥ n) no other thread writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_times_wt_avx2(
    x: &[f32],
    rows: usize,
    w: &[f32],
    n: usize,
    k: usize,
    out: SharedOut,
    ld: usize,
) {
    use std::arch::x86_64::*;
    let k8 = k - k % 8;
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    if rows <= FEW_ROWS {
        few_rows_avx2(x, rows, w, n, k, out, ld);
        return;
    }
    let paired = rows - rows % 2;
    let mut j = 0;
    while j + 4 <= n {
        let wr = [0, 1, 2, 3].map(|q| wp.add((j + q) * k));
        let mut r = 0;
        while r < paired {
            let x0 = xp.add(r * k);
            let x1 = xp.add((r + 1) * k);
            let mut a0 = [_mm256_setzero_ps(); 4];
            let mut a1 = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < k8 {
                let v0 = _mm256_loadu_ps(x0.add(c));
                let v1 = _mm256_loadu_ps(x1.add(c));
                for q in 0..4 {
                    let wv = _mm256_loadu_ps(wr[q].add(c));
                    a0[q] = _mm256_fmadd_ps(v0, wv, a0[q]);
                    a1[q] = _mm256_fmadd_ps(v1, wv, a1[q]);
                }
                c += 8;
            }
            for q in 0..4 {
                let mut t0 = hsum(a0[q]);
                let mut t1 = hsum(a1[q]);
                for c in k8..k {
                    t0 += *x0.add(c) * *wr[q].add(c);
                    t1 += *x1.add(c) * *wr[q].add(c);
                }
                *out.at(r * ld + j + q) = t0;
                *out.at((r + 1) * ld + j + q) = t1;
            }
            r += 2;
        }
        if paired < rows {
            // The odd last row over the same four weight rows, still in L1.
            dot_block::<4, false>(xp.add(paired * k), wp, j, k, out.at(paired * ld + j));
        }
        j += 4;
    }
    // The last n mod 4 weight rows.
    for jt in j..n {
        for r in 0..rows {
            *out.at(r * ld + jt) = dot8::<true>(&x[r * k..][..k], &w[jt * k..][..k]);
        }
    }
}

/// Outputs j..j+Q of one row, written to y[0..Q]: W[j..j+Q, k] · x [k] with Q independent
/// 8-lane FMA chains (one chain would wait on the FMA latency every step), one x load serving all
/// Q weight rows. Each output is summed lanes over chunks, then [`hsum`], then the k tail — the
/// order every path of this file uses, so a row's result does not depend on the batch.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_block<const Q: usize, const PREFETCH_NEXT: bool>(
    x: *const f32,
    w: *const f32,
    j: usize,
    k: usize,
    y: *mut f32,
) {
    use std::arch::x86_64::*;
    let k8 = k - k % 8;
    let wr: [*const f32; Q] = std::array::from_fn(|q| w.add((j + q) * k));
    let mut acc = [_mm256_setzero_ps(); Q];
    let mut c = 0;
    while c < k8 {
        if PREFETCH_NEXT && c % 16 == 0 {
            // The next block's weight rows (Q·k floats on), a cache line each.
            for row in wr {
                _mm_prefetch::<_MM_HINT_T0>(row.add(Q * k + c) as *const i8);
            }
        }
        let v = _mm256_loadu_ps(x.add(c));
        for q in 0..Q {
            acc[q] = _mm256_fmadd_ps(v, _mm256_loadu_ps(wr[q].add(c)), acc[q]);
        }
        c += 8;
    }
    for q in 0..Q {
        let mut t = hsum(acc[q]);
        for c in k8..k {
            t += *x.add(c) * *wr[q].add(c);
        }
        *y.add(q) = t;
    }
}

/// Up to this many rows, [`few_rows_avx2`]; more take the 2 × 4 register blocks, whose paired
/// FMAs win once arithmetic outweighs the weight stream (`examples/stream_bench.rs`, [1152, 384]:
/// 5 rows 1.54× vs 1.71× one row's time, 6 rows 1.70× vs 1.75×, 8 rows 2.02× vs 1.96×, 16 rows
/// 3.25× vs 2.85×).
const FEW_ROWS: usize = 6;

/// Weight rows j..j+8 against `rows` (2..=[`FEW_ROWS`]) x rows, k in chunks of [`K_CHUNK`]
/// floats: every x row passes over a chunk (8 × 1 KB) while it is in L1, its eight accumulators
/// parked on the stack between chunks — so a long k (1152: 36 KB for eight rows, past this
/// machine's 32 KB L1) does not send the later passes to L2. The first pass streams W from memory
/// as one-row decode does; the second prefetches the next block's lines (`prefetch_next`), so
/// memory keeps streaming while the extra rows compute. Each output is summed exactly as
/// [`dot_block`] sums it (lanes over k in order, [`hsum`], the k tail).
///
/// # Safety
/// As [`few_rows_avx2`]; rows ≤ FEW_ROWS.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block8_over_rows(
    x: *const f32,
    rows: usize,
    w: *const f32,
    j: usize,
    k: usize,
    out: SharedOut,
    ld: usize,
    prefetch_next: bool,
) {
    use std::arch::x86_64::*;
    let k8 = k - k % 8;
    let wr: [*const f32; 8] = std::array::from_fn(|q| w.add((j + q) * k));
    let mut parked = [[_mm256_setzero_ps(); 8]; FEW_ROWS];
    let mut c0 = 0;
    while c0 < k8 {
        let c1 = (c0 + K_CHUNK).min(k8);
        for (r, acc_r) in parked.iter_mut().enumerate().take(rows) {
            let xr = x.add(r * k);
            let mut acc = *acc_r;
            let mut c = c0;
            while c < c1 {
                if prefetch_next && r == 1 && c % 16 == 0 {
                    for row in wr {
                        _mm_prefetch::<_MM_HINT_T0>(row.add(8 * k + c) as *const i8);
                    }
                }
                let v = _mm256_loadu_ps(xr.add(c));
                for q in 0..8 {
                    acc[q] = _mm256_fmadd_ps(v, _mm256_loadu_ps(wr[q].add(c)), acc[q]);
                }
                c += 8;
            }
            *acc_r = acc;
        }
        c0 = c1;
    }
    for (r, acc) in parked.iter().enumerate().take(rows) {
        let xr = x.add(r * k);
        for q in 0..8 {
            let mut t = hsum(acc[q]);
            for c in k8..k {
                t += *xr.add(c) * *wr[q].add(c);
            }
            *out.at(r * ld + j + q) = t;
        }
    }
}

/// Floats of k per pass in [`block8_over_rows`]: eight weight rows × 1 KB stay in L1.
const K_CHUNK: usize = 256;

/// Past this k, eight weight rows (8 × 4 × k bytes) crowd this machine's 32 KB L1 and
/// [`few_rows_avx2`] chunks k (`examples/stream_bench.rs`, [384, 1152]: two rows 1.14–1.18× one
/// row's time instead of 1.21–1.25×; at k = 384 chunking measured slower, 1.15× vs 1.09×).
const LONG_K: usize = 768;

/// y [rows, n] = x [rows, k] · W[n, k]ᵀ for a few rows (decode, speculative verification): W in
/// blocks of eight rows, every x row passing over a block while it is in L1 (whole, or in chunks
/// of k past [`LONG_K`]: [`block8_over_rows`]); one row is [`dot_block`] alone. A weight-bound
/// 2–4-row call costs little more than one row.
///
/// # Safety
/// The CPU has AVX2 and FMA; `out` covers rows × ld floats (ld ≥ n) no other thread writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn few_rows_avx2(
    x: &[f32],
    rows: usize,
    w: &[f32],
    n: usize,
    k: usize,
    out: SharedOut,
    ld: usize,
) {
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut j = 0;
    while j + 8 <= n {
        let has_next = j + 16 <= n;
        if rows == 1 {
            dot_block::<8, false>(xp, wp, j, k, out.at(j));
        } else if k > LONG_K {
            block8_over_rows(xp, rows, wp, j, k, out, ld, has_next);
        } else {
            // Eight weight rows fit L1 whole: each x row passes over all of k, the second pass
            // prefetching the next block (`examples/stream_bench.rs`, [1152, 384]: two rows
            // 1.08–1.12× one row's time, 1.34× with the 2 × 4 register blocks).
            dot_block::<8, false>(xp, wp, j, k, out.at(j));
            for r in 1..rows {
                let y = out.at(r * ld + j);
                if r == 1 && has_next {
                    dot_block::<8, true>(xp.add(r * k), wp, j, k, y);
                } else {
                    dot_block::<8, false>(xp.add(r * k), wp, j, k, y);
                }
            }
        }
        j += 8;
    }
    if j + 4 <= n {
        for r in 0..rows {
            dot_block::<4, false>(xp.add(r * k), wp, j, k, out.at(r * ld + j));
        }
        j += 4;
    }
    for jt in j..n {
        for r in 0..rows {
            *out.at(r * ld + jt) = dot8::<true>(&x[r * k..][..k], &w[jt * k..][..k]);
        }
    }
}

/// x [rows, k] (host f32) · wᵀ for w [n, k] dense f32 on the CPU, not tracking gradients;
/// `None` when w is anything else.
pub fn rows_times_weight(x: &[f32], rows: usize, w: &Tensor) -> Option<Vec<f32>> {
    if w.dtype() != DType::F32 || !w.device().is_cpu() || w.track_op() {
        return None;
    }
    let (n, k) = w.dims2().ok()?;
    if x.len() != rows * k {
        return None;
    }
    let (guard, layout) = w.storage_and_layout();
    let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((a, b))) =
        (&*guard, layout.contiguous_offsets())
    else {
        return None;
    };
    let ws = &data[a..b];
    let mut y = vec![0f32; rows * n];
    let out = SharedOut(y.as_mut_ptr());
    // Threads take disjoint blocks of 8 weight rows, i.e. disjoint columns of y. Block edges are
    // multiples of 8, so every output is summed by the same kernel path as in one serial call.
    for_chunks(n.div_ceil(8), rows * n * k, |blocks| {
        let (j0, j1) = (blocks.start * 8, (blocks.end * 8).min(n));
        let w_block = &ws[j0 * k..j1 * k];
        // SAFETY: this chunk alone writes columns j0..j1 of y's rows.
        unsafe { rows_times_wt_into(x, rows, w_block, j1 - j0, k, SharedOut(out.at(j0)), n) };
    });
    Some(y)
}

/// out[j] = W[j]·x for the `out.len()` rows of `w` ([n, x.len()] row-major), serially, by the
/// kernel path [`rows_times_weight`] takes (so bit for bit its result when the rows start at a
/// multiple of 8): a planned decode step's share of a dense matrix.
pub fn matvec(x: &[f32], w: &[f32], out: &mut [f32]) {
    let (n, k) = (out.len(), x.len());
    assert!(w.len() >= n * k, "matvec: {} weights for {n}×{k}", w.len());
    // SAFETY: `out` holds n floats and is borrowed mutably here.
    unsafe { rows_times_wt_into(x, 1, &w[..n * k], n, k, SharedOut(out.as_mut_ptr()), n) }
}

/// y [rows, n] = x [rows, k] · W[n, k]ᵀ into `out` + r·ld + j, by the AVX2 kernel when the CPU has
/// AVX2 and FMA (checked at runtime), else the portable one.
///
/// # Safety
/// `out` covers rows × ld floats (ld ≥ n) that no other thread writes meanwhile.
unsafe fn rows_times_wt_into(
    x: &[f32],
    rows: usize,
    w: &[f32],
    n: usize,
    k: usize,
    out: SharedOut,
    ld: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        rows_times_wt_avx2(x, rows, w, n, k, out, ld);
        return;
    }
    rows_times_wt(x, rows, w, n, k, out, ld)
}

/// Whether x (f32 on the CPU, not tracking gradients, at most [`MAX_ROWS`] rows) suits the kernel.
pub fn few_host_rows(x: &Tensor) -> bool {
    let k = x.dims().last().copied().unwrap_or(0);
    let rows = x.elem_count() / k.max(1);
    rows > 0 && rows <= MAX_ROWS && x.dtype() == DType::F32 && x.device().is_cpu() && !x.track_op()
}

/// x [.., k] · wᵀ for w [n, k] through the kernel when [`few_host_rows`] holds and w is dense
/// f32; `None` otherwise (the caller uses candle's matmul).
pub fn matmul_rows(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !few_host_rows(x) || w.dim(candle_core::D::Minus1)? != x.dim(candle_core::D::Minus1)? {
        return Ok(None);
    }
    let k = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / k;
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let Some(y) = rows_times_weight(&xs, rows, w) else {
        return Ok(None);
    };
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1") = w.dim(0)?;
    Tensor::from_vec(y, dims, x.device()).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_matmul_for_every_row_count() {
        let dev = Device::Cpu;
        // 1–6 rows take the few-row kernel, 7 and 16 the paired one (7: with its odd row).
        for rows in [1, 2, 3, 5, 6, 7, 16] {
            // k = 1000 and 1152: past LONG_K, k chunked (1000: with a tail of 0 mod 8 chunks).
            for (n, k) in [
                (7, 13),
                (64, 160),
                (130, 48),
                (19, 8),
                (20, 1000),
                (24, 1152),
            ] {
                let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev).unwrap();
                let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
                let got = matmul_rows(&x, &w).unwrap().expect("kernel applies");
                let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
                let diff = (got - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                // Sums of k products of N(0, 1) values (std √k) in another order than the GEMM's:
                // f32 rounding grows with √k.
                let tol = 1e-4 * (k as f32).sqrt().max(8.0) / 8.0;
                assert!(diff < tol, "rows {rows}, {n}×{k}: max diff {diff}");
            }
        }
        // The portable kernel (CPUs without AVX2/FMA) agrees too.
        let (rows, n, k) = (3, 7, 13);
        let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.7).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.3).cos()).collect();
        let mut y = vec![0f32; rows * n];
        // SAFETY: y holds rows × n floats.
        unsafe { rows_times_wt(&x, rows, &w, n, k, SharedOut(y.as_mut_ptr()), n) };
        let wt = Tensor::from_vec(w, (n, k), &dev).unwrap();
        let via_avx = rows_times_weight(&x, rows, &wt).unwrap();
        for (a, b) in y.iter().zip(&via_avx) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        assert!((dot_portable(&[1., 2., 3.], &[4., 5., 6.]) - 32.0).abs() < 1e-6);
        assert!((dot(&[1.; 19], &[2.; 19]) - 38.0).abs() < 1e-5);
    }

    /// A row's result does not depend on how many rows share the call (single-stream decode and
    /// speculative verification must agree bit for bit).
    #[test]
    fn one_row_equals_its_row_in_a_batch() {
        // Batches through the few-row kernel (3, 6) and the paired one (7: odd, 8).
        for rows in [3, 6, 7, 8] {
            for (n, k) in [
                (2048, 160),
                (13, 21),
                (12, 8),
                (5, 3),
                (20, 1003),
                (16, 1152),
            ] {
                let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.31).sin()).collect();
                let wv: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.17).cos()).collect();
                let w = Tensor::from_vec(wv, (n, k), &Device::Cpu).unwrap();
                let all = rows_times_weight(&x, rows, &w).unwrap();
                for r in 0..rows {
                    let one = rows_times_weight(&x[r * k..][..k], 1, &w).unwrap();
                    assert_eq!(one, all[r * n..][..n], "row {r} of {rows}, {n}×{k}");
                }
            }
        }
    }

    /// Split over the pool's threads (blocks of 8 weight rows), every output equals one serial
    /// call's bit for bit.
    #[test]
    fn split_over_threads_equals_one_serial_call() {
        for rows in [1, 2, 3, 7, 16] {
            for (n, k) in [(2051, 40), (1000, 96)] {
                let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.37).sin()).collect();
                let wv: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
                let mut serial = vec![0f32; rows * n];
                // SAFETY: `serial` holds rows × n floats.
                unsafe {
                    rows_times_wt_into(&x, rows, &wv, n, k, SharedOut(serial.as_mut_ptr()), n)
                };
                let w = Tensor::from_vec(wv, (n, k), &Device::Cpu).unwrap();
                let split = rows_times_weight(&x, rows, &w).unwrap();
                assert_eq!(split, serial, "{rows} rows, {n}×{k}");
            }
        }
    }

    #[test]
    fn declines_what_it_cannot_serve() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 4), &dev).unwrap();
        let many = Tensor::zeros((MAX_ROWS + 1, 4), DType::F32, &dev).unwrap();
        assert!(matmul_rows(&many, &w).unwrap().is_none());
        // A trained weight records the backward through candle's matmul instead.
        let var = Var::from_tensor(&w).unwrap();
        let x = Tensor::zeros((1, 4), DType::F32, &dev).unwrap();
        assert!(matmul_rows(&x, var.as_tensor()).unwrap().is_none());
        let x64 = Tensor::zeros((1, 4), DType::F64, &dev).unwrap();
        assert!(matmul_rows(&x64, &w.to_dtype(DType::F64).unwrap())
            .unwrap()
            .is_none());
    }
}
