//! Parity with HF transformers on the committed fixtures (made by tools/reference/make_fixtures.py):
//! logits within 1e-4 (f32 math; bf16 checkpoints are upcast by both sides) over prompt + 32 greedy
//! tokens, for the uncached and the cached path, and identical greedy tokens.

mod common;
use common::max_abs_diff;

use candle_core::{DType, Device, IndexOp, Tensor};
use fathom_model::CausalLm;
use std::collections::HashMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

struct Reference {
    tensors: HashMap<String, Tensor>,
}

impl Reference {
    fn load(name: &str) -> Self {
        let path = fixtures().join(name).join("reference.safetensors");
        Reference {
            tensors: candle_core::safetensors::load(&path, &Device::Cpu).unwrap(),
        }
    }
    fn ids(&self, key: &str) -> Vec<u32> {
        self.tensors[key]
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect()
    }
    fn n_prompts(&self) -> usize {
        self.tensors
            .keys()
            .filter(|k| k.starts_with("prompt_"))
            .count()
    }
}

fn argmax_last(logits: &Tensor) -> u32 {
    logits
        .argmax(candle_core::D::Minus1)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap()
}

/// Returns (max |Δ| uncached, max |Δ| cached).
fn check(model_dir: &str, reference: &str) -> (f32, f32) {
    let dev = Device::Cpu;
    let model = CausalLm::load(&fixtures().join(model_dir), DType::F32, &dev).unwrap();
    let r = Reference::load(reference);
    let (mut worst_uncached, mut worst_cached) = (0f32, 0f32);
    assert!(r.n_prompts() >= 4);
    for i in 0..r.n_prompts() {
        let prompt = r.ids(&format!("prompt_{i}"));
        let greedy = r.ids(&format!("greedy_{i}"));
        let want = &r.tensors[&format!("logits_{i}")];
        let full: Vec<u32> = prompt.iter().chain(greedy.iter()).copied().collect();

        // Uncached: the whole sequence in one pass.
        let ids = Tensor::new(full.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let got = model.forward(&ids, 0, None).unwrap().squeeze(0).unwrap();
        worst_uncached = worst_uncached.max(max_abs_diff(&got, want));

        // Cached: prefill the prompt, then generate greedily token by token from our own argmax.
        let mut cache = model.new_cache();
        let ids = Tensor::new(prompt.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let pre = model
            .forward(&ids, 0, Some(&mut cache))
            .unwrap()
            .squeeze(0)
            .unwrap();
        worst_cached = worst_cached.max(max_abs_diff(
            &pre,
            &want.narrow(0, 0, prompt.len()).unwrap(),
        ));
        let mut next = argmax_last(&pre.i(prompt.len() - 1).unwrap());
        let mut ours = vec![];
        for step in 0..greedy.len() {
            ours.push(next);
            let pos = prompt.len() + step;
            let x = Tensor::new(&[next], &dev).unwrap().unsqueeze(0).unwrap();
            let l = model
                .forward(&x, pos, Some(&mut cache))
                .unwrap()
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap();
            if step + 1 < greedy.len() {
                worst_cached = worst_cached.max(max_abs_diff(&l, &want.i(pos).unwrap()));
            }
            next = argmax_last(&l);
        }
        assert_eq!(
            ours, greedy,
            "{model_dir}: greedy tokens differ from transformers for prompt {i}"
        );
    }
    println!("{model_dir}: max |Δlogit| uncached {worst_uncached:.2e}, cached {worst_cached:.2e}");
    assert!(
        worst_uncached <= 1e-4,
        "{model_dir}: uncached max |Δlogit| {worst_uncached}"
    );
    assert!(
        worst_cached <= 1e-4,
        "{model_dir}: cached max |Δlogit| {worst_cached}"
    );
    (worst_uncached, worst_cached)
}

#[test]
fn deepseek_v3_f32() {
    check("deepseek_v3_tiny", "deepseek_v3_tiny");
}

#[test]
fn deepseek_v3_bf16() {
    check("deepseek_v3_tiny_bf16", "deepseek_v3_tiny_bf16");
}

#[test]
fn deepseek_v3_mtp_module() {
    let dev = Device::Cpu;
    let model = CausalLm::load(&fixtures().join("deepseek_v3_tiny"), DType::F32, &dev).unwrap();
    assert_eq!(model.mtp.len(), 1, "the MTP layer's tensors must be kept");
    let r = Reference::load("deepseek_v3_tiny");
    let mut worst = 0f32;
    for i in 0..r.n_prompts() {
        let full: Vec<u32> = r
            .ids(&format!("prompt_{i}"))
            .into_iter()
            .chain(r.ids(&format!("greedy_{i}")))
            .collect();
        let ids = Tensor::new(full.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let got = model.mtp_logits(&ids).unwrap().squeeze(0).unwrap();
        worst = worst.max(max_abs_diff(&got, &r.tensors[&format!("mtp_logits_{i}")]));
    }
    println!("deepseek_v3_tiny MTP module: max |Δlogit| {worst:.2e}");
    assert!(worst <= 1e-4, "MTP max |Δlogit| {worst}");
}

#[test]
fn deepseek_v3_fp8_blocks() {
    // The FP8 checkpoint (sharded, with index) must dequantise to its f32 twin exactly, and so
    // reproduce the twin's reference logits.
    let store = fathom_core::WeightStore::open(&fixtures().join("deepseek_v3_tiny_fp8")).unwrap();
    let twin =
        fathom_core::WeightStore::open(&fixtures().join("deepseek_v3_tiny_fp8_twin")).unwrap();
    let mut fp8 = 0;
    for name in twin.names() {
        let a = store.load_f32(name).unwrap();
        let b = twin.load_f32(name).unwrap();
        assert_eq!(a.dims(), b.dims(), "{name}");
        assert_eq!(
            max_abs_diff(&a, &b),
            0.0,
            "{name} does not dequantise exactly"
        );
        if store.raw(name).unwrap().dtype == safetensors::Dtype::F8_E4M3 {
            fp8 += 1;
        }
    }
    assert!(
        fp8 > 20,
        "expected the fixture to hold FP8 weights, found {fp8}"
    );
    // Partial edge blocks are exercised: intermediate 200 = 128 + 72.
    let (_, shape, _) = {
        let r = store.raw("model.layers.0.mlp.gate_proj.weight").unwrap();
        (r.dtype, r.shape.clone(), ())
    };
    assert_eq!(shape, vec![200, 128]);
    check("deepseek_v3_tiny_fp8", "deepseek_v3_tiny_fp8_twin");
}

#[test]
fn deepseek_v2_lite_f32() {
    check("deepseek_v2_lite_tiny", "deepseek_v2_lite_tiny");
}

#[test]
fn deepseek_v2_lite_bf16() {
    check("deepseek_v2_lite_tiny_bf16", "deepseek_v2_lite_tiny_bf16");
}

#[test]
fn deepseek_v2_group_limited() {
    check("deepseek_v2_tiny", "deepseek_v2_tiny");
}

#[test]
fn qwen2_untied() {
    check("qwen2_tiny", "qwen2_tiny");
}

#[test]
fn qwen2_tied() {
    check("qwen2_tiny_tied", "qwen2_tiny_tied");
}

#[test]
fn qwen2_bf16() {
    check("qwen2_tiny_bf16", "qwen2_tiny_bf16");
}

#[test]
fn llama_f32() {
    check("llama_tiny", "llama_tiny");
}

#[test]
fn llama_bf16() {
    check("llama_tiny_bf16", "llama_tiny_bf16");
}
