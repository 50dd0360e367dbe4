//! MLA's latent cache with absorbed decode against the plain (expanded k/v) cache: same logits over
//! 200+ decode steps, and the cache holds exactly (kv_lora_rank + qk_rope_head_dim) values per
//! token per layer.

mod common;
use common::{fixture, max_abs_diff};

use candle_core::{DType, Device, Tensor};
use fathom_model::CausalLm;

fn check(name: &str, steps: usize) {
    let model = CausalLm::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
    let mla = model.cfg.mla.clone().expect("an MLA fixture");
    let prompt: Vec<u32> = vec![0, 5, 17, 42, 99, 7, 3, 250, 31];
    let mut plain = model.new_plain_cache();
    let mut latent = model.new_cache();
    assert!(latent.layers[0].latent_mode && !plain.layers[0].latent_mode);
    let ids = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = model.forward(&ids, 0, Some(&mut plain)).unwrap();
    let b = model.forward(&ids, 0, Some(&mut latent)).unwrap();
    let mut worst = max_abs_diff(&a, &b);
    let mut next = a
        .squeeze(0)
        .unwrap()
        .get(prompt.len() - 1)
        .unwrap()
        .argmax(0)
        .unwrap();
    for step in 0..steps {
        let pos = prompt.len() + step;
        let tok = Tensor::new(&[next.to_scalar::<u32>().unwrap()], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let a = model.forward(&tok, pos, Some(&mut plain)).unwrap();
        let b = model.forward(&tok, pos, Some(&mut latent)).unwrap();
        worst = worst.max(max_abs_diff(&a, &b));
        // Follow the plain path's greedy choice so both see the same tokens.
        next = a.flatten_all().unwrap().argmax(0).unwrap();
    }
    let n = prompt.len() + steps;
    assert_eq!(latent.seq_len(), n);
    assert!(
        worst <= 1e-4,
        "{name}: latent vs plain max |Δlogit| {worst}"
    );
    // Exactly (kv_lora_rank + qk_rope_head_dim) f32 values per token per layer.
    let per_token = (mla.kv_lora_rank + mla.qk_rope_head_dim) * model.cfg.num_hidden_layers * 4;
    assert_eq!(latent.bytes(), n * per_token);
    let plain_per_token = model.cfg.num_attention_heads
        * (mla.qk_head_dim() + mla.v_head_dim)
        * model.cfg.num_hidden_layers
        * 4;
    assert_eq!(plain.bytes(), n * plain_per_token);
    eprintln!(
        "{name}: {steps} decode steps, max |Δlogit| {worst:.2e}; KV bytes/token {per_token} latent vs {plain_per_token} plain"
    );
}

#[test]
fn latent_cache_matches_plain_cache_v3() {
    check("deepseek_v3_tiny", 220);
}

#[test]
fn latent_cache_matches_plain_cache_v2_lite() {
    check("deepseek_v2_lite_tiny", 220);
}

#[test]
fn latent_cache_matches_plain_cache_v2_group_limited() {
    check("deepseek_v2_tiny", 220);
}

#[test]
fn truncate_rolls_back_exactly() {
    let model = CausalLm::load(&fixture("deepseek_v3_tiny"), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[0u32, 5, 17, 42, 99, 7]], &Device::Cpu).unwrap();
    let extra = Tensor::new(&[[3u32, 250, 31]], &Device::Cpu).unwrap();
    let probe = Tensor::new(&[[77u32]], &Device::Cpu).unwrap();
    for mut cache in [model.new_cache(), model.new_plain_cache()] {
        model.forward(&ids, 0, Some(&mut cache)).unwrap();
        let want = model.forward(&probe, 6, Some(&mut cache.clone())).unwrap();
        model.forward(&extra, 6, Some(&mut cache)).unwrap();
        cache.truncate(6).unwrap();
        assert_eq!(cache.seq_len(), 6);
        let got = model.forward(&probe, 6, Some(&mut cache)).unwrap();
        assert_eq!(max_abs_diff(&want, &got), 0.0);
    }
}
