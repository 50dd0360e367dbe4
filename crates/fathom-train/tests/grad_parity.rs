//! Gradients of the full pretraining loss (LM + λ/D·ΣMTP + sequence-wise balance loss) against
//! PyTorch autograd on transformers' DeepseekV3 (fixture `grad_v3`, made by
//! tools/reference/make_grad_fixture.py in float64): every parameter within 1e-4 relative.

use candle_core::{DType, Device, Tensor};
use fathom_train::objective::{pretrain_loss, scalar};
use fathom_train::TrainableModel;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/grad_v3")
}

#[test]
fn loss_and_every_gradient_match_pytorch() {
    let dir = fixture();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let tm = TrainableModel::new(cfg, &Device::Cpu).unwrap();
    tm.load_weights(&dir).unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let r = |name: &str| -> f64 {
        reference[name]
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0]
    };
    let tokens = reference["tokens"].to_dtype(DType::U32).unwrap();
    let parts = pretrain_loss(&tm.model, &tokens, None, r("lambda"), r("alpha")).unwrap();

    let close = |ours: f64, theirs: f64, what: &str| {
        assert!(
            (ours - theirs).abs() <= 1e-5 * theirs.abs().max(1.0),
            "{what}: ours {ours} vs PyTorch {theirs}"
        );
    };
    close(scalar(&parts.lm).unwrap(), r("loss_lm"), "LM loss");
    assert_eq!(parts.mtp.len(), 2);
    close(
        scalar(&parts.mtp[0]).unwrap(),
        r("loss_mtp_1"),
        "MTP loss 1",
    );
    close(
        scalar(&parts.mtp[1]).unwrap(),
        r("loss_mtp_2"),
        "MTP loss 2",
    );
    close(
        scalar(&parts.balance).unwrap(),
        r("loss_balance"),
        "balance loss",
    );
    close(scalar(&parts.total).unwrap(), r("loss_total"), "total loss");
    // Four MoE layers ran: two in the main model, one in each MTP block.
    let layers: Vec<usize> = parts.routings.iter().map(|r| r.0).collect();
    assert_eq!(layers, vec![1, 2, 3, 4]);

    let grads = parts.total.backward().unwrap();
    let mut checked = 0;
    let mut worst = (0.0f64, String::new());
    for p in &tm.params {
        let key = format!("grad.{}", p.name);
        let theirs = reference
            .get(&key)
            .unwrap_or_else(|| panic!("reference lacks {key}"))
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap();
        let ours = match grads.get(p.var.as_tensor()) {
            Some(g) => g.to_dtype(DType::F64).unwrap().flatten_all().unwrap(),
            None => Tensor::zeros(theirs.dims1().unwrap(), DType::F64, &Device::Cpu).unwrap(),
        };
        let norm = |t: &Tensor| -> f64 {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                .sqrt()
        };
        let diff = norm(&(&ours - &theirs).unwrap());
        let scale = norm(&theirs);
        if scale == 0.0 {
            assert!(
                diff < 1e-9,
                "{}: PyTorch grad is zero, ours has norm {diff}",
                p.name
            );
        } else {
            let rel = diff / scale;
            if rel > worst.0 {
                worst = (rel, p.name.clone());
            }
            assert!(rel <= 1e-4, "{}: relative gradient error {rel:.3e}", p.name);
        }
        checked += 1;
    }
    assert_eq!(checked, tm.params.len());
    assert!(checked > 150, "{checked}");
    eprintln!(
        "{checked} parameter gradients within 1e-4; worst {:.2e} ({})",
        worst.0, worst.1
    );
}
