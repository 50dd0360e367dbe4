//! Quantised matmul throughput per format, side by side with candle's f32 GEMM on the
//! dequantised weight (what prefill did before): `cargo run --release -p fathom-runtime --example
//! qmatmul_bench -- [N K M]` (weight [N, K], M activation rows; default 2048 768 512).

use candle_core::{Device, Tensor};
use fathom_runtime::{Format, Kernel, QMatrix, QuantizedActs, WeightBytes};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("number"))
        .collect();
    let (n, k, m) = match args[..] {
        [n, k, m] => (n, k, m),
        _ => (2048, 768, 512),
    };
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
    for format in Format::ALL {
        if k % format.block_elems() != 0 {
            continue;
        }
        let bb = format.block_bytes();
        let mut bytes: Vec<u8> = (0..n * k / format.block_elems() * bb)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        for b in bytes.chunks_exact_mut(bb) {
            // small positive f16 scales wherever the format keeps them (0x2000 ≈ 0.0078)
            for at in [0usize, 2, bb - 2, bb - 4] {
                b[at] = 0;
                b[at + 1] = 0x20;
            }
        }
        let w = QMatrix::new(format, n, k, WeightBytes::owned(bytes)).unwrap();
        let best = |f: &mut dyn FnMut()| {
            let mut t = f64::MAX;
            for _ in 0..5 {
                let t0 = Instant::now();
                f();
                t = t.min(t0.elapsed().as_secs_f64());
            }
            t
        };
        let mut acts = QuantizedActs::default();
        let mut y = vec![0f32; m * n];
        let mut int8 = |kernel: Kernel| {
            best(&mut || {
                acts.quantize_into(&x, m, k, format.act_group());
                w.matmul_acts(kernel, &acts, &mut y);
            })
        };
        // Every SIMD kernel the CPU runs, side by side (the last is the one Fathom uses).
        let simd: Vec<(Kernel, f64)> = Kernel::available()
            .into_iter()
            .filter(|k| *k != Kernel::Portable)
            .map(|k| (k, int8(k)))
            .collect();
        let tq = simd.last().map_or_else(|| int8(Kernel::Portable), |s| s.1);
        let tf = best(&mut || {
            let wf = Tensor::from_vec(w.dequantize(), (n, k), &Device::Cpu).unwrap();
            let _ = xt.matmul(&wf.t().unwrap()).unwrap();
        });
        let gmac = (n * k * m) as f64 / 1e9;
        let tquant = best(&mut || acts.quantize_into(&x, m, k, format.act_group()));
        let others: String = simd
            .iter()
            .rev()
            .skip(1)
            .map(|(k, t)| format!(" | {k:?} {:5.1} GMAC/s", gmac / t))
            .collect();
        println!(
            "{:7} [{n}×{k}]·{m} rows: int8 {:6.2} ms ({:5.1} GMAC/s) | dequantise + f32 GEMM {:6.2} ms ({:5.1} GMAC/s) | {:.2}× | of it quantising x {:.2} ms{others}",
            format.name(), tq * 1e3, gmac / tq, tf * 1e3, gmac / tf, tf / tq, tquant * 1e3
        );
    }
}
