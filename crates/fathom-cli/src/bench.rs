//! `fathom bench`: prefill and decode throughput of one model, llama-bench style (pp/tg), with
//! time to first token, peak resident memory and KV-cache bytes per token.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use fathom_model::{CausalLm, KvCache, Segment};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompt tokens to prefill (pp).
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens to decode one at a time (tg): timed from an empty context as llama-bench does
    /// (`decode_tok_s`), and after the prompt (`decode_after_prompt_tok_s`).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// candle threads (sets RAYON_NUM_THREADS; must be given before any model code runs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Repetitions; the best is reported (machines are shared and noisy).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Quantise projection weights while loading: q8_0, q6_k, q4_k, q4_0.
    #[arg(long, value_parser = fathom_core::WeightQuant::parse)]
    quant: Option<fathom_core::WeightQuant>,
    /// Use the plain k/v cache instead of MLA's latent cache.
    #[arg(long)]
    plain_cache: bool,
    /// Output format: text or json (llama-bench-like keys).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    format: String,
    /// Same as `--format json`.
    #[arg(long)]
    json: bool,
    /// Also decode N sequences together through the packed forward continuous batching uses
    /// (each from an empty context, `--gen-tokens` steps): aggregate tok/s and its ratio to the
    /// same path at one sequence (`batch_decode_tok_s`, `batch_speedup`).
    #[arg(long)]
    batch: Option<usize>,
    /// Skip the MTP speculative decoding measurement (run by default for models with MTP modules).
    #[arg(long)]
    no_spec: bool,
    /// Decode through the plain candle path instead of the runtime's planned step (the step
    /// before it, for side-by-side numbers; sets FATHOM_PLANNED_DECODE=0).
    #[arg(long)]
    unplanned: bool,
    /// Tokens the MTP module drafts per step in the speculative measurement.
    #[arg(long, default_value_t = fathom_engine::DEFAULT_DRAFT_TOKENS)]
    draft_tokens: usize,
    /// MTP modules that draft (default: all); past them the last is reused recursively.
    #[arg(long)]
    draft_modules: Option<usize>,
    /// Measure speculation over these prompts instead of the one built-in text: a JSONL file
    /// whose lines carry `"prompt"` (as `fathom tasks --style problems` writes), each sent as a
    /// user turn through the chat template (plain text without one) and decoded greedily to
    /// end-of-sequence or `--gen-tokens`. Tok/s is summed over all prompts, with and without MTP.
    #[arg(long)]
    spec_prompts: Option<PathBuf>,
}

/// Greedy decode through `generate` up to `n` tokens, stopping at any of `eos_ids` (none: never):
/// (tokens, decode seconds, the draft statistics).
fn timed_generate(
    model: &CausalLm,
    prompt: &[u32],
    n: usize,
    eos_ids: &[u32],
    draft_tokens: usize,
) -> Result<(usize, f64, Option<fathom_engine::SpecStats>)> {
    let opts = fathom_engine::GenerateOptions {
        params: fathom_engine::SamplingParams::default(),
        max_tokens: n,
        stop: &[],
        ignore_eos: eos_ids.is_empty(),
        eos_ids,
        draft_tokens,
    };
    let g = fathom_engine::generate(model, None, prompt, &opts, &mut |_| {})?;
    Ok((g.token_ids.len(), g.decode_secs, g.spec))
}

/// The prompts of `--spec-prompts`: each line's `"prompt"` as a user turn through the chat
/// template (encoded as plain text when the model has none), with the end-of-sequence ids.
fn spec_prompt_ids(
    dir: &std::path::Path,
    file: &std::path::Path,
) -> Result<(Vec<Vec<u32>>, Vec<u32>)> {
    let tok = fathom_core::TextTokenizer::from_dir(dir).with_context(|| {
        format!(
            "{}: --spec-prompts needs the model's tokenizer",
            dir.display()
        )
    })?;
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading --spec-prompts {}", file.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", file.display(), i + 1))?;
        let Some(p) = v.get("prompt").and_then(|p| p.as_str()) else {
            bail!("{}:{}: no \"prompt\" string", file.display(), i + 1);
        };
        let ids = if tok.chat_template.is_some() {
            tok.apply_chat_template(&json!([{"role": "user", "content": p}]), None, true)?
                .1
        } else {
            tok.encode(p, true)?
        };
        prompts.push(ids);
    }
    if prompts.is_empty() {
        bail!("{}: no prompts", file.display());
    }
    Ok((prompts, tok.eos_ids.clone()))
}

