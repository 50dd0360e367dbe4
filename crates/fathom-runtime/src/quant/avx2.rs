//! AVX2 + FMA + F16C kernels: one weight row against R activation rows, each format's chunk
//! unpacked once into 32 bytes in registers and multiplied with every activation row
//! (`maddubs` u8 × i8 → i16 pairs, `madd` with the sub-block scales → i32). The 32-weight
//! formats convert to float once per chunk and row (both sides have a scale per 32); the
//! 256-weight formats sum a whole super-block in integers, since their activations share one
//! scale per 256 (q8_K-style), and convert once per super-block and row. The integers are the ones `blocks.rs` defines; unsigned codes (every format but
//! q8_0 and the iq4 code book) take their offset or minimum through the activation's 16-value
//! sums, signed ones use the sign trick (|w| · sign(x, w)).
//!
//! Saturation: `maddubs` adds two u8 × i8 products into an i16. Codes are ≤ 63 (q6_K) or ≤ 128 in
//! magnitude (q8_0, iq4), activations ≤ 127: at most 2 · 128 · 127 = 32512 < 32767.

use super::activation::ActRow;
use super::blocks::{q3k_scales, IQ4_VALUES};
use super::Format;
use std::arch::x86_64::*;

pub fn supported() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

#[inline(always)]
unsafe fn f16(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]) as i32;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// The per-half integer scales as i16 lanes: low 128 bits for weights 0..16, high for 16..32.
#[inline(always)]
unsafe fn halves(s0: i32, s1: i32) -> __m256i {
    _mm256_set_m128i(_mm_set1_epi16(s1 as i16), _mm_set1_epi16(s0 as i16))
}

/// 16 packed bytes → 32 nibbles: low nibbles first (weights 0..16), then high.
#[inline(always)]
unsafe fn nibbles16(p: *const u8) -> __m256i {
    let packed = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    _mm256_and_si256(both, _mm256_set1_epi8(0xF))
}

/// Bit i of `bits` → byte i = 0xFF (q5_0/q5_1's fifth bit), else 0.
#[inline(always)]
unsafe fn fifth_bits(bits: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        ),
    );
    let set = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(set, _mm256_set1_epi64x(-1))
}

/// Byte-wise: `value` where bit `bit` of the byte of `v` is set, else 0.
#[inline(always)]
unsafe fn bit_of_bytes(v: __m256i, bit: usize, value: i8) -> __m256i {
    let m = _mm256_set1_epi8((1u8 << bit) as i8);
    _mm256_and_si256(
        _mm256_cmpeq_epi8(_mm256_and_si256(v, m), m),
        _mm256_set1_epi8(value),
    )
}

#[inline(always)]
unsafe fn srl16(v: __m256i, n: usize) -> __m256i {
    _mm256_srl_epi16(v, _mm_cvtsi32_si128(n as i32))
}

/// Activation row `a`'s chunk, signed by `u` when the weights are signed (|u| · sign(x, u)).
#[inline(always)]
unsafe fn chunk_acts<const SIGNED: bool>(u: __m256i, chunk: usize, a: &ActRow) -> __m256i {
    let x = _mm256_loadu_si256(a.qs.as_ptr().add(chunk * 32) as *const __m256i);
    if SIGNED {
        _mm256_sign_epi8(x, u)
    } else {
        x
    }
}

/// acc[r] += dw · dx[r] · Σ u·q over the chunk (the 32-weight formats: one scale a block).
/// VNNI: one `vpdpbusd` (u8 × i8, four products into each i32) instead of maddubs + madd.
#[inline(always)]
unsafe fn mac<const R: usize, const SIGNED: bool, const VNNI: bool>(
    u: __m256i,
    dw: f32,
    chunk: usize,
    acts: &[ActRow; R],
    acc: &mut [__m256; R],
) {
    let au = if SIGNED { _mm256_sign_epi8(u, u) } else { u };
    for r in 0..R {
        let x = chunk_acts::<SIGNED>(u, chunk, &acts[r]);
        let s = if VNNI {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), au, x)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(au, x), _mm256_set1_epi16(1))
        };
        let f = dw * *acts[r].d.get_unchecked(chunk);
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(f), _mm256_cvtepi32_ps(s), acc[r]);
    }
}

