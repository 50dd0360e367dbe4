//! Attention of several sequences' few new rows over their own caches, in one pass.
//!
//! Continuous batching decodes one row per sequence per step (and speculative verification a few):
//! run per sequence, attention costs ~20 small tensor ops per layer per sequence, which dominates a
//! small model's step. This kernel computes, for every packed row i of a sequence whose cache holds
//! positions 0..t (this step's rows included) and whose row sits at position p_i,
//!
//!   o_i,h = Σ_{j ≤ p_i} softmax_j(scale · (q_i,h·k_j,g + qr_i,h·kr_j,g)) · v_j,g,   g = h / (H/G),
//!
//! reading the cache buffers in place. The same kernel serves MLA's absorbed form (keys = values =
//! the latent c_kv with G = 1, rope keys = k_pe; DeepSeek-V2 §2.1.2) and grouped-query attention
//! (keys, values per kv head; no rope part). CPU f32 only: callers fall back to the per-sequence
//! path on other devices and dtypes. Inference only (no backward).

use crate::cache::{LayerCache, Segment, SeqBuffer};
use crate::parallel::{for_chunks, SharedOut};
use crate::rows_matmul::{avx2_fma, axpy, dot};
use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use std::ops::Deref;

/// Segments no longer than this go through the kernel; longer ones (prefill chunks) use the
/// per-sequence path, whose matmuls are faster for many rows.
pub const MAX_PACKED_ROWS: usize = 8;

/// Whether the kernel runs on this device and dtype.
pub fn kernel_available(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::F32
}

/// The position of every packed row (segment by segment: offset, offset + 1, …).
pub fn row_positions(segments: &[Segment]) -> Vec<u32> {
    segments
        .iter()
        .flat_map(|s| (0..s.len).map(move |i| (s.offset + i) as u32))
        .collect()
}

/// Attention for the packed rows of a step: the short segments (decode rows, draft verification)
/// together through `packed` (the kernel; only when `kernel_ok`), each long one (a prefill
/// chunk) through `single`; outputs [1, T, ·] in packed row order. `inputs` are the projected
/// per-row tensors [1, T, ·] both paths read (q and c_kv, or q, k and v). Splitting keeps a
/// prefill joining the batch from sending every decoding sequence down the slow path.
pub fn attend_split(
    inputs: &[&Tensor],
    segments: &[Segment],
    caches: &mut [&mut LayerCache],
    kernel_ok: bool,
    mut packed: impl FnMut(&[Tensor], &[Segment], &mut [&mut LayerCache]) -> Result<Tensor>,
    mut single: impl FnMut(&[Tensor], &Segment, &mut LayerCache) -> Result<Tensor>,
) -> Result<Tensor> {
    let short: Vec<bool> = segments
        .iter()
        .map(|s| kernel_ok && s.len <= MAX_PACKED_ROWS)
        .collect();
    let all = |t: &[&Tensor]| t.iter().map(|&x| x.clone()).collect::<Vec<_>>();
    if short.iter().all(|&b| b) {
        return packed(&all(inputs), segments, caches);
    }
    let rows_of = |s: &Segment| -> Result<Vec<Tensor>> {
        inputs.iter().map(|t| t.narrow(1, s.start, s.len)).collect()
    };
    // The short segments' rows gathered and re-based; their caches and the long ones', apart.
    let mut short_rows: Vec<u32> = vec![];
    let mut short_segments = vec![];
    let (mut short_caches, mut long_caches) = (vec![], vec![]);
    for ((s, c), &is_short) in segments.iter().zip(caches.iter_mut()).zip(&short) {
        if is_short {
            short_segments.push(Segment {
                start: short_rows.len(),
                ..*s
            });
            short_rows.extend((s.start..s.start + s.len).map(|r| r as u32));
            short_caches.push(&mut **c);
        } else {
            long_caches.push(&mut **c);
        }
    }
    let mut parts = vec![];
    if !short_rows.is_empty() {
        let idx = Tensor::new(short_rows.as_slice(), inputs[0].device())?;
        let gathered = inputs
            .iter()
            .map(|t| t.index_select(&idx, 1))
            .collect::<Result<Vec<_>>>()?;
        parts.push(packed(&gathered, &short_segments, &mut short_caches)?);
    }
    let long_segments = segments.iter().zip(&short).filter(|(_, &b)| !b);
    for ((s, _), c) in long_segments.zip(long_caches) {
        parts.push(single(&rows_of(s)?, s, c)?);
    }
    let joined = Tensor::cat(&parts, 1)?;
    if short_rows.is_empty() {
        return Ok(joined);
    }
    // Where each packed row landed in `joined`: short rows first, then the long segments'.
    let mut place = vec![0u32; segments.iter().map(|s| s.len).sum()];
    let mut next = 0u32;
    for pass_short in [true, false] {
        for (s, &is_short) in segments.iter().zip(&short) {
            if is_short == pass_short {
                for p in &mut place[s.start..s.start + s.len] {
                    *p = next;
                    next += 1;
                }
            }
        }
    }
    joined.index_select(&Tensor::new(place.as_slice(), joined.device())?, 1)
}

