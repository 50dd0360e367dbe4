//! End-to-end pretraining behaviour on a micro config: exact resume, HF checkpoint round trip,
//! balancing bias (selection only, ±γ steps), MTP loss shape and masking, NaN stop.

use candle_core::{DType, Device, Tensor};
use fathom_model::CausalLm;
use fathom_train::checkpoint::write_checkpoint;
use fathom_train::metrics::read_metrics;
use fathom_train::objective::{masked_cross_entropy, pretrain_loss, scalar};
use fathom_train::{train, TrainConfig, TrainError, TrainOptions, TrainableModel};
use std::path::{Path, PathBuf};

fn corpus(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/shakespeare/shakespeare.txt"),
    )
    .unwrap();
    let path = dir.join("corpus.txt");
    std::fs::write(&path, &text[..120_000]).unwrap();
    path
}

fn micro_config(corpus: &Path, steps: usize) -> TrainConfig {
    let text = format!(
        r#"
[model]
vocab_size = 320
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
q_lora_rank = 16
kv_lora_rank = 16
qk_nope_head_dim = 8
qk_rope_head_dim = 8
v_head_dim = 8
intermediate_size = 64
moe_intermediate_size = 16
n_routed_experts = 8
n_shared_experts = 1
num_experts_per_tok = 2
n_group = 4
topk_group = 2
first_k_dense_replace = 1
num_nextn_predict_layers = 1
max_position_embeddings = 64

[data]
train = ["{}"]
arithmetic_problems = 200
val_fraction = 0.1
seq_len = 24

[train]
max_steps = {steps}
batch_size = 3
grad_accum = 2
lr = 3e-3
min_lr = 3e-4
warmup_steps = 2
seed = 9
eval_every = 3
eval_batches = 2
save_every = 3

[balance]
bias_update_speed = 0.01
seq_aux_alpha = 1e-3
"#,
        corpus.display()
    );
    TrainConfig::from_toml(&text, "micro.toml").unwrap()
}

fn run(
    cfg: &TrainConfig,
    out: &Path,
    resume: bool,
    stop_after: Option<usize>,
) -> fathom_train::Result<fathom_train::TrainSummary> {
    train(TrainOptions {
        config: cfg.clone(),
        out: out.to_path_buf(),
        resume,
        quiet: true,
        stop_after,
        threads: 2,
    })
}

#[test]
fn resume_after_a_kill_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = micro_config(&corpus(tmp.path()), 7);
    let straight = tmp.path().join("straight");
    let s = run(&cfg, &straight, false, None).unwrap();
    assert_eq!(s.steps, 7);

    let killed = tmp.path().join("killed");
    let partial = run(&cfg, &killed, false, Some(4)).unwrap();
    assert_eq!(partial.steps, 4);
    assert!(partial.final_dir.is_none());
    // Starting over without --resume would overwrite the run: refused.
    let err = run(&cfg, &killed, false, None).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    // The kill came after step 4; the newest checkpoint is step 3.
    let resumed = run(&cfg, &killed, true, None).unwrap();
    assert_eq!(resumed.steps, 7);

    for f in [
        "final/model.safetensors",
        "checkpoints/step-0000006/optimizer.safetensors",
    ] {
        let a = std::fs::read(straight.join(f)).unwrap();
        let b = std::fs::read(killed.join(f)).unwrap();
        assert!(a == b, "{f} differs after resume");
    }
    let ma = read_metrics(&straight.join("metrics.jsonl")).unwrap();
    let mb = read_metrics(&killed.join("metrics.jsonl")).unwrap();
    assert_eq!(ma.len(), 7);
    assert_eq!(
        mb.len(),
        7,
        "resume rewrites the steps after the checkpoint"
    );
    for (a, b) in ma.iter().zip(&mb) {
        assert_eq!(
            (a.step, a.loss, a.grad_norm, a.val_loss),
            (b.step, b.loss, b.grad_norm, b.val_loss)
        );
        assert_eq!(a.max_vio, b.max_vio);
    }
    // Loss fell and every logged record carries the balance metrics of both MoE layers (main + MTP).
    assert!(ma.last().unwrap().lm_loss < ma[0].lm_loss);
    assert!(ma
        .iter()
        .all(|r| r.max_vio.iter().map(|v| v.0).collect::<Vec<_>>() == vec![1, 2]));
    assert!(ma.iter().all(|r| r.mtp_loss.is_some()));
    assert!(ma[2].val_loss.is_some() && ma[2].val_bpb.is_some() && ma[1].val_loss.is_none());
    assert!(straight.join("metrics.png").exists());
    // Only `keep_checkpoints` (2) step checkpoints remain.
    let kept: Vec<_> = std::fs::read_dir(straight.join("checkpoints"))
        .unwrap()
        .collect();
    assert_eq!(kept.len(), 2);
}

