//! Post-training end to end on micro models with the default model's tokenizer: SFT and GRPO
//! resume bit-identically, SFT learns its targets, a GRPO update moves probability toward
//! rewarded completions, distillation runs across architectures (V3-style MoE teacher → dense
//! Qwen2 student) and refuses mismatched tokenizers.

use candle_core::{DType, Device};
use fathom_model::CausalLm;
use fathom_train::checkpoint::write_checkpoint;
use fathom_train::grpo::{grpo_loss, token_logprobs, GrpoLossConfig};
use fathom_train::grpo_train::{run_grpo, sequence_tensors, GrpoConfig, GrpoOptions, Sequence};
use fathom_train::metrics::read_records;
use fathom_train::optim::AdamW;
use fathom_train::posttrain::{gradients, load_trainable, OptimConfig, RunOptions};
use fathom_train::sft::{run_sft, SftConfig, SftObjective, SftOptions};
use fathom_train::tasks::{arithmetic_digits, Split};
use fathom_train::traces::{conversation, reference_answer, Style};
use fathom_train::TrainableModel;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn default_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/default")
}

/// A freshly initialised micro model of `arch` with the default model's tokenizer (vocab 2048).
fn micro_model(dir: &Path, arch: &str, seed: u64) -> PathBuf {
    let cfg = match arch {
        "deepseek_v3" => json!({
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": 2048, "hidden_size": 32, "intermediate_size": 64,
            "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "n_routed_experts": 8, "n_shared_experts": 1,
            "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1,
            "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
            "v_head_dim": 8, "num_nextn_predict_layers": 1, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "scoring_func": "sigmoid",
            "topk_method": "noaux_tc", "norm_topk_prob": true, "routed_scaling_factor": 1.0,
            "hidden_act": "silu", "tie_word_embeddings": false, "bos_token_id": 0,
            "eos_token_id": 1, "torch_dtype": "float32"
        }),
        _ => json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "vocab_size": 2048, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": false, "bos_token_id": 0,
            "eos_token_id": 1, "torch_dtype": "float32"
        }),
    };
    let tm = TrainableModel::new(cfg.clone(), &Device::Cpu).unwrap();
    tm.init(seed).unwrap();
    let out = dir.join(arch);
    write_checkpoint(
        &out,
        &cfg,
        &tm.checkpoint_tensors(),
        Some(&default_model()),
        |_| Ok(()),
    )
    .unwrap();
    out
}

