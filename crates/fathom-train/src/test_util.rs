//! Helpers for the unit tests of this crate.

use candle_core::{Device, Tensor, Var};

/// An f64 CPU tensor of `shape` from `v`.
pub fn tensor(v: &[f64], shape: (usize, usize)) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

/// Asserts that autograd's gradient of the scalar `loss(x)` at x = `base` (shape `shape`, f64)
/// matches central finite differences (h = 1e-6) to within `tol` per element.
pub fn assert_gradient_matches_fd(
    what: &str,
    base: &[f64],
    shape: (usize, usize),
    tol: f64,
    loss: impl Fn(&Tensor) -> Tensor,
) {
    let var = Var::from_tensor(&tensor(base, shape)).unwrap();
    let grad: Vec<f64> = loss(var.as_tensor())
        .backward()
        .unwrap()
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let value = |v: &[f64]| loss(&tensor(v, shape)).to_scalar::<f64>().unwrap();
    let h = 1e-6;
    for i in 0..base.len() {
        let (mut up, mut down) = (base.to_vec(), base.to_vec());
        up[i] += h;
        down[i] -= h;
        let fd = (value(&up) - value(&down)) / (2.0 * h);
        assert!(
            (fd - grad[i]).abs() < tol,
            "{what}, element {i}: finite difference {fd} vs autograd {}",
            grad[i]
        );
    }
}
