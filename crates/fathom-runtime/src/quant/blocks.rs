//! Every format read the same way: a block is a run of 32-weight *chunks*, and chunk c of a block
//! decodes to small integers `u[0..32]` plus three factors, so that weight i of the chunk is
//!
//!   w_i = dw · sc[i / 16] · u_i + corr[i / 16]
//!
//! (`sc` and `corr` per 16-weight half, since Q2_K, Q3_K and Q6_K scale 16-weight sub-blocks).
//! A dot product with int8 activations `x_i = dx · q_i` is then
//!
//!   Σ w_i x_i = dx · (dw · Σ_h sc[h] · Σ_{i∈h} u_i q_i + Σ_h corr[h] · Σ_{i∈h} q_i),
//!
//! integer multiply-adds per chunk and the activation's 16-weight sums (`bsum`) for the offset or
//! minimum term: the same decomposition llama.cpp's `vec_dot` kernels use. This file is the
//! portable definition of each layout (ggml's `dequantize_row_*`, read as facts); the SIMD
//! kernels in `avx2.rs` compute the same integers and are tested against it.

use super::Format;
use half::f16;

/// One decoded 32-weight chunk.
#[derive(Debug, Clone, Copy)]
pub struct Chunk {
    pub u: [i8; 32],
    pub dw: f32,
    pub sc: [i32; 2],
    pub corr: [f32; 2],
}

impl Chunk {
    /// Weight i as a float.
    pub fn weight(&self, i: usize) -> f32 {
        self.dw * self.sc[i / 16] as f32 * self.u[i] as f32 + self.corr[i / 16]
    }
}

/// IQ4_NL / IQ4_XS's non-linear 4-bit code book (ggml's `kvalues_iq4nl`).
pub const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Q4_K / Q5_K's 6-bit (scale, min) pair j of 8, packed in 12 bytes (ggml's `get_scale_min_k4`).
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q3_K's sixteen 6-bit scales (stored biased by 32) from their 12 packed bytes.
pub(crate) fn q3k_scales(packed: &[u8]) -> [i8; 16] {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let word = |i: usize| u32::from_le_bytes(packed[4 * i..4 * i + 4].try_into().unwrap());
    let (a0, a1, tmp) = (word(0), word(1), word(2));
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let mut out = [0i8; 16];
    for (i, w) in aux.iter().enumerate() {
        for (j, b) in w.to_le_bytes().iter().enumerate() {
            out[4 * i + j] = *b as i8 - 32;
        }
    }
    out
}