fn worked_data(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("worked.jsonl");
    let text: String = arithmetic_digits(n, 5, Split::Train, 2)
        .iter()
        .map(|p| {
            format!(
                "{}\n",
                conversation(p, &reference_answer(p, Style::Worked).unwrap(), None)
            )
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn sft_config(model: &Path, data: &Path, objective: SftObjective) -> SftConfig {
    SftConfig {
        model: model.into(),
        data: data.into(),
        objective,
        seq_len: 200,
        batch_size: 4,
        packing: true,
        seed: 3,
        val_fraction: 0.1,
        eval_every: 3,
        save_every: 2,
        log_every: 100,
        bias_update_speed: 0.001,
    }
}

fn sft_opts(
    config: SftConfig,
    out: &Path,
    steps: usize,
    resume: bool,
    stop: Option<usize>,
) -> SftOptions {
    SftOptions {
        config,
        run: run_options(3e-3, out, steps, resume, stop),
    }
}

fn run_options(lr: f64, out: &Path, steps: usize, resume: bool, stop: Option<usize>) -> RunOptions {
    RunOptions {
        optim: OptimConfig::fine_tune(lr),
        max_steps: steps,
        out: out.into(),
        resume,
        quiet: true,
        stop_after: stop,
        threads: 2,
        keep_checkpoints: 2,
        mtp_depth: None,
    }
}

fn metrics_without_timing(run: &Path) -> Vec<Value> {
    let mut recs: Vec<Value> = read_records(&run.join("metrics.jsonl")).unwrap();
    for r in &mut recs {
        let o = r.as_object_mut().unwrap();
        for k in ["tokens_per_s", "rollout_s", "train_s"] {
            o.remove(k);
        }
    }
    recs
}

#[test]
fn sft_resume_is_bit_identical_and_learns_the_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let model = micro_model(tmp.path(), "deepseek_v3", 1);
    let data = worked_data(tmp.path(), 120);
    let ce = SftObjective::CrossEntropy { mtp_weight: 0.3 };
    let straight = tmp.path().join("straight");
    let s = run_sft(sft_opts(
        sft_config(&model, &data, ce.clone()),
        &straight,
        6,
        false,
        None,
    ))
    .unwrap();
    assert_eq!(s.steps, 6);
    let split = tmp.path().join("split");
    let s1 = run_sft(sft_opts(
        sft_config(&model, &data, ce.clone()),
        &split,
        6,
        false,
        Some(4),
    ))
    .unwrap();
    assert_eq!((s1.steps, s1.final_dir.is_none()), (4, true));
    // A second start without --resume refuses to overwrite the run.
    assert!(run_sft(sft_opts(
        sft_config(&model, &data, ce.clone()),
        &split,
        6,
        false,
        None
    ))
    .is_err());
    run_sft(sft_opts(
        sft_config(&model, &data, ce.clone()),
        &split,
        6,
        true,
        None,
    ))
    .unwrap();
    let a = std::fs::read(straight.join("final/model.safetensors")).unwrap();
    let b = std::fs::read(split.join("final/model.safetensors")).unwrap();
    assert!(a == b, "resumed SFT differs from the uninterrupted run");
    assert_eq!(
        metrics_without_timing(&straight),
        metrics_without_timing(&split)
    );
    assert!(straight.join("metrics.png").exists());

    // Learning: 40 steps take the validation loss on the answers far below the start (ln 2048 =
    // 7.6 nats for a uniform guess).
    let learn = tmp.path().join("learn");
    let mut cfg = sft_config(&model, &data, ce);
    cfg.eval_every = 40;
    let s = run_sft(sft_opts(cfg, &learn, 40, false, None)).unwrap();
    let recs = metrics_without_timing(&learn);
    let first = recs[0]["loss"].as_f64().unwrap();
    let val = s.last_val_loss.unwrap();
    assert!(
        val < 0.7 * first,
        "val loss {val} vs first train loss {first}"
    );
    // The final checkpoint is an ordinary model directory.
    let m = CausalLm::load(&learn.join("final"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.cfg.vocab_size, 2048);
}

#[test]
fn sft_reports_the_bad_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = micro_model(tmp.path(), "deepseek_v3", 1);
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"messages\": [{\"role\": \"user\"}]}\n",
    )
    .unwrap();
    let cfg = sft_config(
        &model,
        &data,
        SftObjective::CrossEntropy { mtp_weight: 0.0 },
    );
    let err = run_sft(sft_opts(cfg, &tmp.path().join("r"), 2, false, None))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("bad.jsonl") && err.contains("line 2"), "{err}");
}

fn grpo_config(model: &Path, mu: usize, beta: f64) -> GrpoConfig {
    GrpoConfig {
        model: model.into(),
        task: "arithmetic".into(),
        prompts_per_step: 2,
        group_size: 3,
        max_tokens: 6,
        temperature: 1.0,
        top_p: 1.0,
        epsilon_low: 0.2,
        epsilon_high: 0.28,
        beta,
        token_level: false,
        scale_by_std: true,
        drop_uniform_groups: false,
        inner_iterations: mu,
        format_weight: 0.5,
        equations_weight: 0.0,
        seed: 4,
        eval_every: 2,
        eval_problems: 2,
        eval_k: 2,
        save_every: 1,
        log_every: 100,
        draft_tokens: 0,
        system: None,
    }
}