/// One sequence's cache for the kernel: in-place buffers [G, capacity, d] of which the first
/// `SeqBuffer::len` positions are filled.
pub struct CacheView<'a> {
    pub keys: &'a SeqBuffer,
    /// The rope part of the keys (MLA's k_pe), scored against `q_rope`.
    pub rope_keys: Option<&'a SeqBuffer>,
    pub values: &'a SeqBuffer,
}

/// A buffer's storage read guard, its f32 slice and the buffer geometry [G, cap, d].
struct Raw<'a> {
    guard: candle_core::StorageRef<'a>,
    offset: usize,
    groups: usize,
    cap: usize,
    dim: usize,
}

impl<'a> Raw<'a> {
    fn new(buf: &'a SeqBuffer) -> Result<Self> {
        let Some(t) = buf.data() else {
            candle_core::bail!("packed attention: empty cache buffer")
        };
        let (groups, cap, dim) = t.dims3()?;
        let (guard, layout) = t.storage_and_layout();
        let Some((offset, _)) = layout.contiguous_offsets() else {
            candle_core::bail!("packed attention: cache buffer is not contiguous")
        };
        Ok(Raw {
            guard,
            offset,
            groups,
            cap,
            dim,
        })
    }

    fn slice(&self) -> Result<&[f32]> {
        match self.guard.deref() {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(&v[self.offset..]),
            _ => candle_core::bail!("packed attention: cache must be f32 on the CPU"),
        }
    }

    /// Where group g's rows start (positions 0.. follow contiguously, `dim` apart).
    fn at(&self, g: usize) -> usize {
        g * self.cap * self.dim
    }
}

