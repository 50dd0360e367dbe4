//! f64 central-difference checks of autograd for every op and block used in training: the
//! composed softmax / log-softmax / sigmoid / SiLU / RMSNorm, both rope layouts, GQA attention,
//! MLA (with and without q-LoRA), the MoE gate + experts (index_add combine), the dense MLP, the
//! decoder block, the MTP module, and the whole model's cross-entropy.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use fathom_core::ModelConfig;
use fathom_model::{ops, CausalLm};
use serde_json::json;
use std::path::Path;

const EPS: f64 = 1e-6;

fn tiny_cfg(model_type: &str, q_lora: Option<usize>) -> ModelConfig {
    let v = match model_type {
        "deepseek_v3" => json!({"model_type": "deepseek_v3", "vocab_size": 24, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2, "q_lora_rank": q_lora,
            "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4, "v_head_dim": 6,
            "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
            "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true,
            "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "moe_intermediate_size": 8,
            "num_nextn_predict_layers": 1, "max_position_embeddings": 64,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                "mscale": 0.9, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}}),
        "deepseek_v2" => json!({"model_type": "deepseek_v2", "vocab_size": 24, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2, "q_lora_rank": null,
            "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4, "v_head_dim": 6,
            "n_routed_experts": 4, "n_shared_experts": 2, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
            "topk_method": "group_limited_greedy", "scoring_func": "softmax", "first_k_dense_replace": 1,
            "moe_intermediate_size": 8, "max_position_embeddings": 64}),
        _ => {
            json!({"model_type": "qwen2", "vocab_size": 24, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "tie_word_embeddings": true})
        }
    };
    ModelConfig::from_value(v, Path::new("test-config.json")).unwrap()
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic pseudo-random values in [-1, 1) (xorshift), f64.
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Compare autograd with central differences on a few entries of every variable.
fn check_gradients(vars: &[Var], loss_fn: &dyn Fn() -> Result<Tensor>, what: &str) {
    let loss = loss_fn().unwrap();
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for (vi, var) in vars.iter().enumerate() {
        let g = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            None => vec![0.0; var.elem_count()],
        };
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let n = base.len();
        for j in 0..n.min(5) {
            let idx = (j * 7919 + vi * 31) % n;
            let eval = |delta: f64| {
                let mut p = base.clone();
                p[idx] += delta;
                var.set(&Tensor::from_vec(p, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss_fn().unwrap().to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(EPS) - eval(-EPS)) / (2.0 * EPS);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let err = (numeric - g[idx]).abs();
            assert!(
                err <= 1e-6 + 1e-5 * numeric.abs(),
                "{what}: var {vi} {:?} entry {idx}: autograd {} vs numeric {numeric}",
                var.shape(),
                g[idx]
            );
            checked += 1;
        }
    }
    // Guard against vacuous checks: something must have a non-zero gradient.
    assert!(checked > 0);
}

fn projected_loss(out: &Tensor, seed: u64) -> Result<Tensor> {
    let r = random(out.dims(), seed);
    (out * r)?.sum_all()
}

fn nonzero(vars: &[Var], loss_fn: &dyn Fn() -> Result<Tensor>) -> usize {
    let grads = loss_fn().unwrap().backward().unwrap();
    vars.iter()
        .filter(|v| {
            grads.get(v.as_tensor()).is_some_and(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    > 0.0
            })
        })
        .count()
}

#[test]
fn elementwise_ops() {
    let x = Var::from_tensor(&random(&[3, 5], 1)).unwrap();
    let xs = [x.clone()];
    for (name, f) in [
        (
            "softmax",
            ops::softmax_last as fn(&Tensor) -> Result<Tensor>,
        ),
        ("log_softmax", ops::log_softmax_last),
        ("sigmoid", ops::sigmoid),
        ("silu", ops::silu),
    ] {
        let lf = || projected_loss(&f(x.as_tensor())?, 2);
        check_gradients(&xs, &lf, name);
    }
    let t = Tensor::new(&[1u32, 4, 0], &Device::Cpu).unwrap();
    let lf = || ops::cross_entropy(x.as_tensor(), &t);
    check_gradients(&xs, &lf, "cross_entropy");
}