/// corr[r] += dx[r] · (c0 · Σq over weights 0..16 + c1 · Σq over 16..32).
#[inline(always)]
unsafe fn offset<const R: usize>(
    c0: f32,
    c1: f32,
    chunk: usize,
    acts: &[ActRow; R],
    corr: &mut [f32; R],
) {
    for r in 0..R {
        let a = &acts[r];
        let s = c0 * *a.bsum.get_unchecked(2 * chunk) + c1 * *a.bsum.get_unchecked(2 * chunk + 1);
        corr[r] += *a.d.get_unchecked(chunk) * s;
    }
}

/// Integer accumulation inside a super-block: isum[r] += Σ sc·u·q over the chunk (the k-quants'
/// activations share one scale per 256 values, so a super-block converts to float once).
/// VNNI: `vpdpwssd` multiplies the i16 pair sums by the scales and accumulates in one step.
#[inline(always)]
unsafe fn imac<const R: usize, const SIGNED: bool, const VNNI: bool>(
    u: __m256i,
    sc: __m256i,
    chunk: usize,
    acts: &[ActRow; R],
    isum: &mut [__m256i; R],
) {
    let au = if SIGNED { _mm256_sign_epi8(u, u) } else { u };
    for r in 0..R {
        let pairs = _mm256_maddubs_epi16(au, chunk_acts::<SIGNED>(u, chunk, &acts[r]));
        isum[r] = if VNNI {
            _mm256_dpwssd_epi32(isum[r], pairs, sc)
        } else {
            _mm256_add_epi32(isum[r], _mm256_madd_epi16(pairs, sc))
        };
    }
}

/// End of super-block `bi`: acc[r] += d · dx[r] · isum[r] + dx[r] · Σ_i coef[i] ·
/// bsum[r][16·bi + i] (the offset or minimum term of each 16-weight sub-block), both kept in the
/// row's eight float lanes (summed across lanes once per row, not once per super-block).
#[inline(always)]
unsafe fn flush<const R: usize>(
    d: f32,
    coef: Option<(__m256, __m256)>,
    bi: usize,
    acts: &[ActRow; R],
    isum: &[__m256i; R],
    acc: &mut [__m256; R],
) {
    let c = coef;
    for r in 0..R {
        let a = &acts[r];
        let dx = *a.d.get_unchecked(bi * 8);
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(isum[r]), acc[r]);
        if let Some((c0, c1)) = c {
            let b = a.bsum.as_ptr().add(bi * 16);
            let s = _mm256_fmadd_ps(
                c0,
                _mm256_loadu_ps(b),
                _mm256_mul_ps(c1, _mm256_loadu_ps(b.add(8))),
            );
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dx), s, acc[r]);
        }
    }
}

/// Sixteen per-sub-block coefficients as two float vectors.
#[inline(always)]
unsafe fn load16(c: &[f32; 16]) -> (__m256, __m256) {
    (
        _mm256_loadu_ps(c.as_ptr()),
        _mm256_loadu_ps(c.as_ptr().add(8)),
    )
}

/// Q4_K/Q5_K's 12 packed scale bytes → (the eight 6-bit scales as i16 lanes, the eight 6-bit
/// mins as f32 lanes), `blocks::scale_min_k4` for all chunks at once.
#[inline(always)]
unsafe fn scales_mins_k4(p: *const u8) -> (__m128i, __m256) {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let w = |i: usize| {
        u32::from_le_bytes([
            *p.add(4 * i),
            *p.add(4 * i + 1),
            *p.add(4 * i + 2),
            *p.add(4 * i + 3),
        ])
    };
    let (a, b, c) = (w(0), w(1), w(2));
    let sc_lo = a & KMASK1;
    let sc_hi = (c & KMASK2) | (((a >> 6) & KMASK3) << 4);
    let m_lo = b & KMASK1;
    let m_hi = ((c >> 4) & KMASK2) | (((b >> 6) & KMASK3) << 4);
    let sc = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, sc_hi as i32, sc_lo as i32));
    let m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(
        0,
        0,
        m_hi as i32,
        m_lo as i32,
    )));
    (sc, m)
}