/// Sustained read bandwidth of this machine, GB/s: `threads` workers summing disjoint halves of a
/// 256 MiB buffer (far past the caches), best of 3 — the memory roofline decode is held to.
pub fn read_bandwidth_gb_s(threads: usize) -> f64 {
    let n: usize = 64 << 20; // f32s = 256 MiB
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let threads = threads.max(1);
    let chunk = n.div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..3 {
        let t0 = Instant::now();
        let sum: f32 = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(chunk)
                .map(|c| {
                    s.spawn(move || {
                        // 8 independent accumulators so the adds vectorise and pipeline.
                        let mut acc = [0f32; 8];
                        for block in c.chunks_exact(8) {
                            for (a, x) in acc.iter_mut().zip(block) {
                                *a += x;
                            }
                        }
                        acc.iter().sum::<f32>()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        std::hint::black_box(sum);
        best = best.max((n * 4) as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Peak resident set size of this process (VmHWM), bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Prefill `prompt` into `cache`; (seconds, greedy next token).
fn timed_prefill(model: &CausalLm, cache: &mut KvCache, prompt: &[u32]) -> Result<(f64, u32)> {
    let ids = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
    let t0 = Instant::now();
    // Logits of the last position only, as the engine's prefill and llama-bench compute them.
    let hidden = model.forward_hidden(&ids, 0, Some(cache))?.hidden;
    let last = hidden.narrow(1, prompt.len() - 1, 1)?;
    let next = model
        .logits(&last)?
        .flatten_all()?
        .argmax(0)?
        .to_scalar::<u32>()?;
    Ok((t0.elapsed().as_secs_f64(), next))
}

/// The text the speculative measurement continues.
const SPEC_PROMPT: &str = "ROMEO: But soft, what light through yonder window breaks?";

/// Decode `steps` tokens for each of `n` sequences together through `forward_packed` (one row per
/// sequence per step, greedy), each from a one-token context; seconds taken (first step excluded).
fn timed_batch_decode(
    model: &CausalLm,
    n: usize,
    steps: usize,
    new_cache: &dyn Fn() -> KvCache,
) -> Result<f64> {
    let vocab = model.cfg.vocab_size as u32;
    let mut caches: Vec<KvCache> = (0..n).map(|_| new_cache()).collect();
    let mut next: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 11) % vocab).collect();
    let mut t0 = Instant::now();
    for step in 0..=steps {
        if step == 1 {
            t0 = Instant::now();
        }
        let segments: Vec<Segment> = (0..n)
            .map(|i| Segment {
                start: i,
                len: 1,
                offset: step,
            })
            .collect();
        let rows: Vec<u32> = (0..n as u32).collect();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let logits = model.forward_packed(&next, &segments, &mut refs, &rows)?;
        next = logits.argmax(1)?.to_vec1::<u32>()?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Greedy-decode `n` tokens one at a time from `next` at position `start`; seconds taken.
fn timed_decode(
    model: &CausalLm,
    cache: &mut KvCache,
    mut next: u32,
    start: usize,
    n: usize,
) -> Result<f64> {
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
            .0 as u32
    };
    let t0 = Instant::now();
    for i in 0..n {
        // The runtime's planned step where it applies (the engine decodes so), else the plain
        // candle path.
        next = match model.decode_planned(next, start + i, cache)? {
            Some(logits) => argmax(&logits),
            None => {
                let tok = Tensor::new(&[[next]], &Device::Cpu)?;
                let logits = model.forward(&tok, start + i, Some(cache))?;
                logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?
            }
        };
    }
    Ok(t0.elapsed().as_secs_f64())
}

pub fn cmd_bench(a: BenchArgs, dir: PathBuf) -> Result<()> {
    if a.unplanned {
        // Read once, when the model first decodes (below): no model code has run yet.
        std::env::set_var("FATHOM_PLANNED_DECODE", "0");
    }
    let t_load = Instant::now();
    let mut model = CausalLm::load_quantized(&dir, DType::F32, &Device::Cpu, a.quant)?;
    crate::limit_draft_modules(&mut model, a.draft_modules)?;
    let load_ms = t_load.elapsed().as_secs_f64() * 1e3;
    let max = model.cfg.max_position_embeddings;
    if a.prompt_tokens == 0 || a.gen_tokens == 0 {
        bail!("--prompt-tokens and --gen-tokens must be > 0");
    }
    if a.prompt_tokens + a.gen_tokens > max {
        bail!(
            "--prompt-tokens {} + --gen-tokens {} exceed the model's max_position_embeddings {max}",
            a.prompt_tokens,
            a.gen_tokens
        );
    }
    // Read and checked before the timed parts, so a bad file fails at once.
    let spec_file_prompts = match &a.spec_prompts {
        Some(file) => {
            let (prompts, eos_ids) = spec_prompt_ids(&dir, file)?;
            if let Some(p) = prompts.iter().find(|p| p.len() + a.gen_tokens >= max) {
                bail!(
                    "{}: a prompt of {} tokens + --gen-tokens {} exceeds the model's max_position_embeddings {max}",
                    file.display(),
                    p.len(),
                    a.gen_tokens
                );
            }
            Some((prompts, eos_ids))
        }
        None => None,
    };
    let vocab = model.cfg.vocab_size as u32;
    // A fixed pseudo-random prompt: the speed does not depend on the text.
    let prompt: Vec<u32> = (0..a.prompt_tokens as u64)
        .map(|i| ((i * 2_654_435_761 + 12_345) % vocab as u64) as u32)
        .collect();
    let (mut best_pp, mut best_tg, mut best_ttft) = (0f64, 0f64, f64::INFINITY);
    let mut best_tg_after_prompt = 0f64;
    let mut kv_bytes_per_token = 0usize;
    let new_cache = || {
        if a.plain_cache {
            model.new_plain_cache()
        } else {
            model.new_cache()
        }
    };
    for _ in 0..a.repeat.max(1) {
        let mut cache = new_cache();
        let (prefill, next) = timed_prefill(&model, &mut cache, &prompt)?;
        best_pp = best_pp.max(a.prompt_tokens as f64 / prefill);
        best_ttft = best_ttft.min(prefill * 1e3);
        let secs = timed_decode(&model, &mut cache, next, a.prompt_tokens, a.gen_tokens)?;
        best_tg_after_prompt = best_tg_after_prompt.max(a.gen_tokens as f64 / secs);
        // llama-bench's tg: decode from an empty context (the first token is not timed).
        let mut fresh = new_cache();
        let (_, first) = timed_prefill(&model, &mut fresh, &prompt[..1])?;
        let secs = timed_decode(&model, &mut fresh, first, 1, a.gen_tokens)?;
        best_tg = best_tg.max(a.gen_tokens as f64 / secs);
        kv_bytes_per_token = cache.bytes() / cache.seq_len().max(1);
    }
    // Batched decode: the same packed path at 1 and at N sequences, side by side.
    let mut batch = None;
    if let Some(n) = a.batch {
        if n == 0 {
            bail!("--batch must be > 0");
        }
        let (mut one, mut many) = (0f64, 0f64);
        for _ in 0..a.repeat.max(1) {
            one = one.max(
                a.gen_tokens as f64 / timed_batch_decode(&model, 1, a.gen_tokens, &new_cache)?,
            );
            many = many.max(
                (n * a.gen_tokens) as f64
                    / timed_batch_decode(&model, n, a.gen_tokens, &new_cache)?,
            );
        }
        batch = Some((n, one, many));
    }
    // MTP speculative decoding against the same generate loop without it, side by side, from a
    // text prompt when the model has a tokenizer (draft acceptance depends on real text).
    let mut spec = None;
    let mut spec_prompt_count = 0;
    if !a.no_spec && a.draft_tokens > 0 && !model.mtp.is_empty() {
        let (prompts, eos_ids) = match spec_file_prompts {
            Some(p) => p,
            None => {
                let text_prompt = fathom_core::TextTokenizer::from_dir(&dir)
                    .ok()
                    .and_then(|t| t.encode(SPEC_PROMPT, true).ok())
                    .filter(|ids| !ids.is_empty() && ids.len() + a.gen_tokens < max)
                    .unwrap_or_else(|| prompt[..prompt.len().min(16)].to_vec());
                (vec![text_prompt], vec![])
            }
        };
        // Each pass decodes every prompt plainly then speculatively (greedy: the same tokens);
        // tok/s = tokens summed over the prompts / decode seconds summed; best pass reported.
        let (mut plain, mut fast, mut stats) = (0f64, 0f64, None);
        for _ in 0..a.repeat.max(1) {
            let (mut tokens, mut plain_s, mut spec_s) = (0usize, 0f64, 0f64);
            let mut pass_stats = fathom_engine::SpecStats::default();
            for p in &prompts {
                let (n, secs, _) = timed_generate(&model, p, a.gen_tokens, &eos_ids, 0)?;
                let (_, fast_secs, s) =
                    timed_generate(&model, p, a.gen_tokens, &eos_ids, a.draft_tokens)?;
                tokens += n;
                plain_s += secs;
                spec_s += fast_secs;
                if let Some(s) = s {
                    pass_stats.merge(&s);
                }
            }
            plain = plain.max(tokens as f64 / plain_s.max(1e-9));
            let tok_s = tokens as f64 / spec_s.max(1e-9);
            if tok_s > fast {
                fast = tok_s;
                stats = Some(pass_stats);
            }
        }
        spec = stats.map(|s| (plain, fast, s));
        spec_prompt_count = prompts.len();
    }
    let threads = candle_core::utils::get_num_threads();
    let (total, active) = model.param_counts();
    let weight_bytes = model.weight_bytes_per_token();
    // Before the bandwidth probe's 256 MiB buffer raises the high-water mark.
    let peak_rss = peak_rss_bytes();
    let bandwidth = read_bandwidth_gb_s(threads);
    let roofline = bandwidth * 1e9 / weight_bytes as f64;
    // MLA's plain (expanded) cache is not the plan's: it decodes through candle.
    let planned = model.decode_plan().is_some() && !(a.plain_cache && model.cfg.mla.is_some());
    let decode_path = if planned { "planned" } else { "plain" };
    let report = json!({
        "model": dir.display().to_string(),
        "architecture": model.cfg.arch.model_type(),
        "total_params": total,
        "active_params": active,
        "quant": model.weight_format(),
        "threads": threads,
        "cache": if a.plain_cache || model.cfg.mla.is_none() { "plain" } else { "latent" },
        "decode_path": decode_path,
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "prefill_tok_s": best_pp,
        "decode_tok_s": best_tg,
        "decode_after_prompt_tok_s": best_tg_after_prompt,
        "ttft_ms": best_ttft,
        "load_ms": load_ms,
        "peak_rss_bytes": peak_rss,
        "kv_bytes_per_token": kv_bytes_per_token,
        "weight_bytes_per_token": weight_bytes,
        "read_bandwidth_gb_s": bandwidth,
        "decode_roofline_tok_s": roofline,
        "decode_fraction_of_roofline": best_tg / roofline,
        "batch": batch.map(|b| b.0),
        "batch1_packed_decode_tok_s": batch.map(|b| b.1),
        "batch_decode_tok_s": batch.map(|b| b.2),
        "batch_speedup": batch.map(|b| b.2 / b.1),
        "draft_tokens": spec.as_ref().map(|_| a.draft_tokens),
        "draft_modules": spec.as_ref().map(|_| model.mtp.len()),
        "generate_tok_s": spec.as_ref().map(|s| s.0),
        "spec_decode_tok_s": spec.as_ref().map(|s| s.1),
        "spec_speedup": spec.as_ref().map(|s| s.1 / s.0),
        "mtp_acceptance": spec.as_ref().map(|s| s.2.acceptance()),
        "mtp_tokens_per_step": spec.as_ref().map(|s| s.2.tokens_per_step()),
        "spec_prompts": spec.as_ref().map(|_| spec_prompt_count),
    });
    if a.json || a.format == "json" {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} ({} params, {} active), {} threads, {} cache, {} weights, {} decode",
            dir.display(),
            total,
            active,
            threads,
            report["cache"].as_str().unwrap_or(""),
            report["quant"].as_str().unwrap_or(""),
            decode_path
        );
        println!("pp{:<5} {:>10.1} tok/s", a.prompt_tokens, best_pp);
        println!(
            "tg{:<5} {:>10.1} tok/s (from an empty context, as llama-bench); {:.1} tok/s after the {}-token prompt",
            a.gen_tokens, best_tg, best_tg_after_prompt, a.prompt_tokens
        );
        println!(
            "ttft    {:>10.1} ms (prefill of {} tokens)",
            best_ttft, a.prompt_tokens
        );
        println!("load    {:>10.1} ms", load_ms);
        if let Some(r) = peak_rss {
            println!("peak RSS {:>9.1} MB", r as f64 / 1e6);
        }
        println!("KV cache {:>9} bytes/token", kv_bytes_per_token);
        println!(
            "roofline {:>9.1} tok/s ({:.1} MB of weights per token at {:.1} GB/s read): decode at {:.0} %",
            roofline,
            weight_bytes as f64 / 1e6,
            bandwidth,
            100.0 * best_tg / roofline
        );
        if let Some((plain, fast, stats)) = &spec {
            println!(
                "mtp     {fast:>10.1} tok/s greedy with {} drafts per step vs {plain:.1} without ({:.2}×){}; {}",
                a.draft_tokens,
                fast / plain,
                match &a.spec_prompts {
                    Some(f) => format!(" over the {spec_prompt_count} prompts of {}", f.display()),
                    None => String::new(),
                },
                stats.summary()
            );
        }
        if let Some((n, one, many)) = batch {
            println!(
                "batch{n:<4} {many:>10.1} tok/s aggregate through the packed forward ({:.2}× its {one:.1} tok/s at one sequence)",
                many / one
            );
        }
    }
    Ok(())
}