fn grpo_opts(
    config: GrpoConfig,
    out: &Path,
    steps: usize,
    resume: bool,
    stop: Option<usize>,
) -> GrpoOptions {
    GrpoOptions {
        config,
        run: run_options(1e-2, out, steps, resume, stop),
    }
}

#[test]
fn grpo_resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let model = micro_model(tmp.path(), "deepseek_v3", 2);
    for (mu, beta) in [(1, 0.04), (2, 0.0)] {
        let straight = tmp.path().join(format!("straight{mu}"));
        let s = run_grpo(grpo_opts(
            grpo_config(&model, mu, beta),
            &straight,
            4,
            false,
            None,
        ))
        .unwrap();
        assert_eq!(s.steps, 4);
        // Held-out evaluations: before training, every 2 batches, and at the end.
        assert_eq!(s.evals.first().map(|e| e.0), Some(0));
        assert_eq!(s.evals.last().map(|e| e.0), Some(4));
        let split = tmp.path().join(format!("split{mu}"));
        // Stop after one rollout batch (μ optimizer steps), then resume.
        run_grpo(grpo_opts(
            grpo_config(&model, mu, beta),
            &split,
            4,
            false,
            Some(1),
        ))
        .unwrap();
        run_grpo(grpo_opts(
            grpo_config(&model, mu, beta),
            &split,
            4,
            true,
            None,
        ))
        .unwrap();
        let a = std::fs::read(straight.join("final/model.safetensors")).unwrap();
        let b = std::fs::read(split.join("final/model.safetensors")).unwrap();
        assert!(
            a == b,
            "μ = {mu}: resumed GRPO differs from the uninterrupted run"
        );
        let all = metrics_without_timing(&straight);
        assert_eq!(all, metrics_without_timing(&split));
        // Step 0 holds the held-out evaluation of the starting policy, then one record per step.
        assert_eq!(all[0]["step"], 0);
        assert!(all[0]["eval_accuracy"].as_f64().is_some());
        let recs: Vec<&Value> = all.iter().filter(|r| r.get("reward").is_some()).collect();
        assert_eq!(recs.len(), 4);
        for r in &recs {
            for k in [
                "reward",
                "accuracy",
                "format",
                "kl",
                "clip_fraction",
                "completion_tokens",
            ] {
                assert!(r[k].as_f64().is_some_and(f64::is_finite), "{k} in {r}");
            }
        }
        if mu == 2 {
            // The second inner step sees a policy that moved: ratios ≠ 1, and β = 0 means no KL.
            assert!(recs.iter().all(|r| r["kl"].as_f64() == Some(0.0)));
        }
        assert!(straight.join("metrics.png").exists());
    }
}

