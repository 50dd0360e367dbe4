//! Continuous batching against the one-sequence decode loop: concurrent requests (queued beyond
//! `max_seqs`, prompts prefilled in small chunks while others decode) produce exactly the greedy
//! tokens `generate` produces alone; prefix-cache hits change nothing but the work done;
//! cancellation, the queue bound and the memory bound behave.

use candle_core::{DType, Device};
use fathom_core::TextTokenizer;
use fathom_engine::{
    generate, generate_batch, Engine, Event, FinishReason, GenerateOptions, Request,
    SamplingParams, SchedulerConfig, SubmitError,
};
use fathom_model::CausalLm;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

fn load(name: &str) -> (Arc<CausalLm>, Arc<TextTokenizer>) {
    let dir = fixture(name);
    (
        Arc::new(CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap()),
        Arc::new(TextTokenizer::from_dir(&dir).unwrap()),
    )
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
        prompt,
        params: SamplingParams::default(),
        max_tokens,
        stop: vec![],
        eos_ids: vec![],
        ignore_eos: true,
        logprobs: None,
    }
}

struct Outcome {
    ids: Vec<u32>,
    text: String,
    cached: usize,
    reason: FinishReason,
}

fn collect(mut rx: UnboundedReceiver<Event>) -> Outcome {
    let mut out = Outcome {
        ids: vec![],
        text: String::new(),
        cached: 0,
        reason: FinishReason::Length,
    };
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Started { cached_tokens } => out.cached = cached_tokens,
            Event::Token { id, text, .. } => {
                out.ids.push(id);
                out.text.push_str(&text);
            }
            Event::Finished { reason, text, .. } => {
                out.text.push_str(&text);
                out.reason = reason;
                return out;
            }
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
    panic!("the engine dropped the request")
}

fn alone(model: &CausalLm, tok: &TextTokenizer, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let opts = GenerateOptions {
        params: SamplingParams::default(),
        max_tokens,
        stop: &[],
        ignore_eos: true,
        eos_ids: &[],
        draft_tokens: 0,
    };
    generate(model, Some(tok), prompt, &opts, &mut |_| {})
        .unwrap()
        .token_ids
}

fn prompts(v: u32) -> Vec<Vec<u32>> {
    (0..6u32)
        .map(|j| {
            (0..(5 + 7 * j))
                .map(|i| (i * 13 + j * 101 + 7) % v)
                .collect()
        })
        .collect()
}

fn batched_equals_alone(name: &str) {
    batched_equals_alone_with(name, 0, 4);
}

fn batched_equals_alone_with(name: &str, draft_tokens: usize, spec_max_batch: usize) {
    let (model, tok) = load(name);
    let engine = Engine::start(
        model.clone(),
        Some(tok.clone()),
        SchedulerConfig {
            max_seqs: 4,
            prefill_chunk: 5,
            draft_tokens,
            spec_max_batch,
            // Prefix hits turn speculation off for a sequence; keep every sequence speculating.
            prefix_cache: draft_tokens == 0,
            ..Default::default()
        },
    )
    .unwrap();
    let ps = prompts(model.cfg.vocab_size as u32);
    let rxs: Vec<_> = ps
        .iter()
        .enumerate()
        .map(|(j, p)| engine.submit(request(p.clone(), 6 + 3 * j)).unwrap())
        .collect();
    for (j, rx) in rxs.into_iter().enumerate() {
        let got = collect(rx);
        assert_eq!(got.reason, FinishReason::Length);
        let want = alone(&model, &tok, &ps[j], 6 + 3 * j);
        assert_eq!(got.ids, want, "{name}: request {j}");
        assert_eq!(got.text, tok.decode(&want, false).unwrap());
    }
    assert!(engine.metrics.steps.load(Ordering::Relaxed) > 0);
    if draft_tokens > 0 {
        let offered = engine.metrics.draft_tokens.load(Ordering::Relaxed);
        let accepted = engine.metrics.accepted_draft_tokens.load(Ordering::Relaxed);
        assert!(
            offered > 0 && accepted <= offered,
            "{offered} drafts, {accepted} accepted"
        );
        let paused = engine.metrics.spec_paused_steps.load(Ordering::Relaxed);
        // Four requests decode together at first: above the limit speculation pauses.
        assert_eq!(paused > 0, spec_max_batch < 4, "{paused} paused steps");
    }
}

