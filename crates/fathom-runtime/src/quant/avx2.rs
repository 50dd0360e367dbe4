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

use super::activation::{ActRow, Panel};
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

/// The f16 at `p` as f32.
///
/// The opaque `asm!` pins the whole register: otherwise LLVM, seeing that only lane 0 counts,
/// inserts the bits (`vpinsrw`) into whatever register it picks — a false dependency on that
/// register's last value, which chained a row's blocks one after another (q4_0 decode ran at
/// half speed). Pinned, it loads with `vmovd`, which depends on nothing.
#[inline(always)]
unsafe fn f16(p: *const u8) -> f32 {
    let mut v = _mm_cvtsi32_si128(u16::from_le_bytes([*p, *p.add(1)]) as i32);
    std::arch::asm!("/* {0} */", inout(xmm_reg) v, options(pure, nomem, nostack, preserves_flags));
    _mm_cvtss_f32(_mm_cvtph_ps(v))
}

/// The f16 at `p` in all eight f32 lanes (the per-block scale of the 32-weight formats); the
/// same pin keeps LLVM from turning the splat back into a scalar insert.
#[inline(always)]
unsafe fn f16x8(p: *const u8) -> __m256 {
    let mut v = _mm_set1_epi16((p as *const i16).read_unaligned());
    std::arch::asm!("/* {0} */", inout(xmm_reg) v, options(pure, nomem, nostack, preserves_flags));
    _mm256_cvtph_ps(v)
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

/// What a format's loop hands its unpacked chunks to. [`Rows`]: one weight row · R activation
/// rows, each row's sums in its own vector (decode, short batches). [`PanelSink`]: one weight
/// row · one panel of eight interleaved activation rows, the eight rows' sums in the lanes of
/// one vector (long batches on VNNI). The format loops (`dot_blocks`) are written once for both.
trait Sink {
    type Out;
    /// acc += dw · dx · Σ u·q over chunk `chunk` (the 32-weight formats: one scale a block, `dw`
    /// in every lane); `u` signed i8 values when SIGNED, else u8 codes.
    unsafe fn mac<const SIGNED: bool>(&mut self, u: __m256i, dw: __m256, chunk: usize);
    /// acc += dx · (c0 · Σq over weights 0..16 + c1 · Σq over 16..32) of chunk `chunk`.
    unsafe fn offset(&mut self, c0: f32, c1: f32, chunk: usize);
    /// Integer accumulation inside a super-block: isum += Σ sc·u·q over the chunk (the
    /// k-quants' activations share one scale per 256 values, so a super-block converts to float
    /// once). `sc`: i16 lanes, 0–7 the scale of the chunk's first 16 weights, 8–15 of the
    /// second's; UNIFORM when the two are one scale.
    unsafe fn imac<const SIGNED: bool, const UNIFORM: bool>(
        &mut self,
        u: __m256i,
        sc: __m256i,
        chunk: usize,
    );
    /// End of super-block `bi`: acc += d · dx · isum + dx · Σ_i coef[i] · Σq over sub-block
    /// 16·bi + i (the offset or minimum term of each 16-weight sub-block); isum restarts.
    unsafe fn flush(&mut self, d: f32, coef: Option<(__m256, __m256)>, bi: usize);
    /// acc += dx · c · Σ_chunk mins[chunk] · (Σq over the chunk's 32 weights) (the minimum term
    /// of a Q4_K/Q5_K super-block; `mins` lanes are its eight chunks).
    unsafe fn min_term(&mut self, c: f32, mins: __m256, bi: usize);
    unsafe fn finish(self) -> Self::Out;
}

/// One weight row against R activation rows; VNNI picks the dot-product instructions.
struct Rows<'a, const R: usize, const VNNI: bool> {
    acts: &'a [ActRow<'a>; R],
    acc: [__m256; R],
    isum: [__m256i; R],
    corr: [f32; R],
}

