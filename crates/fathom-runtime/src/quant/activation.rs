//! Activations quantised once per call for the int8 dot products: per *group* of values a scale
//! `d ≈ max|x| / 127` and `q = round(x / d)` (llama.cpp's exact rules, below), plus the sums of q over each 16 values, which
//! the offset and minimum terms of the block formats need (see `blocks.rs`). Groups of 32 are
//! llama.cpp's q8_0 activations (for the 32-weight formats, whose every block has its own scale
//! anyway); groups of 256 are its q8_K (for the k-quants and iq4_xs: one activation scale per
//! super-block lets the kernel sum a whole super-block in integers and convert once). The scale is
//! stored per 32 values either way (repeated within a 256-group), so every kernel reads one
//! layout.

use crate::parallel::{for_chunks, SharedOut};

/// `rows` activation rows of `k` values each (k a multiple of 32).
#[derive(Debug, Clone, Default)]
pub struct QuantizedActs {
    pub rows: usize,
    pub k: usize,
    /// Values sharing one scale: 32 or 256.
    pub group: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub bsum: Vec<f32>,
}

/// llama.cpp's q8_0 activation rule (ggml-cpu's `quantize_row_q8_0`): q = x · 127/max|x| rounded
/// half to even, d = max|x|/127 kept as f16 — followed exactly, so a product matches llama.cpp's
/// to the rounding of its sums.
#[inline(always)]
fn quantize_q8_0(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    for (qi, &v) in q.iter_mut().zip(x) {
        *qi = (v * id).round_ties_even() as i8;
    }
    half::f16::from_f32(amax / 127.0).to_f32()
}

/// llama.cpp's q8_K rule (`quantize_row_q8_K_ref`): the value of largest magnitude (first one)
/// sets iscale = −127/max, q = nearest(iscale · x) (half to even), d = 1/iscale in f32.
#[inline(always)]
fn quantize_q8_k(x: &[f32], q: &mut [i8]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (qi, &v) in q.iter_mut().zip(x) {
        *qi = ((iscale * v).round_ties_even() as i32).min(127) as i8;
    }
    1.0 / iscale
}

/// One group by the rule for its size (32: q8_0, 256: q8_K).
#[inline(always)]
fn quantize_group(x: &[f32], q: &mut [i8]) -> f32 {
    if x.len() == 32 {
        quantize_q8_0(x, q)
    } else {
        quantize_q8_k(x, q)
    }
}

/// The same rules in AVX2, bit-identical for finite input: the maximum over eight lanes, the
/// scaled values rounded half to even by `cvtps2dq` (the default rounding mode) and narrowed
/// with saturating packs (which only ever see −127..=127 from these scales). q8_K's "first
/// value of largest magnitude" is the first lane equal to the maximum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_group_avx2(x: &[f32], q: &mut [i8]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len();
    debug_assert!(n % 32 == 0 && q.len() == n);
    let p = x.as_ptr();
    let sign = _mm256_set1_ps(-0.0);
    let mut vmax = _mm256_setzero_ps();
    for i in (0..n).step_by(8) {
        vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(i))));
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
    let (scale, d) = if n == 32 {
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        (id, half::f16::from_f32(amax / 127.0).to_f32())
    } else {
        if amax == 0.0 {
            q.fill(0);
            return 0.0;
        }
        let va = _mm256_set1_ps(amax);
        let mut max = amax;
        for i in (0..n).step_by(8) {
            let a = _mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(i)));
            let hit = _mm256_movemask_ps(_mm256_cmp_ps(a, va, _CMP_EQ_OQ));
            if hit != 0 {
                max = x[i + hit.trailing_zeros() as usize];
                break;
            }
        }
        let iscale = -127.0 / max;
        (iscale, 1.0 / iscale)
    };
    let vs = _mm256_set1_ps(scale);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for i in (0..n).step_by(32) {
        let mut v = [_mm256_setzero_si256(); 4];
        for (j, vj) in v.iter_mut().enumerate() {
            *vj = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(i + 8 * j)), vs));
        }
        let lo = _mm256_packs_epi32(v[0], v[1]);
        let hi = _mm256_packs_epi32(v[2], v[3]);
        // packs work per 128-bit lane: dwords come out as 0–3 of each input, then 4–7.
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(lo, hi), order);
        _mm256_storeu_si256(q.as_mut_ptr().add(i) as *mut __m256i, bytes);
    }
    d
}

fn quantize_best(x: &[f32], q: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::rows_matmul::avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time).
        return unsafe { quantize_group_avx2(x, q) };
    }
    quantize_group(x, q)
}