fn f32_rows(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// q [rows, H, dk] (and q_rope [rows, H, dr] when the caches have rope keys), one cache view per
/// segment (already holding this step's rows): the attention output [rows, H, dv].
pub fn packed_cached_attention(
    q: &Tensor,
    q_rope: Option<&Tensor>,
    segments: &[Segment],
    views: &[CacheView],
    scale: f64,
) -> Result<Tensor> {
    let (rows, heads, dk) = q.dims3()?;
    if segments.len() != views.len() {
        candle_core::bail!("{} segments but {} caches", segments.len(), views.len())
    }
    let qv = f32_rows(q)?;
    let (qr, dr) = match q_rope {
        Some(t) => (f32_rows(t)?, t.dim(2)?),
        None => (Vec::new(), 0),
    };
    let scale = scale as f32;
    // Every segment's buffers, checked, before any thread reads them.
    let mut raws = Vec::with_capacity(views.len());
    for (seg, view) in segments.iter().zip(views) {
        let keys = Raw::new(view.keys)?;
        let values = Raw::new(view.values)?;
        let rope_keys = view.rope_keys.map(Raw::new).transpose()?;
        let t = view.keys.len();
        if keys.dim != dk || seg.offset + seg.len > t || seg.start + seg.len > rows {
            candle_core::bail!(
                "packed attention: segment {:?} does not fit its cache of {t} positions",
                seg
            )
        }
        if heads % keys.groups != 0 {
            candle_core::bail!(
                "{heads} heads are not a multiple of {} kv groups",
                keys.groups
            )
        }
        let rope_dim = rope_keys.as_ref().map_or(0, |r| r.dim);
        if rope_dim != dr || values.groups != keys.groups {
            candle_core::bail!(
                "packed attention: rope keys of width {rope_dim} for queries of {dr}, or {} value \
                 groups for {} key groups",
                values.groups,
                keys.groups
            )
        }
        raws.push((keys, values, rope_keys));
    }
    let Some(dv) = raws.first().map(|(_, v, _)| v.dim) else {
        return Tensor::from_vec(Vec::<f32>::new(), (rows, heads, 0), q.device());
    };
    let mut caches = Vec::with_capacity(raws.len());
    for (keys, values, rope_keys) in &raws {
        if values.dim != dv {
            candle_core::bail!(
                "packed attention: value widths {} and {dv} differ",
                values.dim
            )
        }
        caches.push(SegmentCache {
            keys,
            values,
            rope_keys: rope_keys.as_ref(),
            kd: keys.slice()?,
            vd: values.slice()?,
            rd: match rope_keys {
                Some(r) => r.slice()?,
                None => &[],
            },
        });
    }
    // One item per packed row; rows write disjoint slices of the output, so they split over the
    // pool's threads (each output summed exactly as serially).
    let items: Vec<(usize, usize)> = segments
        .iter()
        .enumerate()
        .flat_map(|(s, seg)| (0..seg.len).map(move |i| (s, i)))
        .collect();
    let work: usize = items
        .iter()
        .map(|&(s, i)| (segments[s].offset + i + 1) * heads * (dk + dr + dv))
        .sum();
    let mut o = vec![0f32; rows * heads * dv];
    let out = SharedOut(o.as_mut_ptr());
    for_chunks(items.len(), work, |chunk| {
        let mut scores: Vec<f32> = Vec::new();
        for &(s, i) in &items[chunk] {
            let (seg, c) = (&segments[s], &caches[s]);
            let row = seg.start + i;
            // SAFETY: this item alone writes packed row `row` of the output.
            let o_row =
                unsafe { std::slice::from_raw_parts_mut(out.at(row * heads * dv), heads * dv) };
            attend_row(
                &qv,
                &qr,
                heads,
                row,
                seg.offset + i + 1,
                c,
                scale,
                &mut scores,
                o_row,
            );
        }
    });
    Tensor::from_vec(o, (rows, heads, dv), q.device())
}

/// One segment's cache buffers as the rows read them.
struct SegmentCache<'a> {
    keys: &'a Raw<'a>,
    values: &'a Raw<'a>,
    rope_keys: Option<&'a Raw<'a>>,
    kd: &'a [f32],
    vd: &'a [f32],
    rd: &'a [f32],
}

/// Packed row `row` (all heads) over its first `visible` cached positions: softmax(q·kᵀ·scale)·v
/// per head into `o_row` [H, dv].
#[allow(clippy::too_many_arguments)]
fn attend_row(
    qv: &[f32],
    qr: &[f32],
    heads: usize,
    row: usize,
    visible: usize,
    c: &SegmentCache,
    scale: f32,
    scores: &mut Vec<f32>,
    o_row: &mut [f32],
) {
    let (dk, dv) = (c.keys.dim, c.values.dim);
    let dr = c.rope_keys.map_or(0, |r| r.dim);
    let rep = heads / c.keys.groups;
    scores.resize(rep * visible, 0.0);
    for g in 0..c.keys.groups {
        let h0 = row * heads + g * rep;
        let group = GroupRows {
            keys: &c.kd[c.keys.at(g)..][..visible * dk],
            rope_keys: match c.rope_keys {
                Some(r) => &c.rd[r.at(g)..][..visible * dr],
                None => &[],
            },
            values: &c.vd[c.values.at(g)..][..visible * dv],
            dk,
            dr,
        };
        group_scores(
            &qv[h0 * dk..][..rep * dk],
            if dr > 0 {
                &qr[h0 * dr..][..rep * dr]
            } else {
                &[]
            },
            &group,
            scale,
            scores,
        );
        for (hh, s) in scores.chunks_exact_mut(visible).enumerate() {
            let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f32;
            for v in s.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let oh = &mut o_row[(g * rep + hh) * dv..][..dv];
            weighted_sum(s, group.values, dv, oh);
            let inv = 1.0 / sum;
            oh.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// One kv group's cached rows for the visible positions: keys [t, dk], rope keys [t, dr] (empty
/// when dr = 0), values [t, dv] (dv passed beside it).
struct GroupRows<'a> {
    keys: &'a [f32],
    rope_keys: &'a [f32],
    values: &'a [f32],
    dk: usize,
    dr: usize,
}

/// scores[h·t + j] = scale · (q_h·k_j + qr_h·kr_j) for the group's heads (q [rep, dk], qr
/// [rep, dr]) over its t positions; `scores` holds rep × t.
fn group_scores(q: &[f32], qr: &[f32], g: &GroupRows, scale: f32, scores: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked at runtime); slices are sized by the caller.
        unsafe { scores_avx2(q, qr, g, scale, scores) };
        return;
    }
    group_scores_portable(q, qr, g, scale, scores)
}

