//! Decode mat-vec y = W·x for weights in llama.cpp's q8_0 / q4_0 blocks (x86-64, AVX2 + FMA +
//! F16C), the kernel decode spends most of its time in.
//!
//! Same arithmetic as llama.cpp and candle: x is quantised to q8_0 blocks (d = max|x|/127,
//! q = round(x/d)), each block pair contributes d_w·d_x·Σ q_w·q_x, summed in f32. What differs
//! from candle 0.11.1's kernel (measured slower than llama.cpp's, docs/benchmarks.md): four weight
//! rows per pass share each activation load and keep four independent accumulators (latency
//! hidden), weight scales convert with an inline F16C instruction instead of a runtime-dispatched
//! call per block, activation scales stay f32, and rows are split over candle's barrier pool in
//! chunks ([`crate::parallel`]). Falls back (returns `None`) on other formats or CPUs.

use crate::parallel::SharedOut;
use candle_core::quantized::{GgmlDType, QTensor};

const QK: usize = 32;

/// Whether this CPU runs the kernels.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// x (length k, a multiple of 32) → (q8 values, per-block scales).
fn quantize_activation(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut qs = vec![0i8; x.len()];
    let mut ds = Vec::with_capacity(x.len() / QK);
    for (block, q) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (qi, &v) in q.iter_mut().zip(block) {
            *qi = (v * id).round() as i8;
        }
        ds.push(d);
    }
    (qs, ds)
}

/// y [rows of x][n] = x · Wᵀ for W [n, k] in q8_0 or q4_0; `None` when not applicable.
pub fn gemv(w: &QTensor, x: &[f32], rows: usize) -> Option<Vec<f32>> {
    let format = w.dtype();
    if !supported() || !matches!(format, GgmlDType::Q8_0 | GgmlDType::Q4_0) {
        return None;
    }
    let (n, k) = w.shape().dims2().ok()?;
    if k % QK != 0 || x.len() != rows * k {
        return None;
    }
    let data = w.data().ok()?;
    let block_bytes = format.type_size();
    let row_bytes = k / QK * block_bytes;
    if data.len() != n * row_bytes {
        return None;
    }
    let mut out = vec![0f32; rows * n];
    for r in 0..rows {
        let (xq, xd) = quantize_activation(&x[r * k..(r + 1) * k]);
        let dst = SharedOut(out[r * n..(r + 1) * n].as_mut_ptr());
        // Groups of 4 weight rows; the pool hands chunks of groups to its threads.
        let groups = n.div_ceil(4);
        let run = |range: std::ops::Range<usize>| {
            for g in range {
                let r0 = g * 4;
                let count = 4.min(n - r0);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `supported()` checked the CPU features; slices are bounds-checked by
                // construction (row_bytes · n == data.len(), xq/xd cover k).
                let acc = unsafe {
                    match format {
                        GgmlDType::Q8_0 => x86::dot4_q8_0(&data, row_bytes, r0, count, &xq, &xd),
                        _ => x86::dot4_q4_0(&data, row_bytes, r0, count, &xq, &xd),
                    }
                };
                #[cfg(not(target_arch = "x86_64"))]
                let acc = [0f32; 4];
                for (i, v) in acc.iter().take(count).enumerate() {
                    // SAFETY: each group writes its own rows r0..r0+count < n.
                    unsafe { *dst.at(r0 + i) = *v };
                }
            }
        };
        crate::parallel::for_chunks(groups, n * k, run);
    }
    Some(out)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::QK;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn dot_i8(w: __m256i, x: __m256i) -> __m256 {
        // |w|·sign(x, w) as u8×i8 pairs → i16 → i32 → f32 (llama.cpp's mul_sum_i8_pairs_float).
        let ax = _mm256_sign_epi8(w, w);
        let sy = _mm256_sign_epi8(x, w);
        let dot16 = _mm256_maddubs_epi16(ax, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(dot16, _mm256_set1_epi16(1)))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    #[inline(always)]
    unsafe fn f16_scale(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]) as i32;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }

    /// `fn $name(w, row_bytes, r0, count, xq, xd) -> [f32; 4]`: rows r0..r0+count (count ≤ 4)
    /// of `$block`-byte blocks (2-byte f16 scale, then quants that `$load` turns into 32 i8
    /// values) against the q8 activation.
    macro_rules! dot4 {
        ($(#[$doc:meta])* $name:ident, $block:expr, |$p:ident| $load:expr) => {
            $(#[$doc])*
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(
                w: &[u8],
                row_bytes: usize,
                r0: usize,
                count: usize,
                xq: &[i8],
                xd: &[f32],
            ) -> [f32; 4] {
                let base = w.as_ptr();
                let rows: [*const u8; 4] =
                    std::array::from_fn(|i| base.add((r0 + i.min(count - 1)) * row_bytes));
                let mut acc = [_mm256_setzero_ps(); 4];
                for b in 0..xd.len() {
                    let x = _mm256_loadu_si256(xq.as_ptr().add(b * QK) as *const __m256i);
                    let dx = *xd.get_unchecked(b);
                    for i in 0..4 {
                        let $p = rows[i].add(b * $block);
                        let q = $load;
                        let d = _mm256_set1_ps(f16_scale($p) * dx);
                        acc[i] = _mm256_fmadd_ps(d, dot_i8(q, x), acc[i]);
                    }
                }
                [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
            }
        };
    }

    dot4!(
        /// q8_0: 34-byte blocks, 32 i8 quants.
        dot4_q8_0,
        34,
        |p| _mm256_loadu_si256(p.add(2) as *const __m256i)
    );

    dot4!(
        /// q4_0: 18-byte blocks; low nibbles are values 0..16, high nibbles 16..32, each minus 8.
        dot4_q4_0,
        18,
        |p| {
            let packed = _mm_loadu_si128(p.add(2) as *const __m128i);
            let both = _mm256_insertf128_si256::<1>(
                _mm256_castsi128_si256(packed),
                _mm_srli_epi16(packed, 4),
            );
            _mm256_sub_epi8(
                _mm256_and_si256(both, _mm256_set1_epi8(0xF)),
                _mm256_set1_epi8(8),
            )
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    #[test]
    fn matches_candles_quantised_matmul() {
        if !supported() {
            eprintln!("skipped: CPU lacks AVX2/FMA/F16C");
            return;
        }
        for format in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
            for (n, k, rows) in [
                (7usize, 64usize, 1usize),
                (130, 256, 1),
                (4099, 96, 2),
                (1, 32, 1),
            ] {
                let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
                let x = Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&w, format).unwrap();
                let x_host: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let got = gemv(&q, &x_host, rows).expect("supported");
                let want: Vec<f32> = QMatMul::from_qtensor(q)
                    .unwrap()
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let scale = want.iter().map(|v| v.abs()).sum::<f32>() / want.len() as f32;
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                // Both quantise x to q8_0; candle rounds its activation scale to f16, we keep f32.
                assert!(
                    worst <= 1e-2 * scale,
                    "{format:?} {n}x{k}: {worst} vs scale {scale}"
                );
            }
        }
    }
}