/// acc[r] += dx[r] · c · Σ_chunk mins[chunk] · (Σq over the chunk's 32 weights), in the row's
/// float lanes (the minimum term of a Q4_K/Q5_K super-block).
#[inline(always)]
unsafe fn min_term<const R: usize>(
    c: f32,
    mins: __m256,
    bi: usize,
    acts: &[ActRow; R],
    acc: &mut [__m256; R],
) {
    for r in 0..R {
        let a = &acts[r];
        let b = a.bsum.as_ptr().add(bi * 16);
        // Pair sums of the 16-value sums: hadd interleaves 128-bit lanes, the permute restores
        // chunk order.
        let pairs = _mm256_hadd_ps(_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8)));
        let pairs = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(pairs), 0xD8));
        let dx = *a.d.get_unchecked(bi * 8);
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(c * dx), _mm256_mul_ps(mins, pairs), acc[r]);
    }
}

/// One weight row (`w`: whole blocks of `format`) · R activation rows.
///
/// # Safety
/// `supported()`; every activation row covers the weight row's width.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_row<const R: usize>(format: Format, w: &[u8], acts: &[ActRow; R]) -> [f32; R] {
    dot_row_impl::<R, false>(format, w, acts)
}

/// Whether the CPU has AVX-512 VNNI on 256-bit vectors (and AVX-512 BW/VL, so the compiler
/// also has 32 vector registers: room for an 8-row tile's accumulators).
pub fn vnni_supported() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        supported()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// [`dot_row`] with the VNNI dot-product instructions: the same integers, so the same bits.
///
/// # Safety
/// `vnni_supported()`; every activation row covers the weight row's width.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_row_vnni<const R: usize>(
    format: Format,
    w: &[u8],
    acts: &[ActRow; R],
) -> [f32; R] {
    dot_row_impl::<R, true>(format, w, acts)
}