impl<'a, const R: usize, const VNNI: bool> Rows<'a, R, VNNI> {
    #[inline(always)]
    unsafe fn new(acts: &'a [ActRow<'a>; R]) -> Self {
        Rows {
            acts,
            acc: [_mm256_setzero_ps(); R],
            isum: [_mm256_setzero_si256(); R],
            corr: [0.0; R],
        }
    }
}

impl<const R: usize, const VNNI: bool> Sink for Rows<'_, R, VNNI> {
    type Out = [f32; R];

    /// VNNI: one `vpdpbusd` (u8 × i8, four products into each i32) instead of maddubs + madd.
    #[inline(always)]
    unsafe fn mac<const SIGNED: bool>(&mut self, u: __m256i, dw: __m256, chunk: usize) {
        let au = if SIGNED { _mm256_sign_epi8(u, u) } else { u };
        for r in 0..R {
            let x = chunk_acts::<SIGNED>(u, chunk, &self.acts[r]);
            let s = if VNNI {
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), au, x)
            } else {
                _mm256_madd_epi16(_mm256_maddubs_epi16(au, x), _mm256_set1_epi16(1))
            };
            let f = _mm256_mul_ps(dw, _mm256_set1_ps(*self.acts[r].d.get_unchecked(chunk)));
            self.acc[r] = _mm256_fmadd_ps(f, _mm256_cvtepi32_ps(s), self.acc[r]);
        }
    }

    #[inline(always)]
    unsafe fn offset(&mut self, c0: f32, c1: f32, chunk: usize) {
        for r in 0..R {
            let a = &self.acts[r];
            let s =
                c0 * *a.bsum.get_unchecked(2 * chunk) + c1 * *a.bsum.get_unchecked(2 * chunk + 1);
            self.corr[r] += *a.d.get_unchecked(chunk) * s;
        }
    }

    /// VNNI: `vpdpwssd` multiplies the i16 pair sums by the scales and accumulates in one step.
    #[inline(always)]
    unsafe fn imac<const SIGNED: bool, const UNIFORM: bool>(
        &mut self,
        u: __m256i,
        sc: __m256i,
        chunk: usize,
    ) {
        let au = if SIGNED { _mm256_sign_epi8(u, u) } else { u };
        for r in 0..R {
            let pairs = _mm256_maddubs_epi16(au, chunk_acts::<SIGNED>(u, chunk, &self.acts[r]));
            self.isum[r] = if VNNI {
                _mm256_dpwssd_epi32(self.isum[r], pairs, sc)
            } else {
                _mm256_add_epi32(self.isum[r], _mm256_madd_epi16(pairs, sc))
            };
        }
    }

    /// Both terms kept in the row's eight float lanes (summed across lanes once per row, not
    /// once per super-block).
    #[inline(always)]
    unsafe fn flush(&mut self, d: f32, coef: Option<(__m256, __m256)>, bi: usize) {
        for r in 0..R {
            let a = &self.acts[r];
            let dx = *a.d.get_unchecked(bi * 8);
            let isum = _mm256_cvtepi32_ps(self.isum[r]);
            self.acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), isum, self.acc[r]);
            self.isum[r] = _mm256_setzero_si256();
            if let Some((c0, c1)) = coef {
                let b = a.bsum.as_ptr().add(bi * 16);
                let s = _mm256_fmadd_ps(
                    c0,
                    _mm256_loadu_ps(b),
                    _mm256_mul_ps(c1, _mm256_loadu_ps(b.add(8))),
                );
                self.acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dx), s, self.acc[r]);
            }
        }
    }

    #[inline(always)]
    unsafe fn min_term(&mut self, c: f32, mins: __m256, bi: usize) {
        for r in 0..R {
            let a = &self.acts[r];
            let b = a.bsum.as_ptr().add(bi * 16);
            // Pair sums of the 16-value sums: hadd interleaves 128-bit lanes, the permute
            // restores chunk order.
            let pairs = _mm256_hadd_ps(_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8)));
            let pairs = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(pairs), 0xD8));
            let dx = *a.d.get_unchecked(bi * 8);
            let t = _mm256_mul_ps(mins, pairs);
            self.acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(c * dx), t, self.acc[r]);
        }
    }

    #[inline(always)]
    unsafe fn finish(self) -> [f32; R] {
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum(self.acc[r]) + self.corr[r];
        }
        out
    }
}

