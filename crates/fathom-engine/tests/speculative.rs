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

/// The tiny V3 fixture with a second MTP module (V3's `num_nextn_predict_layers = 2`): module 2
/// starts as module 1 with its input projection and MLP scaled, so the two differ.
fn two_module_model() -> CausalLm {
    let src = root().join("fixtures/deepseek_v3_tiny");
    let dir = std::env::temp_dir().join(format!("fathom-mtp2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    let layers = cfg["num_hidden_layers"].as_u64().unwrap() as usize;
    cfg["num_nextn_predict_layers"] = 2.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let first = format!("model.layers.{layers}.");
    let second = format!("model.layers.{}.", layers + 1);
    let copies: Vec<(String, Tensor)> = tensors
        .iter()
        .filter_map(|(name, t)| {
            let rest = name.strip_prefix(&first)?;
            let scale = if rest.starts_with("eh_proj") {
                -1.5
            } else if rest.starts_with("mlp.") && rest.ends_with("weight") {
                0.7
            } else {
                1.0
            };
            Some((format!("{second}{rest}"), t.affine(scale, 0.0).unwrap()))
        })
        .collect();
    assert!(copies.len() > 10, "module 1's tensors found");
    tensors.extend(copies);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let model = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(model.mtp.len(), 2);
    model
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0 as u32
}

/// Draft logits by the training path (no cache, whole sequence; `fathom_train::objective`'s
/// chain): `seq` = t_0..t_{p+1} verified, `drafts` d_1.. (fed as the later tokens). Module m at
/// every position i ≤ p reads h^m_i and t_{i+m+1}; drafts past the modules rerun the last one with
/// its own outputs appended as the states of positions p + 1, ….
fn reference_draft_logits(model: &CausalLm, seq: &[u32], drafts: &[u32]) -> Vec<Vec<f32>> {
    let p = seq.len() - 2;
    let all: Vec<u32> = seq.iter().chain(drafts).copied().collect();
    let ids = |a: usize, b: usize| Tensor::new(&all[a..b], &Device::Cpu).unwrap().unsqueeze(0);
    let row = |t: &Tensor, i: usize| t.narrow(1, i, 1).unwrap();
    let logits = |h: &Tensor| -> Vec<f32> {
        model
            .logits(h)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut input = model
        .forward_hidden(&ids(0, p + 1).unwrap(), 0, None)
        .unwrap()
        .hidden;
    let mut out = Vec::new();
    let chain = drafts.len().min(model.mtp.len());
    let mut last_in = input.clone();
    let mut h = input.clone();
    for m in 0..chain {
        let next = model.embed(&ids(m + 1, p + m + 2).unwrap()).unwrap();
        last_in = input.clone();
        h = model.mtp[m]
            .forward(&input, &next, &model.rope, 0, None)
            .unwrap();
        out.push(logits(&row(&h, p)));
        input = h.clone();
    }
    let r = chain - 1;
    let mut states = last_in;
    let mut prev_out = row(&h, p);
    for j in 1..=(drafts.len() - chain) {
        states = Tensor::cat(&[&states, &prev_out], 1).unwrap();
        let next = model.embed(&ids(r + 1, p + j + r + 2).unwrap()).unwrap();
        let h = model.mtp[r]
            .forward(&states, &next, &model.rope, 0, None)
            .unwrap();
        prev_out = row(&h, p + j);
        out.push(logits(&prev_out));
    }
    out
}

/// With two MTP modules the drafter chains them — module 2 reads module 1's state and the first
/// draft, its cache lagging one position — and reuses module 2 past them. Over steps that accept
/// 0–3 drafts and ask for 1–4 (module 2 sitting some steps out), every draft's logits equal the
/// training path's on the whole sequence.
#[test]
fn chained_modules_draft_as_the_training_path() {
    let model = two_module_model();
    let prompt = [3u32, 17, 5, 9, 11];
    let seq = run(&model, None, &prompt, SamplingParams::default(), 0, 30).token_ids;
    let full: Vec<u32> = prompt.iter().chain(&seq).copied().collect();
    let hidden = model
        .forward_hidden(
            &Tensor::new(full.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            0,
            None,
        )
        .unwrap()
        .hidden
        .squeeze(0)
        .unwrap();
    let mut drafter = fathom_engine::speculative::Drafter::new(&model).unwrap();
    // (rows verified this step, drafts asked for): the first step takes the prompt.
    let steps = [
        (5, 3),
        (1, 2),
        (3, 1),
        (2, 1),
        (1, 4),
        (4, 2),
        (2, 3),
        (1, 1),
        (3, 2),
    ];
    let mut offset = 0;
    for (n, k) in steps {
        let mut got: Vec<Vec<f32>> = Vec::new();
        let mut pick = |logits: &[f32], _: &[u32]| {
            got.push(logits.to_vec());
            Draft {
                token: argmax(logits),
                q: None,
            }
        };
        let rows = hidden.narrow(0, offset, n).unwrap();
        let drafts = drafter
            .draft(
                &model,
                &rows,
                &full[offset + 1..offset + n + 1],
                offset,
                k,
                &mut pick,
            )
            .unwrap();
        assert_eq!(drafts.len(), k);
        let tokens: Vec<u32> = drafts.iter().map(|d| d.token).collect();
        let want = reference_draft_logits(&model, &full[..offset + n + 1], &tokens);
        for (j, (g, w)) in got.iter().zip(&want).enumerate() {
            let diff = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-3,
                "step at {offset}+{n}, draft {}: logits differ by {diff}",
                j + 1
            );
        }
        offset += n;
    }
}

/// Greedy decoding with two chained modules emits exactly the plain greedy tokens, for 1–4 drafts
/// a step; truncating `mtp` to one module gives the recursive scheme, also lossless.
#[test]
fn two_module_speculation_is_lossless() {
    let mut model = two_module_model();
    for prompt in [&[3u32, 17, 5, 9][..], &[8], &[40, 2, 2, 7, 19, 33, 1, 6]] {
        let plain = run(&model, None, prompt, SamplingParams::default(), 0, 24);
        for k in 1..=4 {
            let spec = run(&model, None, prompt, SamplingParams::default(), k, 24);
            assert_eq!(spec.token_ids, plain.token_ids, "{prompt:?}, {k} drafts");
            let stats = spec.spec.expect("speculation ran");
            assert_eq!(stats.offered.len(), k);
        }
    }
    model.mtp.truncate(1);
    let plain = run(&model, None, &[3, 17, 5], SamplingParams::default(), 0, 24);
    let spec = run(&model, None, &[3, 17, 5], SamplingParams::default(), 3, 24);
    assert_eq!(spec.token_ids, plain.token_ids);
}