#[test]
fn rms_norm_and_rope() {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F64, &Device::Cpu);
    let norm = fathom_model::norm::RmsNorm::load(vb.pp("n"), 5, 1e-6).unwrap();
    map.data()
        .lock()
        .unwrap()
        .get("n.weight")
        .unwrap()
        .set(&random(&[5], 9))
        .unwrap();
    let x = Var::from_tensor(&random(&[2, 3, 5], 3)).unwrap();
    let mut vars = map.all_vars();
    vars.push(x.clone());
    let lf = || projected_loss(&norm.forward(x.as_tensor())?, 4);
    check_gradients(&vars, &lf, "rms_norm");
    assert_eq!(nonzero(&vars, &lf), 2);

    for c in [tiny_cfg("deepseek_v3", None), tiny_cfg("qwen2", None)] {
        let rope = fathom_model::rope::Rope::new(&c, DType::F64, &Device::Cpu).unwrap();
        let x = Var::from_tensor(&random(&[1, 2, 3, rope.dim], 5)).unwrap();
        let lf = || projected_loss(&rope.apply(x.as_tensor(), 2)?, 6);
        check_gradients(&[x.clone()], &lf, "rope");
    }
}

/// Build a whole model in f64 on fresh variables, with noise on the correction bias and norms.
fn fresh_model(cfg: &ModelConfig) -> (CausalLm, VarMap) {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F64, &Device::Cpu);
    let model = CausalLm::new(cfg, vb, cfg.num_nextn_predict_layers > 0).unwrap();
    for (i, (name, var)) in map.data().lock().unwrap().iter().enumerate() {
        if name.contains("norm") || name.contains("e_score_correction_bias") {
            let base = if name.contains("norm") { 1.0 } else { 0.0 };
            var.set(
                &random(var.dims(), 100 + i as u64)
                    .affine(0.2, base)
                    .unwrap(),
            )
            .unwrap();
        }
    }
    (model, map)
}

#[test]
fn decoder_blocks_mla_moe_and_gqa() {
    for (name, cfg) in [
        ("v3 (q-LoRA, noaux_tc)", tiny_cfg("deepseek_v3", Some(8))),
        (
            "v2 (q_proj, group-limited softmax)",
            tiny_cfg("deepseek_v2", None),
        ),
        ("qwen2 (GQA, qkv bias)", tiny_cfg("qwen2", None)),
    ] {
        let (model, map) = fresh_model(&cfg);
        for (li, layer) in model.layers.iter().enumerate() {
            let x = Var::from_tensor(&random(&[1, 4, cfg.hidden_size], 7 + li as u64)).unwrap();
            let prefix = format!("model.layers.{li}.");
            let data = map.data().lock().unwrap();
            let mut vars: Vec<Var> = data
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(_, v)| v.clone())
                .collect();
            drop(data);
            vars.push(x.clone());
            let lf = || projected_loss(&layer.forward(x.as_tensor(), &model.rope, 0, None)?.0, 8);
            check_gradients(&vars, &lf, &format!("{name} layer {li}"));
            // Every tensor of the block gets a gradient except the selection-only bias and experts
            // no token was routed to.
            let live = nonzero(&vars, &lf);
            assert!(
                live * 2 > vars.len(),
                "{name} layer {li}: only {live}/{} vars have gradients",
                vars.len()
            );
        }
    }
}

#[test]
fn whole_model_cross_entropy_and_mtp() {
    for cfg in [tiny_cfg("deepseek_v3", Some(8)), tiny_cfg("qwen2", None)] {
        let (model, map) = fresh_model(&cfg);
        let ids = Tensor::new(&[[3u32, 7, 1, 9, 4]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[7u32, 1, 9, 4, 2], &Device::Cpu).unwrap();
        let vars = map.all_vars();
        let lf = || {
            let logits = model.forward(&ids, 0, None)?.squeeze(0)?;
            let mut loss = ops::cross_entropy(&logits, &targets)?;
            if !model.mtp.is_empty() {
                // MTP depth 1: position i predicts t_{i+2}.
                let ml = model.mtp_logits(&ids)?.squeeze(0)?; // [4, V]
                let mt = targets.narrow(0, 1, 4)?;
                loss = (loss + (ops::cross_entropy(&ml, &mt)? * 0.3)?)?;
            }
            Ok(loss)
        };
        check_gradients(&vars, &lf, &format!("{:?} model", cfg.arch));
        let bias_vars = map
            .data()
            .lock()
            .unwrap()
            .keys()
            .filter(|k| k.contains("e_score_correction_bias"))
            .count();
        let live = nonzero(&vars, &lf);
        assert!(
            live + bias_vars + 2 * cfg.moe.as_ref().map_or(0, |m| m.n_routed_experts) * 3
                >= vars.len()
        );
        assert!(live > vars.len() / 2);
    }
}
