//! The small per-token kernels of a planned decode step, each one equation on host slices:
//! RMSNorm, rotary embedding at one position, the softmax of one query's scores, MLA's absorbed
//! attention for one head over the latent cache, and GQA attention for one query head.

use crate::rows_matmul::{axpy, dot, matvec};

/// y = x / √(mean(x²) + ε) ⊙ w, summed in order as `fathom-model`'s fused RMSNorm does.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f64, y: &mut [f32]) {
    let ms = x.iter().fold(0f32, |s, &v| s + v * v) / x.len() as f32;
    let r = 1.0 / (ms + eps as f32).sqrt();
    for ((o, &v), &w) in y.iter_mut().zip(x).zip(w) {
        *o = v * r * w;
    }
}

/// How the rotary pairs are laid out in a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// (x₂ᵢ, x₂ᵢ₊₁) rotate together (DeepSeek).
    Interleaved,
    /// (xᵢ, xᵢ₊d/₂) rotate together (Qwen2, Llama).
    Halves,
}

/// Rotate x (one head, `cos.len()` = d/2 pairs) in place by the angles whose cos/sin are given
/// (YaRN's attention factor already folded in, as the model's tables hold them).
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], layout: RopeLayout) {
    let half = cos.len();
    match layout {
        RopeLayout::Interleaved => {
            for i in 0..half {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = a * cos[i] - b * sin[i];
                x[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
        RopeLayout::Halves => {
            for i in 0..half {
                let (a, b) = (x[i], x[i + half]);
                x[i] = a * cos[i] - b * sin[i];
                x[i + half] = b * cos[i] + a * sin[i];
            }
        }
    }
}

/// p = softmax(scale · s) in place (every position visible: the query is the newest token).
pub fn softmax_scaled(s: &mut [f32], scale: f32) {
    let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
    let mut sum = 0f32;
    for v in s.iter_mut() {
        *v = (*v * scale - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in s.iter_mut() {
        *v *= inv;
    }
}

/// MLA's per-head sizes.
#[derive(Debug, Clone, Copy)]
pub struct MlaDims {
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
    pub rank: usize,
}

/// Per-thread scratch of the attention kernels.
#[derive(Debug, Default)]
pub struct HeadScratch {
    pub q_lat: Vec<f32>,
    pub o_lat: Vec<f32>,
    pub scores: Vec<f32>,
    pub q_rope: Vec<f32>,
}

/// One head of MLA's absorbed attention over the latent cache (DeepSeek-V2 §2.1.2):
/// q_lat = W_UKᵀ q_nope; sₜ = q_lat·c_kv,ₜ + q_pe·k_pe,ₜ; p = softmax(scale·s);
/// o = W_UV (Σₜ pₜ c_kv,ₜ). `w_ukv` is this head's [nope + v, rank] block of kv_b_proj, `q` its
/// [nope + rope] query with q_pe already roped; `c_kv` [t, rank] and `k_pe` [t, rope] the cache.
#[allow(clippy::too_many_arguments)]
pub fn mla_head(
    d: MlaDims,
    q: &[f32],
    w_ukv: &[f32],
    c_kv: &[f32],
    k_pe: &[f32],
    t: usize,
    scale: f32,
    sc: &mut HeadScratch,
    out: &mut [f32],
) {
    let r = d.rank;
    sc.q_lat.clear();
    sc.q_lat.resize(r, 0.0);
    for i in 0..d.nope {
        axpy(&mut sc.q_lat, q[i], &w_ukv[i * r..(i + 1) * r]);
    }
    let q_pe = &q[d.nope..d.nope + d.rope];
    sc.scores.clear();
    sc.scores.extend((0..t).map(|p| {
        dot(&sc.q_lat, &c_kv[p * r..(p + 1) * r]) + dot(q_pe, &k_pe[p * d.rope..(p + 1) * d.rope])
    }));
    softmax_scaled(&mut sc.scores, scale);
    sc.o_lat.clear();
    sc.o_lat.resize(r, 0.0);
    for (p, &w) in sc.scores.iter().enumerate() {
        axpy(&mut sc.o_lat, w, &c_kv[p * r..(p + 1) * r]);
    }
    let w_uv = &w_ukv[d.nope * r..];
    for (j, o) in out.iter_mut().enumerate().take(d.v) {
        *o = dot(&w_uv[j * r..(j + 1) * r], &sc.o_lat);
    }
}

/// Positions per unit of MLA's split attention ([`mla_chunk`]): a chunk's c_kv rows (128 × rank
/// floats, 128 KiB at rank 256) stay in L2 between the score pass and the weighted sum.
pub const MLA_CHUNK: usize = 128;

/// q_lat = W_UKᵀ q_nope for one head (`w_uk` its [nope, rank] rows of kv_b_proj).
pub fn absorb_query(q_nope: &[f32], w_uk: &[f32], q_lat: &mut [f32]) {
    let r = q_lat.len();
    q_lat.fill(0.0);
    for (i, &q) in q_nope.iter().enumerate() {
        axpy(q_lat, q, &w_uk[i * r..(i + 1) * r]);
    }
}

/// One chunk of cached positions for every head at once (flash-decoding): each c_kv row is read
/// once for all heads, not once per head. For head h, `partial[h]` = (m, l, o[rank]) with
/// m = max scaled score, l = Σ e^{s−m}, o = Σ e^{s−m} c_kv (merged by [`mla_merge`]).
/// `q_lat` [heads, rank], `q_pe` [heads, rope] (roped); `c_kv` [n, rank], `k_pe` [n, rope].
#[allow(clippy::too_many_arguments)]
pub fn mla_chunk(
    d: MlaDims,
    heads: usize,
    q_lat: &[f32],
    q_pe: &[f32],
    c_kv: &[f32],
    k_pe: &[f32],
    scale: f32,
    scores: &mut Vec<f32>,
    partial: &mut [f32],
) {
    let (r, n) = (d.rank, c_kv.len() / d.rank);
    scores.clear();
    scores.resize(heads * (n + 2), 0.0);
    let (s, tmp) = scores.split_at_mut(heads * n);
    let (lat, pe) = tmp.split_at_mut(heads);
    for p in 0..n {
        // All heads against one cached row at once: the row is loaded once per 8 heads.
        matvec(&c_kv[p * r..(p + 1) * r], q_lat, lat);
        matvec(&k_pe[p * d.rope..(p + 1) * d.rope], q_pe, pe);
        for h in 0..heads {
            s[h * n + p] = (lat[h] + pe[h]) * scale;
        }
    }
    for h in 0..heads {
        let s = &mut s[h * n..(h + 1) * n];
        let m = s.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        let mut l = 0f32;
        for v in s.iter_mut() {
            *v = (*v - m).exp();
            l += *v;
        }
        let out = &mut partial[h * (2 + r)..(h + 1) * (2 + r)];
        out[0] = m;
        out[1] = l;
        out[2..].fill(0.0);
        weighted_rows(&s[..], c_kv, &mut out[2..]);
    }
}

/// o += Σₚ wₚ · rowₚ over the rows of `rows` ([w.len(), o.len()]): o held in registers a block
/// of 64 floats at a time while the rows stream past (where the CPU has AVX2 and FMA).
pub fn weighted_rows(w: &[f32], rows: &[f32], o: &mut [f32]) {
    let r = o.len();
    #[cfg(target_arch = "x86_64")]
    if crate::rows_matmul::avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA; every access below stays inside o and rows.
        unsafe { weighted_rows_avx2(w, rows, o) };
        return;
    }
    for (p, &wp) in w.iter().enumerate() {
        axpy(o, wp, &rows[p * r..(p + 1) * r]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_rows_avx2(w: &[f32], rows: &[f32], o: &mut [f32]) {
    use std::arch::x86_64::*;
    let r = o.len();
    assert!(rows.len() >= w.len() * r);
    let blocks = r / 64;
    let (op, rp) = (o.as_mut_ptr(), rows.as_ptr());
    for b in 0..blocks {
        let mut acc: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(op.add(b * 64 + 8 * i)));
        for (p, &wp) in w.iter().enumerate() {
            let wv = _mm256_set1_ps(wp);
            let row = rp.add(p * r + b * 64);
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row.add(8 * i)), *a);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(op.add(b * 64 + 8 * i), *a);
        }
    }
    for (p, &wp) in w.iter().enumerate() {
        for c in blocks * 64..r {
            *op.add(c) = wp.mul_add(*rp.add(p * r + c), *op.add(c));
        }
    }
}

/// Head h's attention output from the chunks' partial states ([`mla_chunk`]):
/// o_lat = Σ_c e^{m_c−M} o_c / Σ_c e^{m_c−M} l_c, then out = W_UV o_lat (`w_uv` [v, rank]).
pub fn mla_merge(
    partials: &[f32],
    heads: usize,
    h: usize,
    w_uv: &[f32],
    o_lat: &mut Vec<f32>,
    out: &mut [f32],
) {
    let stride = w_uv.len() / out.len() + 2;
    let r = stride - 2;
    let chunks = partials.len() / (heads * stride);
    let part = |c: usize| &partials[(c * heads + h) * stride..][..stride];
    let m = (0..chunks).fold(f32::NEG_INFINITY, |a, c| a.max(part(c)[0]));
    o_lat.clear();
    o_lat.resize(r, 0.0);
    let mut l = 0f32;
    for c in 0..chunks {
        let pc = part(c);
        let f = (pc[0] - m).exp();
        l += f * pc[1];
        axpy(o_lat, f, &pc[2..]);
    }
    let inv = 1.0 / l;
    for v in o_lat.iter_mut() {
        *v *= inv;
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot(&w_uv[j * r..(j + 1) * r], o_lat);
    }
}

/// One query head of grouped-query attention: sₜ = q·kₜ, p = softmax(s/√d), o = Σₜ pₜ vₜ over
/// its kv head's `k`, `v` [t, d].
pub fn gqa_head(q: &[f32], k: &[f32], v: &[f32], t: usize, sc: &mut HeadScratch, out: &mut [f32]) {
    let d = q.len();
    sc.scores.clear();
    sc.scores.resize(t, 0.0);
    // sₜ = kₜ·q for every cached row at once (the rows as a [t, d] matrix times q).
    matvec(q, &k[..t * d], &mut sc.scores);
    softmax_scaled(&mut sc.scores, 1.0 / (d as f32).sqrt());
    out.fill(0.0);
    weighted_rows(&sc.scores, &v[..t * d], out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_rows_equals_the_axpy_sum() {
        for r in [8, 64, 200, 256] {
            let n = 37;
            let w: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.3).cos()).collect();
            let rows: Vec<f32> = (0..n * r).map(|i| ((i as f32) * 0.17).sin()).collect();
            let mut got: Vec<f32> = (0..r).map(|i| i as f32 * 0.01).collect();
            let mut want = got.clone();
            weighted_rows(&w, &rows, &mut got);
            for p in 0..n {
                for c in 0..r {
                    want[c] += w[p] * rows[p * r + c];
                }
            }
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "r {r}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn rope_halves_and_pairs_rotate_the_same_plane() {
        let (cos, sin) = ([0.6f32, 1.0], [0.8f32, 0.0]);
        let mut a = [1.0, 2.0, 3.0, 4.0]; // pairs (1,2), (3,4)
        rope(&mut a, &cos, &sin, RopeLayout::Interleaved);
        assert_eq!(a, [0.6 - 1.6, 0.8 + 1.2, 3.0, 4.0]);
        let mut b = [1.0, 3.0, 2.0, 4.0]; // pairs (1,2), (3,4) as halves
        rope(&mut b, &cos, &sin, RopeLayout::Halves);
        assert_eq!(b, [0.6 - 1.6, 3.0, 0.8 + 1.2, 4.0]);
    }

    #[test]
    fn chunked_heads_equal_one_head_at_a_time() {
        let d = MlaDims {
            nope: 4,
            rope: 2,
            v: 3,
            rank: 8,
        };
        let (heads, t) = (3, 2 * MLA_CHUNK + 17);
        let f = |i: usize, s: f32| ((i as f32) * s).sin();
        let w: Vec<f32> = (0..heads * (d.nope + d.v) * d.rank)
            .map(|i| f(i, 0.37))
            .collect();
        let c: Vec<f32> = (0..t * d.rank).map(|i| f(i, 0.53)).collect();
        let kpe: Vec<f32> = (0..t * d.rope).map(|i| f(i, 0.71)).collect();
        let q: Vec<f32> = (0..heads * (d.nope + d.rope)).map(|i| f(i, 1.3)).collect();
        let block = (d.nope + d.v) * d.rank;
        let mut q_lat = vec![0f32; heads * d.rank];
        let mut q_pe = vec![0f32; heads * d.rope];
        for h in 0..heads {
            let qh = &q[h * (d.nope + d.rope)..][..d.nope + d.rope];
            absorb_query(
                &qh[..d.nope],
                &w[h * block..][..d.nope * d.rank],
                &mut q_lat[h * d.rank..][..d.rank],
            );
            q_pe[h * d.rope..][..d.rope].copy_from_slice(&qh[d.nope..]);
        }
        let chunks = t.div_ceil(MLA_CHUNK);
        let mut partials = vec![0f32; chunks * heads * (2 + d.rank)];
        let mut scores = Vec::new();
        for ch in 0..chunks {
            let p = ch * MLA_CHUNK..((ch + 1) * MLA_CHUNK).min(t);
            mla_chunk(
                d,
                heads,
                &q_lat,
                &q_pe,
                &c[p.start * d.rank..p.end * d.rank],
                &kpe[p.start * d.rope..p.end * d.rope],
                0.3,
                &mut scores,
                &mut partials[ch * heads * (2 + d.rank)..][..heads * (2 + d.rank)],
            );
        }
        for h in 0..heads {
            let mut want = vec![0f32; d.v];
            let qh = &q[h * (d.nope + d.rope)..][..d.nope + d.rope];
            mla_head(
                d,
                qh,
                &w[h * block..][..block],
                &c,
                &kpe,
                t,
                0.3,
                &mut HeadScratch::default(),
                &mut want,
            );
            let mut got = vec![0f32; d.v];
            mla_merge(
                &partials,
                heads,
                h,
                &w[h * block + d.nope * d.rank..][..d.v * d.rank],
                &mut Vec::new(),
                &mut got,
            );
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "head {h}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn absorbed_head_equals_the_expanded_attention() {
        // k_nope = W_UK c, v = W_UV c per position: the expanded form, computed directly.
        let d = MlaDims {
            nope: 3,
            rope: 2,
            v: 2,
            rank: 4,
        };
        let t = 5;
        let f = |i: usize, s: f32| ((i as f32) * s).sin();
        let w: Vec<f32> = (0..(d.nope + d.v) * d.rank).map(|i| f(i, 0.37)).collect();
        let c: Vec<f32> = (0..t * d.rank).map(|i| f(i, 0.53)).collect();
        let kpe: Vec<f32> = (0..t * d.rope).map(|i| f(i, 0.71)).collect();
        let q: Vec<f32> = (0..d.nope + d.rope).map(|i| f(i, 1.3)).collect();
        let mut out = vec![0f32; d.v];
        mla_head(
            d,
            &q,
            &w,
            &c,
            &kpe,
            t,
            0.5,
            &mut HeadScratch::default(),
            &mut out,
        );
        let row = |m: usize, p: usize| -> f32 {
            (0..d.rank)
                .map(|j| w[m * d.rank + j] * c[p * d.rank + j])
                .sum()
        };
        let mut s: Vec<f32> = (0..t)
            .map(|p| {
                (0..d.nope).map(|i| q[i] * row(i, p)).sum::<f32>()
                    + (0..d.rope)
                        .map(|i| q[d.nope + i] * kpe[p * d.rope + i])
                        .sum::<f32>()
            })
            .collect();
        softmax_scaled(&mut s, 0.5);
        for (j, &o) in out.iter().enumerate() {
            let want: f32 = (0..t).map(|p| s[p] * row(d.nope + j, p)).sum();
            assert!((o - want).abs() < 1e-5, "{o} vs {want}");
        }
    }
}