/// One row: its int8 values `q`, scale per 32 values `d`, Σq per 16 values `bsum`.
fn quantize_row(x: &[f32], group: usize, q: &mut [i8], d: &mut [f32], bsum: &mut [f32]) {
    let per = group / 32;
    for (g, (src, q)) in x
        .chunks_exact(group)
        .zip(q.chunks_exact_mut(group))
        .enumerate()
    {
        let dg = quantize_best(src, q);
        d[g * per..(g + 1) * per].fill(dg);
        for (h, q16) in q.chunks_exact(16).enumerate() {
            let s: i32 = q16.iter().map(|&v| v as i32).sum();
            bsum[g * group / 16 + h] = s as f32;
        }
    }
}

/// One row's slices.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub bsum: &'a [f32],
}

impl QuantizedActs {
    /// Quantise `x` ([rows, k] row-major) in groups of `group` (32 or 256, dividing k), reusing
    /// this buffer's allocations.
    pub fn quantize_into(&mut self, x: &[f32], rows: usize, k: usize, group: usize) {
        assert!(group == 32 || group == 256, "activation group {group}");
        assert!(
            k % group == 0 && x.len() == rows * k,
            "activations: {rows}×{k} in groups of {group} vs {} values",
            x.len()
        );
        self.rows = rows;
        self.k = k;
        self.group = group;
        self.qs.resize(rows * k, 0);
        self.d.resize(rows * k / 32, 0.0);
        self.bsum.resize(rows * k / 16, 0.0);
        // Rows are independent: split over the pool (a serial pass was ~7% of a 2048-wide
        // product of 512 rows on two threads).
        let (qs, ds, bs) = (
            SharedOut(self.qs.as_mut_ptr()),
            SharedOut(self.d.as_mut_ptr()),
            SharedOut(self.bsum.as_mut_ptr()),
        );
        for_chunks(rows, rows * k * 16, |range| {
            for r in range {
                // SAFETY: row r's ranges of the three buffers (sized above) are this row's only.
                let (q, d, b) = unsafe {
                    (
                        qs.slice(r * k, k),
                        ds.slice(r * k / 32, k / 32),
                        bs.slice(r * k / 16, k / 16),
                    )
                };
                quantize_row(&x[r * k..(r + 1) * k], group, q, d, b);
            }
        });
    }

    pub fn quantize(x: &[f32], rows: usize, k: usize, group: usize) -> Self {
        let mut a = QuantizedActs::default();
        a.quantize_into(x, rows, k, group);
        a
    }

    pub fn row(&self, r: usize) -> ActRow<'_> {
        let k = self.k;
        ActRow {
            qs: &self.qs[r * k..(r + 1) * k],
            d: &self.d[r * k / 32..(r + 1) * k / 32],
            bsum: &self.bsum[r * k / 16..(r + 1) * k / 16],
        }
    }

    /// Row r dequantised (tests).
    pub fn dequantized_row(&self, r: usize) -> Vec<f32> {
        let row = self.row(r);
        row.qs
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f32 * row.d[i / 32])
            .collect()
    }
}

/// Activation rows regrouped eight at a time for the panel kernel (`avx2::dot_panels`): within a
/// panel the eight rows' int8 values are interleaved four at a time — one 32-byte vector holds
/// values 4j..4j+4 of all eight rows — so `vpdpbusd` of a broadcast four-weight group against it
/// leaves the eight rows' sums in the eight i32 lanes, with no reduction across lanes. The
/// per-group scales and sums are stored the same way: entry [g][r] for row r of the panel.
#[derive(Debug, Clone, Default)]
pub struct ActPanels {
    pub panels: usize,
    pub k: usize,
    /// [panel][k/4][8][4]
    pub qs: Vec<i8>,
    /// [panel][k/32][8]: the scale of each 32 values.
    pub d: Vec<f32>,
    /// [panel][k/16][8]: Σq over each 16 values, as float and as integer.
    pub b16: Vec<f32>,
    pub b16i: Vec<i32>,
    /// [panel][k/32][8]: Σq over each 32 values.
    pub b32i: Vec<i32>,
}

/// One panel of [`ActPanels`].
#[derive(Clone, Copy)]
pub struct Panel<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub b16: &'a [f32],
    pub b16i: &'a [i32],
    pub b32i: &'a [i32],
}

/// Activation rows per panel.
pub const PANEL_ROWS: usize = 8;

