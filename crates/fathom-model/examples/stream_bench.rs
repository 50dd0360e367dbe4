//! The few-row matmul on weights far past the caches (as in decode of a weight-bound model):
//! time per pass over 96 MB of [N, K]-shaped matrices (default [1152, 384]) for the given row
//! counts, and GB/s of weights. Usage: RAYON_NUM_THREADS=T [N=.. K=..] stream_bench 1 2 3 4
use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    let dev = Device::Cpu;
    let env = |v: &str, d: usize| {
        std::env::var(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let (n, k) = (env("N", 1152), env("K", 384));
    let mats: Vec<Tensor> = (0..(96 << 20) / (4 * n * k))
        .map(|_| Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap())
        .collect();
    let bytes = (mats.len() * n * k * 4) as f64;
    let mut one = 0.0;
    for rows in std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect::<Vec<usize>>()
    {
        let x: Vec<f32> = (0..rows * k).map(|i| (i as f32).sin()).collect();
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            for w in &mats {
                std::hint::black_box(fathom_model::rows_matmul::rows_times_weight(&x, rows, w));
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        if rows == 1 || one == 0.0 {
            // Ratios are to one row (to the first count given when 1 is not among them).
            one = best;
        }
        println!(
            "rows {rows}: {:.2} ms per pass, {:.1} GB/s, {:.2}x one row",
            best * 1e3,
            bytes / best / 1e9,
            best / one
        );
    }
}