#[inline(always)]
unsafe fn dot_row_impl<const R: usize, const VNNI: bool>(
    format: Format,
    w: &[u8],
    acts: &[ActRow; R],
) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    let mut corr = [0f32; R];
    let bb = format.block_bytes();
    let blocks = w.len() / bb;
    let p0 = w.as_ptr();
    match format {
        Format::Q8_0 => {
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                let u = _mm256_loadu_si256(p.add(2) as *const __m256i);
                mac::<R, true, VNNI>(u, f16(p), bi, acts, &mut acc);
            }
        }
        Format::Q4_0 => {
            let eight = _mm256_set1_epi8(8);
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                // Signed weights q − 8 (as ggml does): no offset term per block, whose scalar
                // chain cost more than the two sign instructions at one activation row.
                let u = _mm256_sub_epi8(nibbles16(p.add(2)), eight);
                mac::<R, true, VNNI>(u, f16(p), bi, acts, &mut acc);
            }
        }
        Format::Q4_1 => {
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                let m = f16(p.add(2));
                mac::<R, false, VNNI>(nibbles16(p.add(4)), f16(p), bi, acts, &mut acc);
                offset(m, m, bi, acts, &mut corr);
            }
        }
        Format::Q5_0 => {
            // Signed weights q − 16 (as ggml does): the nibble with 0xF0 where the fifth bit is
            // clear, so no offset term per block.
            let high = _mm256_set1_epi8(0xF0u8 as i8);
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                let qh = u32::from_le_bytes([*p.add(2), *p.add(3), *p.add(4), *p.add(5)]);
                let u = _mm256_or_si256(
                    nibbles16(p.add(6)),
                    _mm256_andnot_si256(fifth_bits(qh), high),
                );
                mac::<R, true, VNNI>(u, f16(p), bi, acts, &mut acc);
            }
        }
        Format::Q5_1 => {
            let fifth = _mm256_set1_epi8(0x10);
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                let (d, m) = (f16(p), f16(p.add(2)));
                let qh = u32::from_le_bytes([*p.add(4), *p.add(5), *p.add(6), *p.add(7)]);
                let u =
                    _mm256_or_si256(nibbles16(p.add(8)), _mm256_and_si256(fifth_bits(qh), fifth));
                mac::<R, false, VNNI>(u, d, bi, acts, &mut acc);
                offset(m, m, bi, acts, &mut corr);
            }
        }
        Format::IQ4NL => {
            let lut =
                _mm256_broadcastsi128_si256(_mm_loadu_si128(IQ4_VALUES.as_ptr() as *const __m128i));
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                let u = _mm256_shuffle_epi8(lut, nibbles16(p.add(2)));
                mac::<R, true, VNNI>(u, f16(p), bi, acts, &mut acc);
            }
        }
        Format::IQ4XS => {
            let lut =
                _mm256_broadcastsi128_si256(_mm_loadu_si128(IQ4_VALUES.as_ptr() as *const __m128i));
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                let sh = u16::from_le_bytes([*p.add(2), *p.add(3)]) as i32;
                let mut isum = [_mm256_setzero_si256(); R];
                for c in 0..8 {
                    let sl = (*p.add(4 + c / 2) >> (4 * (c % 2))) & 0xF;
                    let ls = sl as i32 | (((sh >> (2 * c)) & 3) << 4);
                    let u = _mm256_shuffle_epi8(lut, nibbles16(p.add(8 + 16 * c)));
                    imac::<R, true, VNNI>(
                        u,
                        _mm256_set1_epi16((ls - 32) as i16),
                        bi * 8 + c,
                        acts,
                        &mut isum,
                    );
                }
                flush(f16(p), None, bi, acts, &isum, &mut acc);
            }
        }
        Format::Q4K | Format::Q5K => {
            let q5 = format == Format::Q5K;
            let low4 = _mm256_set1_epi8(0xF);
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                let (d, dmin) = (f16(p), f16(p.add(2)));
                let qs = if q5 { p.add(48) } else { p.add(16) };
                let qh = if q5 {
                    _mm256_loadu_si256(p.add(16) as *const __m256i)
                } else {
                    _mm256_setzero_si256()
                };
                // The eight 6-bit scales and mins unpacked together (as ggml's vec_dot does):
                // scales as i16 lanes picked per chunk by a shuffle, mins as floats.
                let (sc16, mins) = scales_mins_k4(p.add(4));
                let scales = _mm256_broadcastsi128_si256(sc16);
                let mut isum = [_mm256_setzero_si256(); R];
                for g in 0..4 {
                    let q = _mm256_loadu_si256(qs.add(32 * g) as *const __m256i);
                    for half in 0..2 {
                        let c = 2 * g + half;
                        let mut u = _mm256_and_si256(if half == 0 { q } else { srl16(q, 4) }, low4);
                        if q5 {
                            u = _mm256_or_si256(u, bit_of_bytes(qh, c, 16));
                        }
                        let sc = _mm256_shuffle_epi8(
                            scales,
                            _mm256_set1_epi16(0x0100 + 0x0202 * c as i16),
                        );
                        imac::<R, false, VNNI>(u, sc, bi * 8 + c, acts, &mut isum);
                    }
                }
                flush(d, None, bi, acts, &isum, &mut acc);
                min_term(-dmin, mins, bi, acts, &mut acc);
            }
        }
        Format::Q6K => {
            let (low4, low2) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(3));
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                let d = f16(p.add(208));
                // The sixteen int8 scales: picked per chunk by a byte shuffle (ggml's
                // get_scale_shuffle), and as floats for the −32 offset term.
                let s128 = _mm_loadu_si128(p.add(192) as *const __m128i);
                let k = _mm256_set1_ps(-32.0 * d);
                let coef = (
                    _mm256_mul_ps(k, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s128))),
                    _mm256_mul_ps(
                        k,
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s128, 8))),
                    ),
                );
                let mut isum = [_mm256_setzero_si256(); R];
                for n in 0..2 {
                    let ql0 = _mm256_loadu_si256(p.add(64 * n) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(p.add(64 * n + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(p.add(128 + 32 * n) as *const __m256i);
                    for t in 0..4 {
                        let ql = if t % 2 == 0 { ql0 } else { ql1 };
                        let low = _mm256_and_si256(if t < 2 { ql } else { srl16(ql, 4) }, low4);
                        let high = _mm256_and_si256(srl16(qh, 2 * t), low2);
                        let u = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
                        let c = 4 * n + t;
                        let pick = _mm_set_epi64x(
                            (0x0101_0101_0101_0101u64 * (2 * c as u64 + 1)) as i64,
                            (0x0101_0101_0101_0101u64 * (2 * c as u64)) as i64,
                        );
                        let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(s128, pick));
                        imac::<R, false, VNNI>(u, sc, bi * 8 + c, acts, &mut isum);
                    }
                }
                flush(d, Some(coef), bi, acts, &isum, &mut acc);
            }
        }
        Format::Q2K => {
            let low2 = _mm256_set1_epi8(3);
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                let (d, dmin) = (f16(p.add(80)), f16(p.add(82)));
                let mut coef = [0f32; 16];
                let mut isum = [_mm256_setzero_si256(); R];
                for n in 0..2 {
                    let q = _mm256_loadu_si256(p.add(16 + 32 * n) as *const __m256i);
                    for t in 0..4 {
                        let c = 4 * n + t;
                        let u = _mm256_and_si256(srl16(q, 2 * t), low2);
                        let (s0, s1) = (*p.add(2 * c), *p.add(2 * c + 1));
                        imac::<R, false, VNNI>(
                            u,
                            halves((s0 & 0xF) as i32, (s1 & 0xF) as i32),
                            bi * 8 + c,
                            acts,
                            &mut isum,
                        );
                        coef[2 * c] = -dmin * (s0 >> 4) as f32;
                        coef[2 * c + 1] = -dmin * (s1 >> 4) as f32;
                    }
                }
                flush(d, Some(load16(&coef)), bi, acts, &isum, &mut acc);
            }
        }
        Format::Q3K => {
            let low2 = _mm256_set1_epi8(3);
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                let d = f16(p.add(108));
                let scales = q3k_scales(std::slice::from_raw_parts(p.add(96), 12));
                let hm = _mm256_loadu_si256(p as *const __m256i);
                let mut coef = [0f32; 16];
                let mut isum = [_mm256_setzero_si256(); R];
                for n in 0..2 {
                    let q = _mm256_loadu_si256(p.add(32 + 32 * n) as *const __m256i);
                    for t in 0..4 {
                        let c = 4 * n + t;
                        let low = _mm256_and_si256(srl16(q, 2 * t), low2);
                        let u = _mm256_or_si256(low, bit_of_bytes(hm, c, 4));
                        let (s0, s1) = (scales[2 * c] as i32, scales[2 * c + 1] as i32);
                        imac::<R, false, VNNI>(u, halves(s0, s1), bi * 8 + c, acts, &mut isum);
                        coef[2 * c] = -4.0 * d * s0 as f32;
                        coef[2 * c + 1] = -4.0 * d * s1 as f32;
                    }
                }
                flush(d, Some(load16(&coef)), bi, acts, &isum, &mut acc);
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]) + corr[r];
    }
    out
}
