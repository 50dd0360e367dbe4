//! Every block format from a file llama.cpp wrote: a DeepSeek-V3 model (MLA + DeepSeekMoE,
//! 256-wide rows) quantised by `llama-quantize` to each format (fixtures/gguf_formats, made by
//! `tools/gguf/make_format_fixtures.py`), loaded by Fathom, against llama.cpp's own logits and
//! greedy tokens on the same file (f32 KV cache on both sides).

mod common;
use common::fixture;

use candle_core::{DType, Device, Tensor};
use fathom_model::decoder::FeedForward;
use fathom_model::linear::Weight;
use fathom_model::CausalLm;

struct Reference {
    logits: Vec<f32>,
    f32_logits: Vec<f32>,
    greedy: Vec<u32>,
    prompt: Vec<u32>,
}

fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(&format!("gguf_formats/{name}.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let nums = |k: &str| -> Vec<f64> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    Reference {
        logits: nums("logits").into_iter().map(|x| x as f32).collect(),
        f32_logits: nums("f32_logits").into_iter().map(|x| x as f32).collect(),
        greedy: nums("greedy").into_iter().map(|x| x as u32).collect(),
        prompt: nums("prompt").into_iter().map(|x| x as u32).collect(),
    }
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
        .0 as u32
}

/// Last prompt position's logits and `steps` greedy tokens through the latent cache.
fn run(model: &CausalLm, prompt: &[u32], steps: usize) -> (Vec<f32>, Vec<u32>) {
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
    let mut tokens = vec![argmax(&last)];
    while tokens.len() < steps {
        let pos = prompt.len() + tokens.len() - 1;
        let ids = Tensor::new(&[[*tokens.last().unwrap()]], &Device::Cpu).unwrap();
        let l: Vec<f32> = model
            .forward(&ids, pos, Some(&mut cache))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        tokens.push(argmax(&l));
    }
    (last, tokens)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn every_format_matches_llama_cpp_on_its_own_file() {
    // The tolerance is the format's own: Fathom's logits must lie closer to llama.cpp's on the
    // quantised file than llama.cpp's own quantised logits lie to its f32 ones (`bound` × that
    // distance). Both engines quantise activations by llama.cpp's rules, but llama.cpp also runs
    // MLA's absorbed k_b / v_b products on int8 activations where Fathom keeps them f32, and this
    // random-weight model amplifies every rounding (see the test's report), so greedy runs part
    // once a near-tie flips: `agree_min` leading greedy tokens must be identical (measured: q8_0
    // 21/32; the others 0–32, reported, not required). Logits are also held to 3 % of their
    // largest magnitude (measured: 1.5–2.9 %).
    let cases = [
        ("q8_0", 16),
        ("q4_0", 0),
        ("q4_1", 0),
        ("q5_0", 0),
        ("q5_1", 0),
        ("q2_k", 0),
        ("q3_k_m", 0),
        ("q4_k_m", 0),
        ("q5_k_m", 0),
        ("q6_k", 0),
        ("iq4_nl", 0),
        ("iq4_xs", 0),
    ];
    let bound = 1.0;
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (name, agree_min) in cases {
        let path = fixture(&format!("gguf_formats/{name}.gguf"));
        let model = CausalLm::load(&path, DType::F32, &Device::Cpu).unwrap();
        let FeedForward::Moe(moe) = &model.layers[0].ffn else {
            panic!("layer 0 is MoE")
        };
        let Weight::Quantized(q) = &moe.experts[1].down_proj.weight else {
            panic!("{name}: expert expanded to floats")
        };
        let r = reference(name);
        let (logits, greedy) = run(&model, &r.prompt, r.greedy.len());
        let engines = max_diff(&logits, &r.logits);
        let format_error = max_diff(&r.logits, &r.f32_logits);
        let agree = greedy
            .iter()
            .zip(&r.greedy)
            .take_while(|(a, b)| a == b)
            .count();
        report.push(format!(
            "{name} (experts as {}): max |Δlogit| Fathom vs llama.cpp {engines:.4}, llama.cpp {name} vs f32 {format_error:.4} (ratio {:.2}); greedy identical for {agree}/{} tokens",
            q.format(),
            engines / format_error,
            r.greedy.len()
        ));
        let scale = r.logits.iter().fold(0f32, |m, v| m.max(v.abs()));
        if engines > bound * format_error || engines > 0.03 * scale || agree < agree_min {
            failures.push(name);
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "outside the tolerance: {failures:?}");
}