#[test]
fn checkpoint_round_trips_through_the_hf_loader() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = micro_config(&corpus(tmp.path()), 1);
    let tm = TrainableModel::new(cfg.hf_config(320), &Device::Cpu).unwrap();
    tm.init(3).unwrap();
    // A non-trivial balancing bias must survive the trip.
    let bias = tm.biases[&1].clone();
    bias.set(
        &Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .affine(0.01, -0.03)
            .unwrap(),
    )
    .unwrap();
    let dir = tmp.path().join("ckpt");
    write_checkpoint(&dir, &tm.hf_config, &tm.checkpoint_tensors(), None, |_| {
        Ok(())
    })
    .unwrap();
    let names: Vec<String> = fathom_core::WeightStore::open(&dir)
        .unwrap()
        .summary()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for n in [
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.2.eh_proj.weight",
        "model.layers.2.enorm.weight",
        "model.layers.2.hnorm.weight",
        "model.layers.2.shared_head.norm.weight",
        "model.layers.2.shared_head.head.weight",
        "model.layers.2.embed_tokens.weight",
        "model.layers.2.mlp.experts.7.down_proj.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "checkpoint lacks {n}");
    }
    // Every tensor comes back bit for bit.
    let store = fathom_core::WeightStore::open(&dir).unwrap();
    for (name, t) in tm.checkpoint_tensors() {
        let back: Vec<f32> = store
            .load_f32(&name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let written: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(back, written, "{name}");
    }
    let loaded = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.mtp.len(), 1);
    // Same logits. Not bit for bit: the loaded model's weights track no gradients, so inference
    // takes the host kernels (few-row matmul, one-pass experts), which sum in another order than
    // the training path's candle ops.
    let close = |a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len());
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "max |Δlogit| {worst}");
    };
    let ids = Tensor::new(&[[5u32, 9, 33, 2, 100, 7, 64, 3]], &Device::Cpu).unwrap();
    let a: Vec<f32> = tm
        .model
        .forward(&ids, 0, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = loaded
        .forward(&ids, 0, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    close(&a, &b);
    let a: Vec<f32> = tm
        .model
        .mtp_logits(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = loaded
        .mtp_logits(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    close(&a, &b);
}

#[test]
fn bias_steps_are_plus_minus_gamma_and_never_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = micro_config(&corpus(tmp.path()), 1);
    let out = tmp.path().join("run");
    run(&cfg, &out, false, None).unwrap();
    let store = fathom_core::WeightStore::open(&out.join("final")).unwrap();
    for layer in [1, 2] {
        let b = store
            .load_f32(&format!(
                "model.layers.{layer}.mlp.gate.e_score_correction_bias"
            ))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // One step from zero: every entry is −γ, 0 or +γ, and both signs occur.
        assert!(
            b.iter()
                .all(|&x| [-0.01f32, 0.0, 0.01].iter().any(|v| (x - v).abs() < 1e-9)),
            "{b:?}"
        );
        assert!(
            b.iter().any(|&x| x > 0.0) && b.iter().any(|&x| x < 0.0),
            "{b:?}"
        );
    }
    // The bias is not an optimizer parameter.
    let tm = TrainableModel::new(cfg.hf_config(320), &Device::Cpu).unwrap();
    assert!(tm
        .params
        .iter()
        .all(|p| !p.name.contains("e_score_correction_bias")));
    assert_eq!(tm.biases.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
}

#[test]
fn bias_changes_selection_but_not_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = micro_config(&corpus(tmp.path()), 1);
    let tm = TrainableModel::new(cfg.hf_config(320), &Device::Cpu).unwrap();
    tm.init(1).unwrap();
    let fathom_model::decoder::FeedForward::Moe(moe) = &tm.model.layers[1].ffn else {
        panic!("layer 1 is MoE")
    };
    let x = Tensor::randn(0f32, 1.0, (6, 32), &Device::Cpu).unwrap();
    let before = moe.gate.route_tokens(&x).unwrap();
    // Push expert 5 far up: every token now selects it, but its weight still comes from the
    // unbiased score σ(u), normalised over the chosen experts.
    let mut b = vec![0f32; 8];
    b[5] = 10.0;
    tm.biases[&1]
        .set(&Tensor::new(b, &Device::Cpu).unwrap())
        .unwrap();
    let after = moe.gate.route_tokens(&x).unwrap();
    let s: Vec<Vec<f32>> = after.scores.to_vec2().unwrap();
    let w: Vec<Vec<f32>> = after.weights.to_vec2().unwrap();
    assert_eq!(
        before.scores.to_vec2::<f32>().unwrap(),
        s,
        "scores ignore the bias"
    );
    for (t, chosen) in after.experts.iter().enumerate() {
        assert!(chosen.contains(&5));
        let sum: f32 = chosen.iter().map(|&e| s[t][e as usize]).sum();
        for (slot, &e) in chosen.iter().enumerate() {
            assert!((w[t][slot] - s[t][e as usize] / sum).abs() < 1e-6);
        }
    }
}

#[test]
fn mtp_loss_shape_and_masking() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = micro_config(&corpus(tmp.path()), 1);
    let tm = TrainableModel::new(cfg.hf_config(320), &Device::Cpu).unwrap();
    tm.init(2).unwrap();
    let n = 10;
    let ids: Vec<u32> = (0..2 * (n + 1))
        .map(|i| (i * 37 % 300) as u32 + 3)
        .collect();
    let tokens = Tensor::from_vec(ids, (2, n + 1), &Device::Cpu).unwrap();
    let parts = pretrain_loss(&tm.model, &tokens, None, 0.3, 0.0).unwrap();
    // Module 1 sees n − 1 positions: h_i with Emb(t_{i+1}) predicts t_{i+2}.
    let mtp_logits = tm
        .model
        .mtp_logits(&tokens.narrow(1, 0, n).unwrap())
        .unwrap();
    assert_eq!(mtp_logits.dims3().unwrap(), (2, n - 1, 320));
    let manual =
        masked_cross_entropy(&mtp_logits, &tokens.narrow(1, 2, n - 1).unwrap(), None).unwrap();
    assert!((scalar(&manual).unwrap() - scalar(&parts.mtp[0]).unwrap()).abs() < 1e-6);
    let total = scalar(&parts.lm).unwrap() + 0.3 * scalar(&parts.mtp[0]).unwrap();
    assert!((scalar(&parts.total).unwrap() - total).abs() < 1e-5);

    // Masking target token j removes LM position j−1 and MTP position j−2 from the means.
    let mut mask = vec![1f32; 2 * (n + 1)];
    for j in [0, 1, 2, 7] {
        mask[j] = 0.0; // first sequence
    }
    mask[(n + 1) + 5] = 0.0; // second sequence, target 5
    let mask_t = Tensor::from_vec(mask.clone(), (2, n + 1), &Device::Cpu).unwrap();
    let masked = pretrain_loss(&tm.model, &tokens, Some(&mask_t), 0.3, 0.0).unwrap();
    let nll = |logits: &Tensor, targets: &Tensor| -> Vec<Vec<f32>> {
        let lp = fathom_model::ops::log_softmax_last(logits).unwrap();
        let t = targets.unsqueeze(2).unwrap();
        lp.gather(&t, 2)
            .unwrap()
            .squeeze(2)
            .unwrap()
            .neg()
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    let lm_logits = tm
        .model
        .forward(&tokens.narrow(1, 0, n).unwrap(), 0, None)
        .unwrap();
    let per_lm = nll(
        &lm_logits,
        &tokens.narrow(1, 1, n).unwrap().contiguous().unwrap(),
    );
    let per_mtp = nll(
        &mtp_logits,
        &tokens.narrow(1, 2, n - 1).unwrap().contiguous().unwrap(),
    );
    let mean_where = |per: &Vec<Vec<f32>>, first_target: usize| -> f64 {
        let (mut s, mut c) = (0.0, 0.0);
        for (b, row) in per.iter().enumerate() {
            for (i, v) in row.iter().enumerate() {
                if mask[b * (n + 1) + i + first_target] == 1.0 {
                    s += *v as f64;
                    c += 1.0;
                }
            }
        }
        s / c
    };
    assert!((scalar(&masked.lm).unwrap() - mean_where(&per_lm, 1)).abs() < 1e-5);
    assert!((scalar(&masked.mtp[0]).unwrap() - mean_where(&per_mtp, 2)).abs() < 1e-5);
    assert!((scalar(&masked.lm).unwrap() - scalar(&parts.lm).unwrap()).abs() > 1e-6);
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = micro_config(&corpus(tmp.path()), 8);
    cfg.train.lr = 1e30;
    cfg.train.min_lr = 1e30;
    cfg.train.warmup_steps = 0;
    cfg.train.save_every = 1;
    cfg.train.grad_clip = 0.0;
    let out = tmp.path().join("run");
    let err = run(&cfg, &out, false, None).unwrap_err();
    let TrainError::NonFinite {
        step, last_good, ..
    } = &err
    else {
        panic!("expected a non-finite stop, got {err}")
    };
    let msg = err.to_string();
    assert!(
        msg.contains("stopped") && msg.contains(&format!("step {step}")),
        "{msg}"
    );
    let good = last_good
        .as_ref()
        .expect("a checkpoint was written before the blow-up");
    assert!(good.join("model.safetensors").exists());
    assert!(!out.join("final").exists());
}