fn group_scores_portable(q: &[f32], qr: &[f32], g: &GroupRows, scale: f32, scores: &mut [f32]) {
    let t = g.keys.len() / g.dk.max(1);
    for (h, sh) in scores.chunks_exact_mut(t).enumerate() {
        let qh = &q[h * g.dk..][..g.dk];
        for (j, s) in sh.iter_mut().enumerate() {
            let mut v = dot(qh, &g.keys[j * g.dk..][..g.dk]);
            if g.dr > 0 {
                v += dot(&qr[h * g.dr..][..g.dr], &g.rope_keys[j * g.dr..][..g.dr]);
            }
            *s = v * scale;
        }
    }
}

/// The AVX2 scores: each key row is loaded once for a block of up to four heads and two
/// positions at a time (eight independent FMA chains; one dot product per call would wait on the
/// FMA latency at every step and reload the key row per head).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(q: &[f32], qr: &[f32], g: &GroupRows, scale: f32, scores: &mut [f32]) {
    let t = g.keys.len() / g.dk.max(1);
    let rep = q.len() / g.dk.max(1);
    let mut h = 0;
    while h < rep {
        let hb = (rep - h).min(4);
        match hb {
            4 => score_block::<4>(q, qr, g, h, t, scale, scores),
            3 => score_block::<3>(q, qr, g, h, t, scale, scores),
            2 => score_block::<2>(q, qr, g, h, t, scale, scores),
            _ => score_block::<1>(q, qr, g, h, t, scale, scores),
        }
        h += hb;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn score_block<const HB: usize>(
    q: &[f32],
    qr: &[f32],
    g: &GroupRows,
    h0: usize,
    t: usize,
    scale: f32,
    scores: &mut [f32],
) {
    use crate::rows_matmul::hsum;
    use std::arch::x86_64::*;
    // Σ over one part (the nope/latent part, then the rope part) into the accumulators.
    #[inline(always)]
    unsafe fn part<const HB: usize>(
        acc: &mut [[__m256; HB]; 2],
        tail: &mut [[f32; HB]; 2],
        q: *const f32,
        k0: *const f32,
        k1: *const f32,
        d: usize,
    ) {
        let d8 = d - d % 8;
        let mut c = 0;
        while c < d8 {
            let a = _mm256_loadu_ps(k0.add(c));
            let b = _mm256_loadu_ps(k1.add(c));
            for h in 0..HB {
                let qv = _mm256_loadu_ps(q.add(h * d + c));
                acc[0][h] = _mm256_fmadd_ps(qv, a, acc[0][h]);
                acc[1][h] = _mm256_fmadd_ps(qv, b, acc[1][h]);
            }
            c += 8;
        }
        for c in d8..d {
            for h in 0..HB {
                let qv = *q.add(h * d + c);
                tail[0][h] += qv * *k0.add(c);
                tail[1][h] += qv * *k1.add(c);
            }
        }
    }
    let (dk, dr) = (g.dk, g.dr);
    let qp = q.as_ptr().add(h0 * dk);
    let qrp = if dr > 0 {
        qr.as_ptr().add(h0 * dr)
    } else {
        qr.as_ptr()
    };
    let mut j = 0;
    while j < t {
        let j1 = if j + 1 < t { j + 1 } else { j };
        let mut acc = [[_mm256_setzero_ps(); HB]; 2];
        let mut tail = [[0f32; HB]; 2];
        let (kp, rp) = (g.keys.as_ptr(), g.rope_keys.as_ptr());
        part::<HB>(&mut acc, &mut tail, qp, kp.add(j * dk), kp.add(j1 * dk), dk);
        if dr > 0 {
            part::<HB>(
                &mut acc,
                &mut tail,
                qrp,
                rp.add(j * dr),
                rp.add(j1 * dr),
                dr,
            );
        }
        for h in 0..HB {
            scores[(h0 + h) * t + j] = (hsum(acc[0][h]) + tail[0][h]) * scale;
            scores[(h0 + h) * t + j1] = (hsum(acc[1][h]) + tail[1][h]) * scale;
        }
        j += 2;
    }
}

/// out[c] = Σ_j p_j · v_j[c] over values [t, dv] (p has t weights).
fn weighted_sum(p: &[f32], values: &[f32], dv: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked at runtime); slices are sized by the caller.
        unsafe { weighted_sum_avx2(p, values, dv, out) };
        return;
    }
    weighted_sum_portable(p, values, dv, out)
}