/// One weight row against NP [`Panel`]s (VNNI only). A chunk's 32 codes go to the stack as
/// u8 (signed values + 128, the 128 · Σq taken back in integers), and each group of four is
/// broadcast and `vpdpbusd`-ed against each panel's vector of its eight rows' four values: eight
/// instructions a panel give its eight rows' chunk sums, one per lane. Two panels share each
/// broadcast and each unpacked chunk.
struct PanelSink<'a, const NP: usize> {
    p: [Panel<'a>; NP],
    acc: [__m256; NP],
    isum: [__m256i; NP],
}

const P8: usize = super::activation::PANEL_ROWS;

impl<const NP: usize> PanelSink<'_, NP> {
    /// Σ codes · q over four-groups j0..j0 + N of chunk `chunk` for each panel's eight rows, in
    /// i32 lanes.
    #[inline(always)]
    unsafe fn dots<const N: usize>(
        &self,
        codes: &[u8; 32],
        j0: usize,
        chunk: usize,
    ) -> [__m256i; NP] {
        let mut s = [_mm256_setzero_si256(); NP];
        for j in j0..j0 + N {
            let w = _mm256_set1_epi32((codes.as_ptr().add(4 * j) as *const i32).read_unaligned());
            for (q, sq) in s.iter_mut().enumerate() {
                let x = self.p[q].qs.as_ptr().add(chunk * 32 * P8) as *const __m256i;
                *sq = _mm256_dpbusd_epi32(*sq, w, _mm256_loadu_si256(x.add(j)));
            }
        }
        s
    }

    /// The chunk's codes as u8 on the stack (signed values shifted by 128).
    #[inline(always)]
    unsafe fn codes<const SIGNED: bool>(u: __m256i) -> [u8; 32] {
        let c = if SIGNED {
            _mm256_xor_si256(u, _mm256_set1_epi8(0x80u8 as i8))
        } else {
            u
        };
        let mut out = [0u8; 32];
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, c);
        out
    }

    #[inline(always)]
    unsafe fn lanes_f(v: &[f32], g: usize) -> __m256 {
        _mm256_loadu_ps(v.as_ptr().add(g * P8))
    }

    #[inline(always)]
    unsafe fn lanes_i(v: &[i32], g: usize) -> __m256i {
        _mm256_loadu_si256(v.as_ptr().add(g * P8) as *const __m256i)
    }
}

/// i16 lane 0 of the 128-bit `v`, sign-extended into every i32 lane.
#[inline(always)]
unsafe fn splat_i16(v: __m128i) -> __m256i {
    _mm256_cvtepi16_epi32(_mm_broadcastw_epi16(v))
}

