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
use crate::rows_matmul::{axpy, dot};
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

    /// Position j of group g.
    fn row<'s>(&self, data: &'s [f32], g: usize, j: usize) -> &'s [f32] {
        let at = (g * self.cap + j) * self.dim;
        &data[at..at + self.dim]
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
    let mut out: Option<(usize, Vec<f32>)> = None;
    let mut scores: Vec<f32> = Vec::new();
    for (seg, view) in segments.iter().zip(views) {
        let keys = Raw::new(view.keys)?;
        let values = Raw::new(view.values)?;
        let rope_keys = view.rope_keys.map(Raw::new).transpose()?;
        let (kd, vd) = (keys.slice()?, values.slice()?);
        let rd = match &rope_keys {
            Some(r) => Some(r.slice()?),
            None => None,
        };
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
        let rep = heads / keys.groups;
        let dv = values.dim;
        let (_, o) = out.get_or_insert_with(|| (dv, vec![0f32; rows * heads * dv]));
        for i in 0..seg.len {
            let row = seg.start + i;
            let visible = seg.offset + i + 1;
            scores.resize(visible, 0.0);
            for h in 0..heads {
                let g = h / rep;
                let qh = &qv[(row * heads + h) * dk..][..dk];
                let qrh = (dr > 0).then(|| &qr[(row * heads + h) * dr..][..dr]);
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    let mut v = dot(qh, keys.row(kd, g, j));
                    if let (Some(qrh), Some(rk), Some(rd)) = (qrh, &rope_keys, rd) {
                        v += dot(qrh, rk.row(rd, g, j));
                    }
                    *s = v * scale;
                    max = max.max(*s);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                let oh = &mut o[(row * heads + h) * dv..][..dv];
                for (j, &p) in scores.iter().enumerate() {
                    let w = p * inv;
                    axpy(oh, w, values.row(vd, g, j));
                }
            }
        }
    }
    let (dv, o) = out.unwrap_or((0, Vec::new()));
    Tensor::from_vec(o, (rows, heads, dv), q.device())
}
