//! The inference-only host kernels (few-row matmul, fused SwiGLU, the one-pass routed experts) give
//! the same outputs as the candle-op path training uses. A `Var` input makes every layer take the
//! candle path (it records gradients), the same values as a plain tensor take the host path.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{fixture, max_abs_diff};
use fathom_model::decoder::FeedForward;
use fathom_model::CausalLm;

fn host_and_tracked(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
    let tracked = Var::from_tensor(x).unwrap();
    assert!(tracked.as_tensor().track_op());
    (f(x), f(tracked.as_tensor()).detach())
}

#[test]
fn dense_and_moe_blocks_match_the_candle_path_at_decode_batch_sizes() {
    let model = CausalLm::load(&fixture("deepseek_v3_tiny"), DType::F32, &Device::Cpu).unwrap();
    let hidden = model.cfg.hidden_size;
    let (mut dense, mut moe) = (0, 0);
    // 1 and 16 rows take the few-row kernel; 40 rows only the one-pass experts (≤ 64 rows).
    for rows in [1usize, 3, 16, 40] {
        let x = Tensor::randn(0f32, 1.0, (1, rows, hidden), &Device::Cpu).unwrap();
        for layer in &model.layers {
            let (host, reference) = host_and_tracked(&x, |x| match &layer.ffn {
                FeedForward::Dense(m) => m.forward(x).unwrap(),
                FeedForward::Moe(m) => m.forward(x).unwrap(),
            });
            match &layer.ffn {
                FeedForward::Dense(_) => dense += 1,
                FeedForward::Moe(_) => moe += 1,
            }
            let diff = max_abs_diff(&host, &reference);
            assert!(diff < 1e-5, "{rows} rows: max |Δ| {diff}");
        }
    }
    assert!(dense > 0 && moe > 0, "the fixture has both kinds of block");
}

#[test]
fn logits_match_the_candle_path() {
    for name in ["deepseek_v3_tiny", "qwen2_tiny"] {
        let model = CausalLm::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[3u32, 17, 5, 9, 11]], &Device::Cpu).unwrap();
        let x = model.embed(&ids).unwrap();
        // The final hidden state → logits through the head, host kernel vs candle matmul.
        let (host, reference) =
            host_and_tracked(&x.squeeze(0).unwrap(), |h| model.logits(h).unwrap());
        let diff = max_abs_diff(&host, &reference);
        assert!(diff < 1e-5, "{name}: max |Δlogit| {diff}");
    }
}