/// Chunk `c` (0 ≤ c < block_elems / 32) of one block of `format`.
pub fn decode_chunk(format: Format, b: &[u8], c: usize) -> Chunk {
    let mut u = [0i8; 32];
    let one = [1, 1];
    match format {
        Format::Q8_0 => {
            let d = f16_at(b, 0);
            for (i, v) in u.iter_mut().enumerate() {
                *v = b[2 + i] as i8;
            }
            Chunk {
                u,
                dw: d,
                sc: one,
                corr: [0.0; 2],
            }
        }
        Format::Q4_0 | Format::Q4_1 | Format::IQ4NL => {
            let (d, qs, corr) = match format {
                Format::Q4_0 => {
                    let d = f16_at(b, 0);
                    (d, &b[2..18], -8.0 * d)
                }
                Format::Q4_1 => (f16_at(b, 0), &b[4..20], f16_at(b, 2)),
                _ => (f16_at(b, 0), &b[2..18], 0.0),
            };
            for j in 0..16 {
                let (lo, hi) = (qs[j] & 0xF, qs[j] >> 4);
                if format == Format::IQ4NL {
                    u[j] = IQ4_VALUES[lo as usize];
                    u[j + 16] = IQ4_VALUES[hi as usize];
                } else {
                    u[j] = lo as i8;
                    u[j + 16] = hi as i8;
                }
            }
            Chunk {
                u,
                dw: d,
                sc: one,
                corr: [corr; 2],
            }
        }
        Format::Q5_0 | Format::Q5_1 => {
            let (d, corr, rest) = if format == Format::Q5_0 {
                let d = f16_at(b, 0);
                (d, -16.0 * d, &b[2..])
            } else {
                (f16_at(b, 0), f16_at(b, 2), &b[4..])
            };
            let qh = u32::from_le_bytes(rest[0..4].try_into().unwrap());
            let qs = &rest[4..20];
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) as u8;
                let h1 = ((qh >> (j + 16)) & 1) as u8;
                u[j] = ((qs[j] & 0xF) | (h0 << 4)) as i8;
                u[j + 16] = ((qs[j] >> 4) | (h1 << 4)) as i8;
            }
            Chunk {
                u,
                dw: d,
                sc: one,
                corr: [corr; 2],
            }
        }
        Format::Q4K | Format::Q5K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let (qh, qs) = if format == Format::Q5K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            let (sc, m) = scale_min_k4(c, scales);
            let q = &qs[32 * (c / 2)..32 * (c / 2) + 32];
            for l in 0..32 {
                let nib = if c % 2 == 0 { q[l] & 0xF } else { q[l] >> 4 };
                let high = qh.map_or(0, |h| ((h[l] >> c) & 1) << 4);
                u[l] = (nib | high) as i8;
            }
            let corr = -dmin * m as f32;
            Chunk {
                u,
                dw: d * sc as f32,
                sc: one,
                corr: [corr; 2],
            }
        }
        Format::Q6K => {
            let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            let (n, t) = (c / 4, c % 4);
            let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
            for l in 0..32 {
                let low = match t {
                    0 => ql[l] & 0xF,
                    1 => ql[l + 32] & 0xF,
                    2 => ql[l] >> 4,
                    _ => ql[l + 32] >> 4,
                };
                u[l] = (low | (((qh[l] >> (2 * t)) & 3) << 4)) as i8;
            }
            let s = [
                scales[8 * n + 2 * t] as i8 as i32,
                scales[8 * n + 2 * t + 1] as i8 as i32,
            ];
            Chunk {
                u,
                dw: d,
                sc: s,
                corr: [-32.0 * d * s[0] as f32, -32.0 * d * s[1] as f32],
            }
        }
        Format::Q2K => {
            let (scales, qs) = (&b[0..16], &b[16..80]);
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            let (n, t) = (c / 4, c % 4);
            let q = &qs[32 * n..32 * n + 32];
            for l in 0..32 {
                u[l] = ((q[l] >> (2 * t)) & 3) as i8;
            }
            let (s0, s1) = (scales[8 * n + 2 * t], scales[8 * n + 2 * t + 1]);
            Chunk {
                u,
                dw: d,
                sc: [(s0 & 0xF) as i32, (s1 & 0xF) as i32],
                corr: [-dmin * (s0 >> 4) as f32, -dmin * (s1 >> 4) as f32],
            }
        }
        Format::Q3K => {
            let (hmask, qs) = (&b[0..32], &b[32..96]);
            let scales = q3k_scales(&b[96..108]);
            let d = f16_at(b, 108);
            let (n, t) = (c / 4, c % 4);
            let q = &qs[32 * n..32 * n + 32];
            for l in 0..32 {
                let low = (q[l] >> (2 * t)) & 3;
                let high = (hmask[l] >> c) & 1;
                u[l] = (low | (high << 2)) as i8;
            }
            let s = [
                scales[8 * n + 2 * t] as i32,
                scales[8 * n + 2 * t + 1] as i32,
            ];
            Chunk {
                u,
                dw: d,
                sc: s,
                corr: [-4.0 * d * s[0] as f32, -4.0 * d * s[1] as f32],
            }
        }
        Format::IQ4XS => {
            let d = f16_at(b, 0);
            let scales_h = u16::from_le_bytes([b[2], b[3]]) as u32;
            let scales_l = &b[4..8];
            let qs = &b[8 + 16 * c..8 + 16 * c + 16];
            let ls = ((scales_l[c / 2] >> (4 * (c % 2))) & 0xF) as i32
                | ((((scales_h >> (2 * c)) & 3) as i32) << 4);
            for j in 0..16 {
                u[j] = IQ4_VALUES[(qs[j] & 0xF) as usize];
                u[j + 16] = IQ4_VALUES[(qs[j] >> 4) as usize];
            }
            Chunk {
                u,
                dw: d * (ls - 32) as f32,
                sc: one,
                corr: [0.0; 2],
            }
        }
    }
}

/// Expand whole blocks to floats (`bytes.len()` a multiple of the block size).
pub fn dequantize(format: Format, bytes: &[u8], out: &mut [f32]) {
    let (be, bb) = (format.block_elems(), format.block_bytes());
    assert_eq!(
        bytes.len() / bb * be,
        out.len(),
        "dequantize: {format} length mismatch"
    );
    for (block, dst) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        for (c, dst) in dst.chunks_exact_mut(32).enumerate() {
            let ch = decode_chunk(format, block, c);
            for (i, v) in dst.iter_mut().enumerate() {
                *v = ch.weight(i);
            }
        }
    }
}
