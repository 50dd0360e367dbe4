//! GRPO rollout throughput, side by side in one process: the batched path `fathom grpo` uses
//! (each worker's share decoded as one continuous batch, `grpo_train::rollouts`) against the
//! previous one (each worker generating its sequences one after another with `generate`), on the
//! same prompts and sampling settings, alternating rounds; throughput in generated tokens per
//! second (the samples differ between the two, so their lengths do too).
//!
//! Usage: cargo run --release -p fathom-train --example rollout_bench -- MODEL_DIR [PROMPTS=64]
//! [GROUP=8] [MAX_TOKENS=48] [THREADS=2] [ROUNDS=3]
use candle_core::{DType, Device};
use fathom_core::TextTokenizer;
use fathom_engine::{generate, GenerateOptions, SamplingParams};
use fathom_model::CausalLm;
use fathom_train::evaluate::{prompt_ids, TaskSource};
use fathom_train::grpo_train::{rollouts, GrpoConfig};
use fathom_train::posttrain::on_ranges;
use fathom_train::tasks::Split;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // As `fathom grpo`: one candle thread per worker (an intra-op pool on top oversubscribes
        // the cores and makes the one-by-one path ~15x slower here).
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = std::path::PathBuf::from(args.first().expect("usage: rollout_bench MODEL_DIR ..."));
    let arg = |i: usize, d: usize| args.get(i).map_or(d, |s| s.parse().expect("a number"));
    let (prompts_n, group, max_tokens, threads, rounds) =
        (arg(1, 64), arg(2, 8), arg(3, 48), arg(4, 2), arg(5, 3));
    let model = CausalLm::load(&dir, DType::F32, &Device::Cpu)?;
    let tok = TextTokenizer::from_dir(&dir)?;
    let problems = TaskSource::parse("arithmetic:2")
        .problems(prompts_n, 0, Split::Train)
        .map_err(anyhow::Error::msg)?;
    let prompts: Vec<Vec<u32>> = problems
        .iter()
        .map(|p| prompt_ids(&tok, p, None))
        .collect::<fathom_core::Result<_>>()?;
    let cfg = GrpoConfig {
        model: dir.clone(),
        task: "arithmetic:2".into(),
        prompts_per_step: prompts_n,
        group_size: group,
        max_tokens,
        temperature: 1.0,
        top_p: 1.0,
        epsilon_low: 0.2,
        epsilon_high: 0.2,
        beta: 0.0,
        token_level: false,
        scale_by_std: true,
        drop_uniform_groups: false,
        inner_iterations: 1,
        format_weight: 0.5,
        equations_weight: 0.0,
        seed: 0,
        eval_every: 0,
        eval_problems: 0,
        eval_k: 1,
        save_every: 0,
        log_every: 1,
        draft_tokens: 0,
        system: None,
    };
    // The previous path: every sequence alone, the jobs split over the workers.
    let one_by_one = |step: usize| -> anyhow::Result<usize> {
        let jobs: Vec<(usize, usize)> = (0..prompts.len())
            .flat_map(|i| (0..group).map(move |j| (i, j)))
            .collect();
        let parts = on_ranges(jobs.len(), threads, |range| -> anyhow::Result<usize> {
            let mut tokens = 0;
            for &(i, j) in &jobs[range] {
                let opts = GenerateOptions {
                    params: SamplingParams {
                        temperature: 1.0,
                        seed: (step * 1_000_003 + i * 131 + j) as u64,
                        ..SamplingParams::default()
                    },
                    max_tokens,
                    stop: &[],
                    ignore_eos: false,
                    eos_ids: &tok.eos_ids,
                    draft_tokens: 0,
                };
                tokens += generate(&model, Some(&tok), &prompts[i], &opts, &mut |_| {})?
                    .token_ids
                    .len();
            }
            Ok(tokens)
        });
        parts.into_iter().sum()
    };
    println!(
        "{} prompts x {group} samples, <= {max_tokens} tokens, {threads} threads",
        prompts.len()
    );
    for round in 0..rounds {
        let t = Instant::now();
        let alone_tokens = one_by_one(round)?;
        let alone_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let batched = rollouts(&model, &tok, &prompts, group, &cfg, round, threads)?;
        let batched_s = t.elapsed().as_secs_f64();
        let batched_tokens: usize = batched
            .iter()
            .map(|r| r.1.iter().filter(|t| !tok.eos_ids.contains(t)).count())
            .sum();
        let (a, b) = (
            alone_tokens as f64 / alone_s,
            batched_tokens as f64 / batched_s,
        );
        println!(
            "round {round}: one by one {alone_s:.2} s ({a:.0} tok/s), batched {batched_s:.2} s \
             ({b:.0} tok/s): {:.2}x",
            b / a
        );
    }
    Ok(())
}
