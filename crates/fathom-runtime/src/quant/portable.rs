//! The portable kernel: one weight row against up to R activation rows, chunk by chunk through
//! [`decode_chunk`], the integer sums exact in i32. Runs where the CPU has no SIMD kernel and is
//! the reference the SIMD kernels are tested against.

use super::activation::ActRow;
use super::blocks::decode_chunk;
use super::Format;

pub fn dot_row<const R: usize>(format: Format, w: &[u8], acts: &[ActRow; R]) -> [f32; R] {
    let (be, bb) = (format.block_elems(), format.block_bytes());
    let mut out = [0f32; R];
    for (bi, block) in w.chunks_exact(bb).enumerate() {
        for c in 0..be / 32 {
            let ch = decode_chunk(format, block, c);
            let chunk = bi * be / 32 + c;
            for (r, a) in acts.iter().enumerate() {
                let q = &a.qs[chunk * 32..chunk * 32 + 32];
                let mut s = [0i32; 2];
                for i in 0..32 {
                    s[i / 16] += ch.u[i] as i32 * q[i] as i32;
                }
                let int = ch.sc[0] * s[0] + ch.sc[1] * s[1];
                let corr = ch.corr[0] * a.bsum[2 * chunk] + ch.corr[1] * a.bsum[2 * chunk + 1];
                out[r] += a.d[chunk] * (ch.dw * int as f32 + corr);
            }
        }
    }
    out
}
