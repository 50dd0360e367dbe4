//! The runtime's planned decode step against the plain candle path, on every architecture and
//! every block format: after the same prefill, both decode the same tokens (the plain path's
//! greedy choices) on their own caches, and their logits must agree — f32 models within 1e-4 of
//! the largest logit; block-quantised ones run the same int8 kernels on the same activation
//! rounding, but an f32 rounding difference upstream (attention sums in another order) can move
//! one int8 activation by one step, so they are held to a quarter of the format's own
//! quantisation error on the fixture (llama.cpp's quantised vs f32 logits), greedy identical. A planned step and a plain one also take turns on
//! one cache (they share it), and bad steps are errors.

mod common;
use common::fixture;

use candle_core::{DType, Device, Tensor};
use fathom_model::{CausalLm, KvCache};

fn plain_step(model: &CausalLm, cache: &mut KvCache, token: u32, pos: usize) -> Vec<f32> {
    let ids = Tensor::new(&[[token]], &Device::Cpu).unwrap();
    model
        .forward(&ids, pos, Some(cache))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
        .0 as u32
}

fn prefill(model: &CausalLm, prompt: &[u32]) -> (KvCache, u32) {
    let mut cache = model.new_cache();
    let ids = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&ids, 0, Some(&mut cache)).unwrap();
    let last: Vec<f32> = logits
        .squeeze(0)
        .unwrap()
        .get(prompt.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap();
    (cache, argmax(&last))
}

/// Decode `steps` tokens both ways; returns (worst |Δlogit| / max |logit|, greedy agreements).
fn compare(model: &CausalLm, prompt: &[u32], steps: usize) -> (f32, usize) {
    let (mut plain, first) = prefill(model, prompt);
    let (mut planned, _) = prefill(model, prompt);
    let (mut worst, mut same) = (0f32, 0);
    let mut token = first;
    for i in 0..steps {
        let pos = prompt.len() + i;
        let want = plain_step(model, &mut plain, token, pos);
        let got = model
            .decode_planned(token, pos, &mut planned)
            .unwrap()
            .expect("the plan applies to this model and cache");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(diff / scale);
        same += usize::from(argmax(&got) == argmax(&want));
        token = argmax(&want);
    }
    (worst, same)
}

/// max |quantised − f32| / max |f32| of llama.cpp's logits on the fixture (its JSON).
fn own_error(name: &str) -> f32 {
    let path = fixture(&format!("gguf_formats/{name}.json"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let nums = |k: &str| -> Vec<f32> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let (q, f) = (nums("logits"), nums("f32_logits"));
    let scale = f.iter().fold(0f32, |m, x| m.max(x.abs()));
    q.iter()
        .zip(&f)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

const PROMPT: [u32; 5] = [1, 17, 42, 99, 7];

#[test]
fn f32_plan_matches_the_plain_path_on_every_architecture() {
    for name in [
        "deepseek_v3_tiny",
        "deepseek_v2_lite_tiny",
        "deepseek_v2_tiny",
        "qwen2_tiny",
        "qwen2_tiny_tied",
        "llama_tiny",
    ] {
        let model = CausalLm::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        assert!(model.decode_plan().is_some(), "{name}: no plan");
        let (worst, same) = compare(&model, &PROMPT, 12);
        eprintln!("{name}: worst |Δ|/max {worst:.2e}, greedy {same}/12");
        assert!(
            worst < 1e-4,
            "{name}: planned logits off by {worst:e} of the largest"
        );
        assert_eq!(same, 12, "{name}: greedy tokens differ");
    }
}

/// Past one chunk of MLA's split attention (128 positions) and past YaRN's original context
/// (this fixture's is 128): several chunks merged, on the latent cache.
#[test]
fn long_context_plan_matches_the_plain_path() {
    for name in ["deepseek_v3_tiny", "qwen2_tiny"] {
        let model = CausalLm::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let v = model.cfg.vocab_size as u32;
        let prompt: Vec<u32> = (0..300u32).map(|i| (i * 37 + 11) % v).collect();
        let (worst, same) = compare(&model, &prompt, 4);
        eprintln!("{name} at 300: worst |Δ|/max {worst:.2e}, greedy {same}/4");
        assert!(
            worst < 1e-4,
            "{name}: planned logits off by {worst:e} of the largest"
        );
        assert_eq!(same, 4, "{name}: greedy tokens differ");
    }
}

#[test]
fn quantised_plan_matches_the_plain_path_in_every_gguf_format() {
    for name in [
        "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k",
        "iq4_nl", "iq4_xs",
    ] {
        let path = fixture(&format!("gguf_formats/{name}.gguf"));
        let model = CausalLm::load_gguf(&path, DType::F32, &Device::Cpu, None).unwrap();
        let own = own_error(name);
        let (worst, same) = compare(&model, &PROMPT, 8);
        eprintln!(
            "{name}: worst |Δ|/max {worst:.2e} (format's own error {own:.2e}), greedy {same}/8"
        );
        assert!(
            worst < 0.25 * own,
            "{name}: planned logits off by {worst:e} of the largest (own error {own:e})"
        );
        assert_eq!(same, 8, "{name}: greedy tokens differ");
    }
}

#[test]
fn planned_and_plain_steps_share_one_cache() {
    for name in ["deepseek_v3_tiny", "qwen2_tiny"] {
        let model = CausalLm::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let (mut reference, mut token) = prefill(&model, &PROMPT);
        let (mut mixed, _) = prefill(&model, &PROMPT);
        for i in 0..6 {
            let pos = PROMPT.len() + i;
            let want = plain_step(&model, &mut reference, token, pos);
            let got = if i % 2 == 0 {
                model
                    .decode_planned(token, pos, &mut mixed)
                    .unwrap()
                    .unwrap()
            } else {
                plain_step(&model, &mut mixed, token, pos)
            };
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4 * scale, "{name} step {i}: {a} vs {b}");
            }
            token = argmax(&want);
        }
        assert_eq!(mixed.seq_len(), reference.seq_len());
    }
}

#[test]
fn bad_steps_are_errors_and_unplannable_caches_decline() {
    let model = CausalLm::load(&fixture("deepseek_v3_tiny"), DType::F32, &Device::Cpu).unwrap();
    let (mut cache, _) = prefill(&model, &PROMPT);
    let vocab = model.cfg.vocab_size as u32;
    let err = model
        .decode_planned(vocab, PROMPT.len(), &mut cache)
        .unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
    // A position that is not the cache's length.
    let err = model
        .decode_planned(3, PROMPT.len() + 2, &mut cache)
        .unwrap_err();
    assert!(err.to_string().contains("caches 5 positions"), "{err}");
    // Nothing was appended by the failed steps.
    assert_eq!(cache.seq_len(), PROMPT.len());
    // MLA's plain (expanded) cache is not the plan's: it declines.
    let mut plain = model.new_plain_cache();
    assert!(model.decode_planned(3, 0, &mut plain).unwrap().is_none());
}