/// The synchronous batch entry (GRPO's rollouts): greedy requests, more than `max_seqs` and with
/// eos allowed, give `generate`'s tokens alone; sampled ones are reproducible and each follows
/// its own seed; a request past the context is refused by its index.
#[test]
fn generate_batch_equals_alone_and_is_reproducible() {
    let (model, tok) = load("deepseek_v3_tiny");
    let cfg = SchedulerConfig {
        max_seqs: 4,
        prefill_chunk: 5,
        prefix_cache: false,
        ..Default::default()
    };
    let ps = prompts(model.cfg.vocab_size as u32);
    let reqs: Vec<Request> = ps
        .iter()
        .enumerate()
        .map(|(j, p)| request(p.clone(), 6 + 3 * j))
        .collect();
    let out = generate_batch(&model, Some(&tok), cfg.clone(), reqs.clone()).unwrap();
    assert_eq!(out.len(), ps.len());
    for (j, o) in out.iter().enumerate() {
        assert_eq!(o.finish, FinishReason::Length);
        assert_eq!(
            o.token_ids,
            alone(&model, &tok, &ps[j], 6 + 3 * j),
            "request {j}"
        );
        assert_eq!(o.text, tok.decode(&o.token_ids, false).unwrap());
    }
    // All at once (every request admitted and prefilled in the first step): the same tokens.
    let whole = SchedulerConfig::whole_batch(&reqs, 0);
    assert_eq!(whole.max_seqs, reqs.len());
    assert_eq!(
        generate_batch(&model, Some(&tok), whole, reqs).unwrap(),
        out
    );
    // An eos id the greedy path emits ends that request early, and is not among its tokens.
    let first = out[2].token_ids[3];
    let mut r = request(ps[2].clone(), 12);
    r.ignore_eos = false;
    r.eos_ids = vec![first];
    let ended = generate_batch(&model, Some(&tok), cfg.clone(), vec![r]).unwrap();
    let upto = out[2].token_ids.iter().position(|&t| t == first).unwrap();
    assert_eq!(ended[0].finish, FinishReason::Eos);
    assert_eq!(ended[0].token_ids, out[2].token_ids[..upto]);
    // Sampling: the same inputs give the same outputs; another seed gives other ones.
    let sampled = |seed: u64| {
        let reqs: Vec<Request> = (0..8)
            .map(|j| {
                let mut r = request(ps[j % ps.len()].clone(), 10);
                r.params = SamplingParams {
                    temperature: 1.0,
                    seed: seed + j as u64,
                    ..SamplingParams::default()
                };
                r
            })
            .collect();
        generate_batch(&model, Some(&tok), cfg.clone(), reqs).unwrap()
    };
    let (a, b, c) = (sampled(1), sampled(1), sampled(100));
    assert_eq!(a, b);
    assert_ne!(a, c);
    let stuck = SchedulerConfig {
        max_seqs: 0,
        ..cfg.clone()
    };
    let err = generate_batch(&model, Some(&tok), stuck, vec![request(vec![1, 2], 2)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_seqs is 0"), "{err}");
    let too_long = request(vec![1; model.rope.max_positions()], 4);
    let err = generate_batch(
        &model,
        Some(&tok),
        cfg,
        vec![request(vec![1, 2], 2), too_long],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("batch request 1"), "{err}");
}

#[test]
fn batched_greedy_equals_alone_deepseek_v3() {
    batched_equals_alone("deepseek_v3_tiny");
}

/// MTP speculation inside continuous batching (drafts verified as short segments beside other
/// sequences' prefill chunks and decode rows, caches rolled back per sequence): the same tokens.
#[test]
fn speculative_batched_greedy_equals_alone_deepseek_v3() {
    batched_equals_alone_with("deepseek_v3_tiny", 2, 4);
    batched_equals_alone_with("deepseek_v3_tiny", 3, 4);
}

/// Speculation paused while more sequences decode than `spec_max_batch` and resumed as they
/// finish (the drafter taking the plainly decoded rows in): still the same tokens.
#[test]
fn paused_speculation_resumes_losslessly() {
    batched_equals_alone_with("deepseek_v3_tiny", 2, 1);
    batched_equals_alone_with("deepseek_v3_tiny", 3, 2);
}

#[test]
fn batched_greedy_equals_alone_qwen2() {
    batched_equals_alone("qwen2_tiny");
}

#[test]
fn prefix_cache_hits_reuse_kv_and_change_nothing() {
    let (model, tok) = load("deepseek_v3_tiny");
    let engine = Engine::start(
        model.clone(),
        Some(tok.clone()),
        SchedulerConfig {
            block_size: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let v = model.cfg.vocab_size as u32;
    let system: Vec<u32> = (0..21u32).map(|i| (i * 17 + 3) % v).collect();
    let mut first = system.clone();
    first.extend([5, 6, 7]);
    let mut second = system.clone();
    second.extend([9, 10]);
    let a = collect(engine.submit(request(first.clone(), 5)).unwrap());
    assert_eq!(a.cached, 0);
    let b = collect(engine.submit(request(second.clone(), 5)).unwrap());
    assert_eq!(
        b.cached, 20,
        "five whole blocks of the shared 21-token prefix"
    );
    assert_eq!(b.ids, alone(&model, &tok, &second, 5));
    // The whole first conversation (prompt + reply) is cached: its continuation hits past it.
    let mut follow = first.clone();
    follow.extend(&a.ids);
    follow.extend([11, 12, 13, 14, 15]);
    let c = collect(engine.submit(request(follow.clone(), 3)).unwrap());
    assert_eq!(c.cached, 28);
    assert_eq!(c.ids, alone(&model, &tok, &follow, 3));
    let m = &engine.metrics;
    assert_eq!(m.cached_prompt_tokens.load(Ordering::Relaxed), 48);
    assert!(m.prefix_cache_bytes.load(Ordering::Relaxed) > 0);
}

#[test]
fn dropped_receivers_free_their_sequences() {
    let (model, tok) = load("deepseek_v3_tiny");
    let engine = Engine::start(model.clone(), Some(tok), SchedulerConfig::default()).unwrap();
    let mut rx = engine.submit(request(vec![3, 4, 5], 400)).unwrap();
    // Wait for the first token, then hang up.
    loop {
        if let Some(Event::Token { .. }) = rx.blocking_recv() {
            break;
        }
    }
    drop(rx);
    let t0 = std::time::Instant::now();
    while engine.metrics.running.load(Ordering::Relaxed) != 0
        || engine.metrics.kv_reserved_bytes.load(Ordering::Relaxed) != 0
    {
        assert!(
            t0.elapsed().as_secs() < 10,
            "the cancelled sequence was not freed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        engine.metrics.generated_tokens.load(Ordering::Relaxed) < 400,
        "generation stopped early"
    );
}

#[test]
fn queue_and_memory_bounds_refuse_cleanly() {
    let (model, tok) = load("deepseek_v3_tiny");
    let per_token = {
        let e = Engine::start(model.clone(), None, SchedulerConfig::default()).unwrap();
        e.kv_bytes_per_token
    };
    let engine = Engine::start(
        model.clone(),
        Some(tok),
        SchedulerConfig {
            max_seqs: 1,
            max_queue: 1,
            // Room for one 3 + 60 token sequence at a time.
            max_kv_bytes: 70 * per_token,
            ..Default::default()
        },
    )
    .unwrap();
    let too_big = engine.submit(request(vec![1, 2, 3], 100));
    assert!(
        matches!(&too_big, Err(SubmitError::Invalid(m)) if m.contains("KV cache")),
        "a request over the memory bound is refused"
    );
    let results: Vec<_> = (0..3)
        .map(|_| engine.submit(request(vec![1, 2, 3], 60)))
        .collect();
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(SubmitError::QueueFull(_)))),
        "one running and one waiting at most: the third is refused"
    );
    for r in results.into_iter().flatten() {
        assert_eq!(collect(r).ids.len(), 60);
    }
    let long = vec![1u32; engine.context_len];
    assert!(matches!(
        engine.submit(request(long, 1)),
        Err(SubmitError::Invalid(m)) if m.contains("context length")
    ));
    assert!(matches!(
        engine.submit(request(vec![], 1)),
        Err(SubmitError::Invalid(_))
    ));
    assert!(matches!(
        engine.submit(request(vec![1], 0)),
        Err(SubmitError::Invalid(_))
    ));
}

#[test]
fn stop_strings_eos_and_logprobs() {
    let (model, tok) = load("deepseek_v3_tiny");
    let engine =
        Engine::start(model.clone(), Some(tok.clone()), SchedulerConfig::default()).unwrap();
    let prompt: Vec<u32> = vec![5, 9, 11, 40];
    let free = alone(&model, &tok, &prompt, 12);
    // eos on the 4th generated token: three tokens come out, finish reason eos.
    let mut r = request(prompt.clone(), 12);
    r.ignore_eos = false;
    r.eos_ids = vec![free[3]];
    let first_eos = free.iter().position(|&t| t == free[3]).unwrap();
    let got = collect(engine.submit(r).unwrap());
    assert_eq!(got.reason, FinishReason::Eos);
    assert_eq!(got.ids, free[..first_eos]);
    // A stop string taken from the free-running text ends generation with the text cut before it.
    let text = tok.decode(&free, false).unwrap();
    let stop: String = text
        .chars()
        .skip(text.chars().count() / 2)
        .take(2)
        .collect();
    let mut r = request(prompt.clone(), 12);
    r.stop = vec![stop.clone()];
    let got = collect(engine.submit(r).unwrap());
    assert_eq!(got.reason, FinishReason::Stop);
    assert_eq!(got.text, text[..text.find(&stop).unwrap()]);
    // Logprobs: the greedy token is the most likely one.
    let mut r = request(prompt, 3);
    r.logprobs = Some(2);
    let mut rx = engine.submit(r).unwrap();
    let mut seen = 0;
    while let Some(ev) = rx.blocking_recv() {
        if let Event::Token { id, logprob, .. } = ev {
            let lp = logprob.unwrap();
            assert_eq!(lp.top.len(), 2);
            assert_eq!(lp.top[0].0, id);
            assert!((lp.top[0].1 - lp.logprob).abs() < 1e-6 && lp.logprob <= 0.0);
            seen += 1;
        }
        if seen == 3 {
            break;
        }
    }
    assert_eq!(seen, 3);
}
