//! MTP speculative decoding is lossless: greedy output identical to plain decoding, sampled tokens
//! distributed as the target's, the cache rolled back exactly, and models without MTP fall back.

use candle_core::{DType, Device, Tensor};
use fathom_core::TextTokenizer;
use fathom_engine::speculative::{verify, Draft};
use fathom_engine::{generate, GenerateOptions, Sampler, SamplingParams};
use fathom_model::{CausalLm, Segment};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(
    model: &CausalLm,
    tok: Option<&TextTokenizer>,
    prompt: &[u32],
    params: SamplingParams,
    draft_tokens: usize,
    n: usize,
) -> fathom_engine::Generation {
    let opts = GenerateOptions {
        params,
        max_tokens: n,
        stop: &[],
        ignore_eos: true,
        eos_ids: &[],
        draft_tokens,
    };
    generate(model, tok, prompt, &opts, &mut |_| {}).unwrap()
}

/// The embedded default model (trained, with an MTP module): greedy decoding with 1–3 drafts per
/// step emits exactly the plain greedy tokens, for many prompts, and the drafts are mostly right.
#[test]
fn greedy_output_is_identical_with_and_without_speculation() {
    let dir = root().join("models/default");
    let model = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    assert_eq!(model.mtp.len(), 1);
    let prompts = [
        "ROMEO: But soft, what light",
        "What is 12 + 35?",
        "KING HENRY:\nOnce more unto the breach",
        "7 * 8 = ",
        "First Citizen:\nBefore we proceed any further, hear me speak.",
        "The quality of mercy",
    ];
    let mut accepted = 0u64;
    let mut offered = 0u64;
    for text in prompts {
        let ids = tok.encode(text, true).unwrap();
        let plain = run(&model, Some(&tok), &ids, SamplingParams::default(), 0, 40);
        assert!(plain.spec.is_none());
        for k in 1..=3 {
            let spec = run(&model, Some(&tok), &ids, SamplingParams::default(), k, 40);
            assert_eq!(spec.token_ids, plain.token_ids, "{text:?} with {k} drafts");
            let stats = spec.spec.expect("the model has MTP: speculation ran");
            assert!(stats.tokens_per_step() > 1.0);
            offered += stats.offered[0];
            accepted += stats.accepted[0];
        }
    }
    let rate = accepted as f64 / offered as f64;
    assert!(rate > 0.5, "first-draft acceptance {rate}");
}

/// Rejection sampling: whatever the draft distribution q, the first emitted token (an accepted
/// draft or the residual draw) follows the target's p, and after an accepted draft the next one
/// follows the target's next row. Vocabulary of 4, 40k trials, checked per category.
#[test]
fn sampled_tokens_follow_the_target_distribution() {
    let target0 = [2.0f32, 1.0, 0.0, -1.0]; // p0 ≈ [.64, .24, .09, .03]
    let target1 = [0.0f32, 0.5, 1.5, 0.2];
    let draft = [0.0f32, 2.0, 0.5, 0.5]; // q disagrees with p0 on purpose
    let params = SamplingParams {
        temperature: 1.0,
        seed: 11,
        ..Default::default()
    };
    let p0 = Sampler::new(params.clone()).distribution(&target0, &[], 0);
    let p1 = Sampler::new(params.clone()).distribution(&target1, &[], 0);
    let mut sampler = Sampler::new(params.clone());
    let trials = 40_000;
    let mut first = [0usize; 4];
    let mut second = [0usize; 4];
    let mut accepted = 0;
    for _ in 0..trials {
        let q = sampler.distribution(&draft, &[], 0);
        let d = sampler.draw(&q);
        let drafts = [Draft {
            token: d,
            q: Some(q),
        }];
        let v = verify(
            &mut sampler,
            &[target0.to_vec(), target1.to_vec()],
            &drafts,
            &[],
            0,
        );
        if v.accepted == 1 {
            first[d as usize] += 1;
            second[v.next as usize] += 1;
            accepted += 1;
        } else {
            first[v.next as usize] += 1;
        }
    }
    for i in 0..4 {
        let f = first[i] as f64 / trials as f64;
        // 5 standard deviations of a binomial frequency.
        let tol = 5.0 * (p0[i] * (1.0 - p0[i]) / trials as f64).sqrt();
        assert!((f - p0[i]).abs() < tol, "first token {i}: {f} vs {}", p0[i]);
        let g = second[i] as f64 / accepted as f64;
        let tol = 5.0 * (p1[i] * (1.0 - p1[i]) / accepted as f64).sqrt();
        assert!(
            (g - p1[i]).abs() < tol,
            "second token {i}: {g} vs {}",
            p1[i]
        );
    }
    // Σ min(p, q) is the expected acceptance.
    let q = Sampler::new(params).distribution(&draft, &[], 0);
    let expect: f64 = p0.iter().zip(&q).map(|(a, b)| a.min(*b)).sum();
    let got = accepted as f64 / trials as f64;
    assert!((got - expect).abs() < 0.01, "acceptance {got} vs {expect}");
}

/// Verifying wrong drafts and rolling the cache back leaves it as if they never ran: the next
/// step's logits equal plain one-token-at-a-time decoding bit for bit.
#[test]
fn rolled_back_cache_continues_exactly() {
    let model = CausalLm::load(
        &root().join("fixtures/deepseek_v3_tiny"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let prompt = [3u32, 17, 5, 9, 11, 40, 2];
    let tokens = [7u32, 23, 8];
    let step = |cache: &mut fathom_model::KvCache, ids: &[u32], offset: usize| -> Tensor {
        let seg = [Segment {
            start: 0,
            len: ids.len(),
            offset,
        }];
        let h = model
            .forward_packed_hidden(ids, &seg, &mut [cache])
            .unwrap();
        model.logits(&h).unwrap()
    };
    let mut plain = model.new_cache();
    step(&mut plain, &prompt, 0);
    let mut last_plain = None;
    for (i, &t) in tokens.iter().enumerate() {
        last_plain = Some(step(&mut plain, &[t], prompt.len() + i));
    }
    let mut spec = model.new_cache();
    step(&mut spec, &prompt, 0);
    // Verify [t0, wrong, wrong, wrong]: keep t0 only.
    step(&mut spec, &[tokens[0], 99, 98, 97], prompt.len());
    spec.truncate(prompt.len() + 1).unwrap();
    assert_eq!(spec.seq_len(), prompt.len() + 1);
    // Verify [t1, t2 (right), wrong]: keep two.
    let rows = step(&mut spec, &[tokens[1], tokens[2], 55], prompt.len() + 1);
    spec.truncate(prompt.len() + 3).unwrap();
    let want: Vec<f32> = last_plain
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let got: Vec<f32> = rows.get(1).unwrap().to_vec1().unwrap();
    assert_eq!(got, want, "the row after t2 equals plain decoding");
    // And the cache continues the same way.
    let a: Vec<f32> = step(&mut plain, &[4], prompt.len() + 3)
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = step(&mut spec, &[4], prompt.len() + 3)
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a, b);
}

/// Models without MTP modules decode plainly when speculation is asked for.
#[test]
fn models_without_mtp_fall_back_silently() {
    let model = CausalLm::load(
        &root().join("fixtures/qwen2_tiny"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(model.mtp.is_empty());
    let prompt = [3u32, 17, 5, 9];
    let plain = run(&model, None, &prompt, SamplingParams::default(), 0, 12);
    let asked = run(&model, None, &prompt, SamplingParams::default(), 3, 12);
    assert!(asked.spec.is_none());
    assert_eq!(asked.token_ids, plain.token_ids);
}