impl ActPanels {
    /// The first `acts.rows / 8 · 8` rows of `acts` as panels, reusing this buffer.
    pub fn build_from(&mut self, acts: &QuantizedActs) {
        const P: usize = PANEL_ROWS;
        let k = acts.k;
        let panels = acts.rows / P;
        self.panels = panels;
        self.k = k;
        self.qs.resize(panels * P * k, 0);
        self.d.resize(panels * P * k / 32, 0.0);
        self.b16.resize(panels * P * k / 16, 0.0);
        self.b16i.resize(panels * P * k / 16, 0);
        self.b32i.resize(panels * P * k / 32, 0);
        // Panels are independent: split over the pool, each writing its own ranges.
        let out = (
            SharedOut(self.qs.as_mut_ptr()),
            SharedOut(self.d.as_mut_ptr()),
            SharedOut(self.b16.as_mut_ptr()),
            SharedOut(self.b16i.as_mut_ptr()),
            SharedOut(self.b32i.as_mut_ptr()),
        );
        for_chunks(panels, panels * P * k * 4, |range| {
            for p in range {
                // SAFETY: panel p's ranges of the five buffers (sized above) are its own.
                let (qs, d, b16, b16i, b32i) = unsafe {
                    (
                        out.0.slice(p * P * k, P * k),
                        out.1.slice(p * P * k / 32, P * k / 32),
                        out.2.slice(p * P * k / 16, P * k / 16),
                        out.3.slice(p * P * k / 16, P * k / 16),
                        out.4.slice(p * P * k / 32, P * k / 32),
                    )
                };
                for r in 0..P {
                    let row = acts.row(p * P + r);
                    for (j, four) in row.qs.chunks_exact(4).enumerate() {
                        qs[(j * P + r) * 4..(j * P + r) * 4 + 4].copy_from_slice(four);
                    }
                    for (g, &dg) in row.d.iter().enumerate() {
                        d[g * P + r] = dg;
                    }
                    for (g, &b) in row.bsum.iter().enumerate() {
                        b16[g * P + r] = b;
                        b16i[g * P + r] = b as i32;
                    }
                    for (g, pair) in row.bsum.chunks_exact(2).enumerate() {
                        b32i[g * P + r] = (pair[0] + pair[1]) as i32;
                    }
                }
            }
        });
    }

    pub fn panel(&self, p: usize) -> Panel<'_> {
        const P: usize = PANEL_ROWS;
        let k = self.k;
        Panel {
            qs: &self.qs[p * P * k..(p + 1) * P * k],
            d: &self.d[p * P * k / 32..(p + 1) * P * k / 32],
            b16: &self.b16[p * P * k / 16..(p + 1) * P * k / 16],
            b16i: &self.b16i[p * P * k / 16..(p + 1) * P * k / 16],
            b32i: &self.b32i[p * P * k / 32..(p + 1) * P * k / 32],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The run-time-selected (AVX2) compilation rounds exactly as the portable one, halves
    /// included.
    #[test]
    fn compiled_variants_quantise_identically() {
        for n in [32usize, 256] {
            let zeros = vec![0f32; n];
            let (mut a, mut b) = (vec![1i8; n], vec![1i8; n]);
            let da = quantize_group(&zeros, &mut a);
            let db = quantize_best(&zeros, &mut b);
            assert_eq!((da, &a), (db, &b), "group {n} of zeros");
            for seed in 0..50u32 {
                let mut x: Vec<f32> = (0..n)
                    .map(|i| {
                        (((i as u32).wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 2001)
                            as f32
                            / 1000.0
                            - 1.0
                    })
                    .collect();
                // Values on exact halves of the scale: 127/max · x = k + 0.5.
                x[0] = 1.0;
                for (i, v) in x.iter_mut().enumerate().skip(1).step_by(7) {
                    *v = (((i % 100) as f32) + 0.5) / 127.0;
                }
                // Ties for the largest magnitude (q8_K takes the first): a negative one first,
                // or a positive one first and a negative later.
                match seed % 3 {
                    1 => {
                        x[0] = 0.25;
                        x[3] = -1.0;
                        x[n - 2] = 1.0;
                    }
                    2 => x[n - 1] = -1.0,
                    _ => {}
                }
                let (mut a, mut b) = (vec![0i8; n], vec![0i8; n]);
                let da = quantize_group(&x, &mut a);
                let db = quantize_best(&x, &mut b);
                assert_eq!((da, &a), (db, &b), "group {n}, seed {seed}");
            }
        }
    }
}
