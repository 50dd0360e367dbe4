//! Helpers shared by the integration tests (each test file uses a subset).
#![allow(dead_code)]

use candle_core::Tensor;
use std::path::PathBuf;

/// `fixtures/NAME` at the repository root.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

/// max |a − b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// mean |got − want| / mean |want|: logit error relative to the logits' scale.
pub fn relative_mean_error(got: &Tensor, want: &Tensor) -> f32 {
    let mean = |t: &Tensor| {
        t.abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    mean(&(got - want).unwrap()) / mean(want)
}