impl<const NP: usize> Sink for PanelSink<'_, NP> {
    type Out = [[f32; P8]; NP];

    #[inline(always)]
    unsafe fn mac<const SIGNED: bool>(&mut self, u: __m256i, dw: __m256, chunk: usize) {
        let codes = Self::codes::<SIGNED>(u);
        let s = self.dots::<8>(&codes, 0, chunk);
        for q in 0..NP {
            let mut s = s[q];
            if SIGNED {
                let b = Self::lanes_i(self.p[q].b32i, chunk);
                s = _mm256_sub_epi32(s, _mm256_slli_epi32(b, 7));
            }
            let f = _mm256_mul_ps(dw, Self::lanes_f(self.p[q].d, chunk));
            self.acc[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), f, self.acc[q]);
        }
    }

    #[inline(always)]
    unsafe fn offset(&mut self, c0: f32, c1: f32, chunk: usize) {
        let (c0, c1) = (_mm256_set1_ps(c0), _mm256_set1_ps(c1));
        for q in 0..NP {
            let p = &self.p[q];
            let s = _mm256_fmadd_ps(
                c0,
                Self::lanes_f(p.b16, 2 * chunk),
                _mm256_mul_ps(c1, Self::lanes_f(p.b16, 2 * chunk + 1)),
            );
            self.acc[q] = _mm256_fmadd_ps(Self::lanes_f(p.d, chunk), s, self.acc[q]);
        }
    }

    #[inline(always)]
    unsafe fn imac<const SIGNED: bool, const UNIFORM: bool>(
        &mut self,
        u: __m256i,
        sc: __m256i,
        chunk: usize,
    ) {
        let codes = Self::codes::<SIGNED>(u);
        let sc0 = splat_i16(_mm256_castsi256_si128(sc));
        if UNIFORM {
            let s = self.dots::<8>(&codes, 0, chunk);
            for q in 0..NP {
                let mut s = s[q];
                if SIGNED {
                    let b = Self::lanes_i(self.p[q].b32i, chunk);
                    s = _mm256_sub_epi32(s, _mm256_slli_epi32(b, 7));
                }
                self.isum[q] = _mm256_add_epi32(self.isum[q], _mm256_mullo_epi32(s, sc0));
            }
        } else {
            let sc1 = splat_i16(_mm256_extracti128_si256(sc, 1));
            let s0 = self.dots::<4>(&codes, 0, chunk);
            let s1 = self.dots::<4>(&codes, 4, chunk);
            for q in 0..NP {
                let (mut s0, mut s1) = (s0[q], s1[q]);
                if SIGNED {
                    let b = self.p[q].b16i;
                    s0 = _mm256_sub_epi32(s0, _mm256_slli_epi32(Self::lanes_i(b, 2 * chunk), 7));
                    let b1 = Self::lanes_i(b, 2 * chunk + 1);
                    s1 = _mm256_sub_epi32(s1, _mm256_slli_epi32(b1, 7));
                }
                let t = _mm256_add_epi32(_mm256_mullo_epi32(s0, sc0), _mm256_mullo_epi32(s1, sc1));
                self.isum[q] = _mm256_add_epi32(self.isum[q], t);
            }
        }
    }

    #[inline(always)]
    unsafe fn flush(&mut self, d: f32, coef: Option<(__m256, __m256)>, bi: usize) {
        let mut c = [0f32; 16];
        if let Some((c0, c1)) = coef {
            _mm256_storeu_ps(c.as_mut_ptr(), c0);
            _mm256_storeu_ps(c.as_mut_ptr().add(8), c1);
        }
        for q in 0..NP {
            let p = &self.p[q];
            let dx = Self::lanes_f(p.d, bi * 8);
            let isum = _mm256_cvtepi32_ps(self.isum[q]);
            self.acc[q] = _mm256_fmadd_ps(isum, _mm256_mul_ps(_mm256_set1_ps(d), dx), self.acc[q]);
            self.isum[q] = _mm256_setzero_si256();
            if coef.is_some() {
                let (mut t0, mut t1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for i in (0..16).step_by(2) {
                    let b0 = Self::lanes_f(p.b16, bi * 16 + i);
                    let b1 = Self::lanes_f(p.b16, bi * 16 + i + 1);
                    t0 = _mm256_fmadd_ps(_mm256_set1_ps(c[i]), b0, t0);
                    t1 = _mm256_fmadd_ps(_mm256_set1_ps(c[i + 1]), b1, t1);
                }
                self.acc[q] = _mm256_fmadd_ps(dx, _mm256_add_ps(t0, t1), self.acc[q]);
            }
        }
    }

    #[inline(always)]
    unsafe fn min_term(&mut self, c: f32, mins: __m256, bi: usize) {
        let mut m = [0f32; 8];
        _mm256_storeu_ps(m.as_mut_ptr(), mins);
        for q in 0..NP {
            let p = &self.p[q];
            let (mut t0, mut t1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for (ci, &mc) in m.iter().enumerate() {
                let g = bi * 16 + 2 * ci;
                let pair = _mm256_add_ps(Self::lanes_f(p.b16, g), Self::lanes_f(p.b16, g + 1));
                if ci % 2 == 0 {
                    t0 = _mm256_fmadd_ps(_mm256_set1_ps(mc), pair, t0);
                } else {
                    t1 = _mm256_fmadd_ps(_mm256_set1_ps(mc), pair, t1);
                }
            }
            let f = _mm256_mul_ps(_mm256_set1_ps(c), Self::lanes_f(p.d, bi * 8));
            self.acc[q] = _mm256_fmadd_ps(f, _mm256_add_ps(t0, t1), self.acc[q]);
        }
    }

    #[inline(always)]
    unsafe fn finish(self) -> [[f32; P8]; NP] {
        let mut out = [[0f32; P8]; NP];
        for q in 0..NP {
            _mm256_storeu_ps(out[q].as_mut_ptr(), self.acc[q]);
        }
        out
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

/// One weight row (`w`: whole blocks of `format`) · R activation rows.
///
/// # Safety
/// `supported()`; every activation row covers the weight row's width.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_row<const R: usize>(format: Format, w: &[u8], acts: &[ActRow; R]) -> [f32; R] {
    dot_blocks(format, w, Rows::<R, false>::new(acts))
}

/// out[i] = row i of `w` (rows of `rb` bytes) · `x`, every row in this one call.
///
/// # Safety
/// `supported()`; `x` covers a row's width; `w` holds `out.len()` rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_each_row(format: Format, w: &[u8], rb: usize, x: ActRow, out: &mut [f32]) {
    each_row::<false>(format, w, rb, x, out)
}

#[inline(always)]
unsafe fn each_row<const VNNI: bool>(
    format: Format,
    w: &[u8],
    rb: usize,
    x: ActRow,
    out: &mut [f32],
) {
    let acts = [x];
    for (i, o) in out.iter_mut().enumerate() {
        let row = w.get_unchecked(i * rb..(i + 1) * rb);
        *o = dot_blocks(format, row, Rows::<1, VNNI>::new(&acts))[0];
    }
}

/// [`dot_each_row`] with the VNNI instructions.
///
/// # Safety
/// `vnni_supported()`; as [`dot_each_row`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_each_row_vnni(format: Format, w: &[u8], rb: usize, x: ActRow, out: &mut [f32]) {
    each_row::<true>(format, w, rb, x, out)
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
    dot_blocks(format, w, Rows::<R, true>::new(acts))
}