fn weighted_sum_portable(p: &[f32], values: &[f32], dv: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (j, &w) in p.iter().enumerate() {
        axpy(out, w, &values[j * dv..][..dv]);
    }
}

/// The AVX2 value sum: the output held in up to eight 8-lane accumulators (64 lanes) per pass
/// over the positions, instead of reading and writing it back once per position.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum_avx2(p: &[f32], values: &[f32], dv: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn lanes<const NB: usize>(p: &[f32], v: *const f32, dv: usize, out: *mut f32) {
        let mut acc = [_mm256_setzero_ps(); NB];
        for (j, &w) in p.iter().enumerate() {
            let wv = _mm256_set1_ps(w);
            let row = v.add(j * dv);
            for (b, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row.add(8 * b)), *a);
            }
        }
        for (b, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add(8 * b), *a);
        }
    }
    let d8 = dv - dv % 8;
    let mut c = 0;
    while c < d8 {
        let nb = ((d8 - c) / 8).min(8);
        let (v, o) = (values.as_ptr().add(c), out.as_mut_ptr().add(c));
        match nb {
            8 => lanes::<8>(p, v, dv, o),
            7 => lanes::<7>(p, v, dv, o),
            6 => lanes::<6>(p, v, dv, o),
            5 => lanes::<5>(p, v, dv, o),
            4 => lanes::<4>(p, v, dv, o),
            3 => lanes::<3>(p, v, dv, o),
            2 => lanes::<2>(p, v, dv, o),
            _ => lanes::<1>(p, v, dv, o),
        }
        c += 8 * nb;
    }
    for (c, o) in out.iter_mut().enumerate().skip(d8) {
        *o = p
            .iter()
            .enumerate()
            .map(|(j, &w)| w * values[j * dv + c])
            .sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize, f: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * f).sin()).collect()
    }

    /// The vector kernels equal the portable loops for head counts and widths that are not
    /// multiples of the block sizes (tails of every kind) and an odd number of positions.
    #[test]
    fn vector_kernels_match_portable_loops() {
        for (rep, dk, dr, dv, t) in [(4, 48, 16, 48, 33), (7, 13, 5, 11, 8), (1, 8, 0, 72, 1)] {
            let (q, qr) = (wave(rep * dk, 0.37), wave(rep * dr, 0.91));
            let (k, kr, v) = (wave(t * dk, 0.13), wave(t * dr, 0.29), wave(t * dv, 0.53));
            let g = GroupRows {
                keys: &k,
                rope_keys: &kr,
                values: &v,
                dk,
                dr,
            };
            let (mut fast, mut slow) = (vec![0f32; rep * t], vec![0f32; rep * t]);
            group_scores(&q, &qr, &g, 0.7, &mut fast);
            group_scores_portable(&q, &qr, &g, 0.7, &mut slow);
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() < 1e-4, "scores rep {rep} dk {dk}: {a} vs {b}");
            }
            let p = wave(t, 0.77);
            let (mut fast, mut slow) = (vec![1f32; dv], vec![2f32; dv]);
            weighted_sum(&p, &v, dv, &mut fast);
            weighted_sum_portable(&p, &v, dv, &mut slow);
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() < 1e-4, "values dv {dv}: {a} vs {b}");
            }
        }
    }
}
