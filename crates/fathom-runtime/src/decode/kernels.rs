//! The small per-token kernels of a planned decode step, each one equation on host slices:
//! RMSNorm, rotary embedding at one position, the softmax of one query's scores, MLA's absorbed
//! attention for one head over the latent cache, and GQA attention for one query head.

use crate::rows_matmul::{axpy, dot};

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

/// One query head of grouped-query attention: sₜ = q·kₜ, p = softmax(s/√d), o = Σₜ pₜ vₜ over
/// its kv head's `k`, `v` [t, d].
pub fn gqa_head(q: &[f32], k: &[f32], v: &[f32], t: usize, sc: &mut HeadScratch, out: &mut [f32]) {
    let d = q.len();
    sc.scores.clear();
    sc.scores
        .extend((0..t).map(|p| dot(q, &k[p * d..(p + 1) * d])));
    softmax_scaled(&mut sc.scores, 1.0 / (d as f32).sqrt());
    out.fill(0.0);
    for (p, &w) in sc.scores.iter().enumerate() {
        axpy(out, w, &v[p * d..(p + 1) * d]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