/// One weight row (`w`: whole blocks of `format`) against NP activation [`Panel`]s: their rows'
/// products.
///
/// # Safety
/// `vnni_supported()`; the panel covers the weight row's width.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_panels<const NP: usize>(
    format: Format,
    w: &[u8],
    panels: [Panel; NP],
) -> [[f32; P8]; NP] {
    let sink = PanelSink {
        p: panels,
        acc: [_mm256_setzero_ps(); NP],
        isum: [_mm256_setzero_si256(); NP],
    };
    dot_blocks(format, w, sink)
}

/// Each format's loop over a weight row's blocks: unpack every chunk of 32 weights once into
/// bytes in a register, hand it with its scales to the sink.
#[inline(always)]
unsafe fn dot_blocks<S: Sink>(format: Format, w: &[u8], mut s: S) -> S::Out {
    let bb = format.block_bytes();
    let blocks = w.len() / bb;
    let p0 = w.as_ptr();
    match format {
        Format::Q8_0 => {
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                let u = _mm256_loadu_si256(p.add(2) as *const __m256i);
                s.mac::<true>(u, f16x8(p), bi);
            }
        }
        Format::Q4_0 => {
            let eight = _mm256_set1_epi8(8);
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                // Signed weights q − 8 (as ggml does): no offset term per block, whose scalar
                // chain cost more than the two sign instructions at one activation row.
                let u = _mm256_sub_epi8(nibbles16(p.add(2)), eight);
                s.mac::<true>(u, f16x8(p), bi);
            }
        }
        Format::Q4_1 => {
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                let m = f16(p.add(2));
                s.mac::<false>(nibbles16(p.add(4)), f16x8(p), bi);
                s.offset(m, m, bi);
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
                s.mac::<true>(u, f16x8(p), bi);
            }
        }
        Format::Q5_1 => {
            let fifth = _mm256_set1_epi8(0x10);
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                let m = f16(p.add(2));
                let qh = u32::from_le_bytes([*p.add(4), *p.add(5), *p.add(6), *p.add(7)]);
                let u =
                    _mm256_or_si256(nibbles16(p.add(8)), _mm256_and_si256(fifth_bits(qh), fifth));
                s.mac::<false>(u, f16x8(p), bi);
                s.offset(m, m, bi);
            }
        }
        Format::IQ4NL => {
            let lut =
                _mm256_broadcastsi128_si256(_mm_loadu_si128(IQ4_VALUES.as_ptr() as *const __m128i));
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                let u = _mm256_shuffle_epi8(lut, nibbles16(p.add(2)));
                s.mac::<true>(u, f16x8(p), bi);
            }
        }
        Format::IQ4XS => {
            let lut =
                _mm256_broadcastsi128_si256(_mm_loadu_si128(IQ4_VALUES.as_ptr() as *const __m128i));
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                let sh = u16::from_le_bytes([*p.add(2), *p.add(3)]) as i32;
                for c in 0..8 {
                    let sl = (*p.add(4 + c / 2) >> (4 * (c % 2))) & 0xF;
                    let ls = sl as i32 | (((sh >> (2 * c)) & 3) << 4);
                    let u = _mm256_shuffle_epi8(lut, nibbles16(p.add(8 + 16 * c)));
                    s.imac::<true, true>(u, _mm256_set1_epi16((ls - 32) as i16), bi * 8 + c);
                }
                s.flush(f16(p), None, bi);
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
                        s.imac::<false, true>(u, sc, bi * 8 + c);
                    }
                }
                s.flush(d, None, bi);
                s.min_term(-dmin, mins, bi);
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
                        s.imac::<false, false>(u, sc, bi * 8 + c);
                    }
                }
                s.flush(d, Some(coef), bi);
            }
        }
        Format::Q2K => {
            let low2 = _mm256_set1_epi8(3);
            for bi in 0..blocks {
                let p = p0.add(bi * bb);
                let (d, dmin) = (f16(p.add(80)), f16(p.add(82)));
                let mut coef = [0f32; 16];
                for n in 0..2 {
                    let q = _mm256_loadu_si256(p.add(16 + 32 * n) as *const __m256i);
                    for t in 0..4 {
                        let c = 4 * n + t;
                        let u = _mm256_and_si256(srl16(q, 2 * t), low2);
                        let (s0, s1) = (*p.add(2 * c), *p.add(2 * c + 1));
                        let sc = halves((s0 & 0xF) as i32, (s1 & 0xF) as i32);
                        s.imac::<false, false>(u, sc, bi * 8 + c);
                        coef[2 * c] = -dmin * (s0 >> 4) as f32;
                        coef[2 * c + 1] = -dmin * (s1 >> 4) as f32;
                    }
                }
                s.flush(d, Some(load16(&coef)), bi);
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
                for n in 0..2 {
                    let q = _mm256_loadu_si256(p.add(32 + 32 * n) as *const __m256i);
                    for t in 0..4 {
                        let c = 4 * n + t;
                        let low = _mm256_and_si256(srl16(q, 2 * t), low2);
                        let u = _mm256_or_si256(low, bit_of_bytes(hm, c, 4));
                        let (s0, s1) = (scales[2 * c] as i32, scales[2 * c + 1] as i32);
                        s.imac::<false, false>(u, halves(s0, s1), bi * 8 + c);
                        coef[2 * c] = -4.0 * d * s0 as f32;
                        coef[2 * c + 1] = -4.0 * d * s1 as f32;
                    }
                }
                s.flush(d, Some(load16(&coef)), bi);
            }
        }
    }
    s.finish()
}