#[test]
fn a_grpo_update_moves_probability_toward_rewarded_completions() {
    let tmp = tempfile::tempdir().unwrap();
    let model = micro_model(tmp.path(), "deepseek_v3", 3);
    let tm = load_trainable(&model).unwrap();
    let prompt: Vec<u32> = vec![0, 40, 41, 42, 43];
    let good = Sequence {
        ids: [prompt.clone(), vec![100, 101, 102]].concat(),
        prompt_len: prompt.len(),
        advantage: 1.0,
    };
    let bad = Sequence {
        ids: [prompt.clone(), vec![200, 201, 202]].concat(),
        prompt_len: prompt.len(),
        advantage: -1.0,
    };
    let seqs = [good, bad];
    let (ids, mask, adv) = sequence_tensors(&seqs, 1, &Device::Cpu).unwrap();
    // Only the completion targets count.
    let m: Vec<Vec<f32>> = mask.to_vec2().unwrap();
    assert_eq!(m[0], vec![0., 0., 0., 0., 1., 1., 1.]);
    let seq_logp = |tm: &TrainableModel| -> Vec<f32> {
        let lp = token_logprobs(&tm.model, &ids).unwrap();
        (lp * &mask).unwrap().sum(1).unwrap().to_vec1().unwrap()
    };
    let before = seq_logp(&tm);
    let logp = token_logprobs(&tm.model, &ids).unwrap();
    let (loss, stats) = grpo_loss(
        &logp,
        &logp.detach(),
        None,
        &adv,
        &mask,
        &GrpoLossConfig {
            beta: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(stats.clip_fraction, 0.0);
    let grads = gradients(&tm, &loss).unwrap();
    let mut opt = AdamW::new(&tm.params, 0.9, 0.99, 1e-8, 0.0);
    opt.step(&tm.params, &grads, 1e-3).unwrap();
    let after = seq_logp(&tm);
    assert!(
        after[0] > before[0],
        "rewarded: {} → {}",
        before[0],
        after[0]
    );
    assert!(
        after[1] < before[1],
        "penalised: {} → {}",
        before[1],
        after[1]
    );
}

#[test]
fn distillation_across_architectures_and_its_vocabulary_check() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = micro_model(tmp.path(), "deepseek_v3", 4);
    let student = micro_model(tmp.path(), "qwen2", 5);
    let data = worked_data(tmp.path(), 40);
    for objective in [
        SftObjective::ForwardKl {
            teacher: teacher.clone(),
            tau: 2.0,
        },
        SftObjective::Jsd {
            teacher: teacher.clone(),
            beta: 0.5,
        },
    ] {
        let out = tmp.path().join(format!(
            "kd-{}",
            matches!(objective, SftObjective::Jsd { .. })
        ));
        let mut cfg = sft_config(&student, &data, objective);
        cfg.eval_every = 100;
        let s = run_sft(sft_opts(cfg, &out, 12, false, None)).unwrap();
        let recs = metrics_without_timing(&out);
        let kd = |r: &Value| r["distill_loss"].as_f64().unwrap();
        let (first, last) = (kd(&recs[0]), kd(&recs[recs.len() - 1]));
        assert!(last < 0.7 * first, "distillation loss {first} → {last}");
        let m = CausalLm::load(&s.final_dir.unwrap(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.cfg.arch.model_type(), "qwen2");
    }
    // A teacher with another tokenizer is refused with a reason.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(teacher.join(f), other.join(f)).unwrap();
    }
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/deepseek_v3_tiny");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(f), other.join(f)).unwrap();
    }
    let cfg = sft_config(
        &student,
        &data,
        SftObjective::ForwardKl {
            teacher: other,
            tau: 1.0,
        },
    );
    let err = run_sft(sft_opts(cfg, &tmp.path().join("bad"), 2, false, None))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("tokenizer"), "{err}");
}

/// `--mtp-depth`: a fresh SFT run can deepen a checkpoint's MTP to two modules (the new one starts
/// as a copy of the last, then trains on its own targets), the final checkpoint loads with both,
/// and a model without MTP modules is refused with the file named.
#[test]
fn sft_can_add_an_mtp_module() {
    let tmp = tempfile::tempdir().unwrap();
    let model = micro_model(tmp.path(), "deepseek_v3", 5);
    let deep = fathom_train::posttrain::load_trainable_with_mtp(&model, Some(2)).unwrap();
    assert_eq!(deep.model.mtp.len(), 2);
    let tensor = |tm: &TrainableModel, name: &str| -> Vec<f32> {
        let data = tm.varmap.data().lock().unwrap();
        data[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    // Layers 0–1 are the main model, 2 the first module, 3 the added one.
    for name in [
        "eh_proj.weight",
        "self_attn.kv_a_proj_with_mqa.weight",
        "hnorm.weight",
    ] {
        assert_eq!(
            tensor(&deep, &format!("model.layers.3.{name}")),
            tensor(&deep, &format!("model.layers.2.{name}")),
            "{name}"
        );
    }
    let shallow = fathom_train::posttrain::load_trainable_with_mtp(&model, Some(0)).unwrap();
    assert!(shallow.model.mtp.is_empty());

    let data = worked_data(tmp.path(), 40);
    let out = tmp.path().join("deeper");
    let objective = SftObjective::CrossEntropy { mtp_weight: 0.5 };
    let mut opts = sft_opts(sft_config(&model, &data, objective), &out, 3, false, None);
    opts.run.mtp_depth = Some(2);
    run_sft(opts).unwrap();
    let trained = CausalLm::load(&out.join("final"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(trained.mtp.len(), 2);
    assert_eq!(trained.cfg.num_nextn_predict_layers, 2);
    let recs: Vec<Value> = read_records(&out.join("metrics.jsonl")).unwrap();
    assert!(recs.iter().any(|r| r["mtp_loss"].as_f64().is_some()));
    // The added module trained apart from its source: the two differ after the steps.
    let after = load_trainable(&out.join("final")).unwrap();
    assert_ne!(
        tensor(&after, "model.layers.3.eh_proj.weight"),
        tensor(&after, "model.layers.2.eh_proj.weight")
    );

    let dense = micro_model(&tmp.path().join("q"), "qwen2", 5);
    let err = fathom_train::posttrain::load_trainable_with_mtp(&dense, Some(1))
        .err()
        .expect("no module to copy")
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("no MTP module"),
        "{err}"
    );
}

/// Teacher traces through the batched engine path: the embedded default model (which reasons on
/// sums) answers 2-digit problems; every kept trace is a complete, correct, well-formed
/// conversation, the greedy sample of each problem equals `generate`'s greedy answer alone, and
/// the split over workers (one batch of 12 or two of 6) changes nothing.
#[test]
fn teacher_traces_keep_correct_greedy_answers() {
    use fathom_core::TextTokenizer;
    use fathom_engine::{generate, FinishReason, GenerateOptions, SamplingParams};
    use fathom_train::evaluate::prompt_ids;
    use fathom_train::rewards::RewardSet;
    use fathom_train::tasks::Problem;
    use fathom_train::traces::teacher_traces;
    let dir = default_model();
    let model = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let problems: Vec<Problem> = (0..12)
        .map(|i| {
            let (a, b) = (10 + (i * 37) % 90, 10 + (i * 53) % 90);
            Problem::exact(&format!("What is {a} + {b}?"), &(a + b).to_string())
        })
        .collect();
    let rewards = RewardSet::r1(0.5);
    let traces = |threads: usize| {
        teacher_traces(
            &model,
            &tok,
            &problems,
            &rewards,
            1.5,
            1,
            1,
            0.8,
            48,
            3,
            None,
            threads,
            &|_| {},
        )
        .unwrap()
    };
    let (lines, stats) = traces(2);
    assert_eq!(
        (stats.problems, stats.samples),
        (problems.len(), problems.len())
    );
    assert!(stats.accepted > problems.len() / 4, "{stats:?}");
    assert_eq!(stats.accepted, lines.len());
    // The same kept traces with one worker.
    let (again, _) = traces(1);
    assert_eq!(lines, again);
    // Each kept trace is the greedy answer `generate` gives alone, and it is correct.
    let mut kept = lines.iter();
    for p in &problems {
        let prompt = prompt_ids(&tok, p, None).unwrap();
        let opts = GenerateOptions {
            params: SamplingParams::default(),
            max_tokens: 48,
            stop: &[],
            ignore_eos: false,
            eos_ids: &tok.eos_ids,
            draft_tokens: 0,
        };
        let g = generate(&model, Some(&tok), &prompt, &opts, &mut |_| {}).unwrap();
        let good = g.finish == FinishReason::Eos && rewards.score(p, &g.text).total >= 1.5;
        if good {
            let line = kept.next().expect("a kept trace for each solved problem");
            assert_eq!(line["messages"][0]["content"], p.question.as_str());
            assert_eq!(
                line["messages"][1]["content"],
                format!("<think>\n{}", g.text).as_str()
            );
        }
    }
    assert!(kept.next().is_none());
}
