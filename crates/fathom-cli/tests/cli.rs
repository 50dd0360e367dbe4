//! The `fathom` binary end to end on the committed fixtures.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fathom(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fathom"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `fathom chat ARGS` with `input` typed on stdin; asserts it exits cleanly, returns stdout.
fn chat_with_input(args: &[&str], input: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_fathom"))
        .arg("chat")
        .args(args)
        .current_dir(root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.as_mut().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "fathom chat {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into()
}

fn reference_ids(fixture: &str, key: &str) -> Vec<u32> {
    let t = candle_core::safetensors::load(
        root()
            .join("fixtures")
            .join(fixture)
            .join("reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    t[key]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

fn ids_arg(ids: &[u32]) -> String {
    ids.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn generate_json_reproduces_reference_greedy_tokens() {
    for fixture in ["deepseek_v3_tiny", "qwen2_tiny", "deepseek_v2_lite_tiny"] {
        let prompt = reference_ids(fixture, "prompt_1");
        let want = reference_ids(fixture, "greedy_1");
        let model = format!("fixtures/{fixture}");
        let (ok, out, err) = fathom(&[
            "generate",
            "--model",
            &model,
            "--token-ids",
            &ids_arg(&prompt),
            "--temperature",
            "0",
            "--max-tokens",
            "32",
            "--ignore-eos",
            "--format",
            "json",
        ]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let got: Vec<u32> = v["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(got, want, "{fixture}");
        assert!(v["text"].is_string());
    }
}

#[test]
fn generate_text_uses_embedded_default_model_and_chat_template() {
    let (ok, out, err) = fathom(&[
        "generate",
        "--prompt",
        "What is 9 * 8?",
        "--chat",
        "--max-tokens",
        "8",
        "--seed",
        "3",
        "--verbose",
    ]);
    assert!(ok, "{err}");
    assert!(!out.trim().is_empty());
    assert!(err.contains("tok/s"), "{err}");
    // The default model's main layers are MoE: speculation is off unless asked for.
    assert!(!err.contains("MTP acceptance"), "{err}");
    // Same seed, same output.
    let (_, again, _) = fathom(&[
        "generate",
        "--prompt",
        "What is 9 * 8?",
        "--chat",
        "--max-tokens",
        "8",
        "--seed",
        "3",
    ]);
    assert_eq!(out, again);
    // Greedy: the same text with speculation off.
    let greedy = |extra: &[&str]| {
        let mut args = vec!["generate", "--prompt", "What is 9 * 8?", "--chat"];
        args.extend_from_slice(&["--max-tokens", "24", "--temperature", "0", "--verbose"]);
        args.extend_from_slice(extra);
        let (ok, out, err) = fathom(&args);
        assert!(ok, "{err}");
        (out, err)
    };
    let (spec, spec_err) = greedy(&["--draft-tokens", "1"]);
    assert!(spec_err.contains("MTP acceptance draft 1"), "{spec_err}");
    let (plain, plain_err) = greedy(&["--draft-tokens", "1", "--no-spec"]);
    assert_eq!(spec, plain);
    assert!(!plain_err.contains("MTP acceptance"), "{plain_err}");
}

#[test]
fn chat_repl_keeps_history() {
    let out = chat_with_input(
        &[
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--format",
            "json",
        ],
        b"Hi\nand again\n/exit\n",
    );
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    // The second turn's prompt holds the first exchange, so it is longer.
    assert!(lines[1]["prompt_tokens"].as_u64() > lines[0]["prompt_tokens"].as_u64());
}

#[test]
fn forward_writes_reference_logits() {
    let prompt = reference_ids("llama_tiny", "prompt_0");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.safetensors");
    let (ok, _, err) = fathom(&[
        "forward",
        "--model",
        "fixtures/llama_tiny",
        "--token-ids",
        &ids_arg(&prompt),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got =
        candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap()["logits"].clone();
    let want = candle_core::safetensors::load(
        root().join("fixtures/llama_tiny/reference.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()["logits_0"]
        .narrow(0, 0, prompt.len())
        .unwrap();
    assert_eq!(got.dims(), want.dims());
    let d = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d <= 1e-4, "{d}");
}

#[test]
fn inspect_reports_params_and_latent_kv_bytes() {
    let (ok, out, err) = fathom(&[
        "inspect",
        "--model",
        "fixtures/deepseek_v3_tiny",
        "--format",
        "json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // (kv_lora_rank 64 + rope 16) · 3 layers · 4 bytes
    assert_eq!(v["kv_bytes_per_token"], 960);
    let total = v["total_params"].as_u64().unwrap();
    let active = v["active_params"].as_u64().unwrap();
    assert!(active < total);
    // Total must equal the stored main-model tensors (everything but the MTP layer 3 and the
    // selection-only correction biases).
    let st = candle_core::safetensors::load(
        root().join("fixtures/deepseek_v3_tiny/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let stored: usize = st
        .iter()
        .filter(|(k, _)| {
            !k.starts_with("model.layers.3.") && !k.ends_with("e_score_correction_bias")
        })
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(total as usize, stored);
    // 16 experts of 3·128·32 params, 4 active, in 2 MoE layers: 12 inactive experts each.
    assert_eq!(total - active, 2 * 12 * 3 * 128 * 32);
    let (ok, out, _) = fathom(&["inspect", "--model", "fixtures/qwen2_tiny_tied"]);
    assert!(ok && out.contains("qwen2"));
}

#[test]
fn bad_input_is_a_clear_error() {
    let (ok, _, err) = fathom(&["generate", "--model", "fixtures/nope", "--prompt", "x"]);
    assert!(!ok && err.contains("fixtures/nope"), "{err}");
    let (ok, _, err) = fathom(&["generate", "--token-ids", "1,x,3"]);
    assert!(!ok && err.contains("`x` is not a token id"), "{err}");
    let (ok, _, err) = fathom(&["generate", "--token-ids", "1,99999", "--max-tokens", "2"]);
    assert!(
        !ok && err.contains("99999") && err.contains("out of range"),
        "{err}"
    );
    let (ok, _, err) = fathom(&["generate", "--prompt", "x", "--top-p", "0"]);
    assert!(!ok && err.contains("top_p"), "{err}");
    assert!(!err.contains("panicked"));
}

/// A micro training config over a slice of the Shakespeare corpus, written into `dir`.
fn micro_train_config(dir: &std::path::Path) -> PathBuf {
    let text = std::fs::read_to_string(root().join("data/shakespeare/shakespeare.txt")).unwrap();
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, &text[..60_000]).unwrap();
    let preset = std::fs::read_to_string(root().join("crates/fathom-train/presets/tiny.toml"))
        .unwrap()
        .replace("data/shakespeare/shakespeare.txt", corpus.to_str().unwrap())
        .replace("vocab_size = 1024", "vocab_size = 300")
        .replace("max_steps = 300", "max_steps = 4")
        .replace("seq_len = 128", "seq_len = 32")
        .replace("val_fraction = 0.02", "val_fraction = 0.2")
        .replace("eval_every = 50", "eval_every = 2")
        .replace("save_every = 100", "save_every = 2");
    let path = dir.join("micro.toml");
    std::fs::write(&path, preset).unwrap();
    path
}

#[test]
fn train_plot_and_generate_from_the_result() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = micro_train_config(tmp.path());
    let run = tmp.path().join("run");
    let (ok, stdout, stderr) = fathom(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["steps"], 4);
    assert!(summary["val_loss"].as_f64().unwrap().is_finite());
    assert!(run.join("final/config.json").exists() && run.join("metrics.png").exists());
    // Resuming a finished run with a higher step budget continues it.
    let (ok, stdout, stderr) = fathom(&[
        "train",
        "--resume",
        "--out",
        run.to_str().unwrap(),
        "--max-steps",
        "6",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(stdout.trim()).unwrap()["steps"],
        6
    );
    let png = tmp.path().join("curves.png");
    let (ok, _, stderr) = fathom(&[
        "plot",
        run.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    // The trained checkpoint is a model the rest of the toolkit runs.
    let (ok, stdout, stderr) = fathom(&[
        "generate",
        "--model",
        run.join("final").to_str().unwrap(),
        "--prompt",
        "To be",
        "--max-tokens",
        "5",
        "--format",
        "json",
        "--ignore-eos",
    ]);
    assert!(ok, "{stderr}");
    let g: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(g["token_ids"].as_array().unwrap().len(), 5);
}

#[test]
fn train_errors_name_the_field_or_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = micro_train_config(tmp.path());
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("topk_group = 2", "topk_group = 9"),
    )
    .unwrap();
    let (ok, _, stderr) = fathom(&["train", "--config", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("model.topk_group"),
        "{stderr}"
    );
    let (ok, _, stderr) = fathom(&["train", "--preset", "nope"]);
    assert!(!ok && stderr.contains("unknown preset"), "{stderr}");
    let (ok, _, stderr) = fathom(&["plot", tmp.path().to_str().unwrap()]);
    assert!(!ok && stderr.contains("metrics.jsonl"), "{stderr}");
    let (ok, _, stderr) = fathom(&[
        "train",
        "--resume",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        tmp.path().join("empty").to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("no checkpoint"), "{stderr}");
}

#[test]
fn tokenizer_train_writes_a_loadable_deepseek_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("data/shakespeare/shakespeare.txt")).unwrap();
    let corpus = tmp.path().join("c.txt");
    std::fs::write(&corpus, &text[..50_000]).unwrap();
    let out = tmp.path().join("tok");
    let (ok, _, stderr) = fathom(&[
        "tokenizer",
        "train",
        "--input",
        corpus.to_str().unwrap(),
        "--vocab-size",
        "400",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let t = fathom_core::TextTokenizer::from_dir(&out).unwrap();
    assert_eq!(t.vocab_size(), 400);
    assert!(t.chat_template.is_some());
}

/// `fathom bench --spec-prompts`: speculation measured over chat prompts from a JSONL file, the
/// acceptance per draft position summed over them; a line without a prompt is named.
#[test]
fn bench_measures_speculation_over_a_prompt_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &file,
        "{\"prompt\": \"What is 47 + 38?\"}\n{\"prompt\": \"What is 52 * 6?\", \"answer\": \"312\"}\n\n{\"prompt\": \"What is 98 - 34?\"}\n",
    )
    .unwrap();
    let (ok, out, err) = fathom(&[
        "bench",
        "--model",
        "models/default",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "48",
        "--repeat",
        "1",
        "--draft-tokens",
        "2",
        "--spec-prompts",
        file.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["spec_prompts"], 3, "{v}");
    let acc = v["mtp_acceptance"].as_array().unwrap();
    assert_eq!(acc.len(), 2, "{v}");
    assert!(acc
        .iter()
        .all(|a| (0.0..=1.0).contains(&a.as_f64().unwrap())));
    assert!(v["mtp_tokens_per_step"].as_f64().unwrap() >= 1.0, "{v}");
    assert!(v["spec_decode_tok_s"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["draft_modules"], 1, "{v}");

    // The default model has one MTP module: asking for two drafting modules names the flag.
    let (ok, _, err) = fathom(&[
        "generate",
        "--prompt",
        "hi",
        "--draft-tokens",
        "2",
        "--draft-modules",
        "2",
    ]);
    assert!(
        !ok && err.contains("--draft-modules 2") && err.contains("1 MTP module"),
        "{err}"
    );

    std::fs::write(&file, "{\"prompt\": \"hi\"}\n{\"question\": \"hi\"}\n").unwrap();
    let (ok, _, err) = fathom(&[
        "bench",
        "--model",
        "models/default",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "8",
        "--spec-prompts",
        file.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("prompts.jsonl:2") && err.contains("prompt"),
        "{err}"
    );
}

#[test]
fn bench_reports_the_llama_bench_keys_and_latent_kv_bytes() {
    let (ok, out, err) = fathom(&[
        "bench",
        "--model",
        "fixtures/deepseek_v3_tiny",
        "--prompt-tokens",
        "32",
        "--gen-tokens",
        "8",
        "--repeat",
        "1",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for key in ["prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_bytes"] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {v}");
    }
    // The latent cache: (kv_lora_rank 64 + rope 16) · 3 layers · 4 bytes, as inspect reports.
    assert_eq!(v["kv_bytes_per_token"], 960);
    assert_eq!(v["cache"], "latent");
    let (ok, out, err) = fathom(&[
        "bench",
        "--model",
        "fixtures/deepseek_v3_tiny",
        "--prompt-tokens",
        "32",
        "--gen-tokens",
        "8",
        "--repeat",
        "1",
        "--json",
        "--plain-cache",
        "--quant",
        "q8_0",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kv_bytes_per_token"], 3840);
    assert_eq!(v["quant"], "q8_0");
    let (ok, _, err) = fathom(&[
        "bench",
        "--model",
        "fixtures/deepseek_v3_tiny",
        "--prompt-tokens",
        "600",
    ]);
    assert!(!ok && err.contains("max_position_embeddings"), "{err}");
    let (ok, _, err) = fathom(&["generate", "--prompt", "hi", "--quant", "q3_x"]);
    assert!(!ok && err.contains("unknown quantisation"), "{err}");
}

#[test]
fn quantised_generation_reproduces_f32_greedy_tokens_on_the_fixture() {
    let prompt = reference_ids("deepseek_v3_tiny", "prompt_0");
    let want = reference_ids("deepseek_v3_tiny", "greedy_0");
    let (ok, out, err) = fathom(&[
        "generate",
        "--model",
        "fixtures/deepseek_v3_tiny",
        "--token-ids",
        &ids_arg(&prompt),
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--format",
        "json",
        "--quant",
        "q8_0",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let got: Vec<u32> = v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    // q8_0 keeps the first greedy tokens of the f32 reference.
    assert_eq!(got[..4], want[..4]);
}

fn generate_ids(model: &str, prompt: &str, extra: &[&str]) -> Vec<u32> {
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = fathom(&args);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn quantize_writes_a_directory_every_command_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("default-q8_0");
    let out_s = out.to_str().unwrap();
    let quantize = [
        "quantize",
        "--model",
        "models/default",
        "--to",
        "q8_0",
        "--out",
        out_s,
    ];
    let (ok, stdout, err) = fathom(&quantize);
    assert!(ok, "{err}");
    assert!(stdout.contains("q8_0"), "{stdout}");
    // Greedy text from the file equals quantising while loading (same blocks).
    assert_eq!(
        generate_ids(out_s, "ROMEO:", &[]),
        generate_ids("models/default", "ROMEO:", &["--quant", "q8_0"])
    );
    let (ok, info, err) = fathom(&["inspect", "--model", out_s, "--format", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert!(v["tensor_dtypes"]["Q8_0"].as_u64().unwrap() > 100, "{info}");
    assert_eq!(v["kv_bytes_per_token"], 1280);
    // Refuses to overwrite; unknown format is a clear error.
    let (ok, _, err) = fathom(&quantize);
    assert!(!ok && err.contains("not empty"), "{err}");
    let (ok, _, err) = fathom(&["quantize", "--to", "q3_x", "--out", "/tmp/never"]);
    assert!(!ok && err.contains("unknown quantisation"), "{err}");
}

#[test]
fn llama_cpp_gguf_files_run_with_their_own_tokenizer() {
    // A GGUF file converted by llama.cpp: tokenizer and template come from its metadata.
    let gguf = generate_ids("fixtures/gguf/qwen2_tiny.f32.gguf", "Hello there", &[]);
    let hf = generate_ids("fixtures/qwen2_tiny", "Hello there", &[]);
    assert_eq!(gguf, hf);
    let (ok, info, err) = fathom(&[
        "inspect",
        "--model",
        "fixtures/gguf/deepseek_v3_tiny.q8_0.gguf",
        "--format",
        "json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["architecture"], "deepseek_v3");
    assert_eq!(v["mtp_modules"], 0);
}

#[test]
fn eval_reports_accuracy_format_and_pass_at_k() {
    let (ok, out, err) = fathom(&[
        "eval",
        "--n",
        "2",
        "--k",
        "2",
        "--max-tokens",
        "8",
        "--format",
        "json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for key in ["accuracy", "format_rate", "pass_at_k"] {
        let x = v[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&x), "{key} {x}");
    }
    assert_eq!(v["n"], 2);
    assert_eq!(v["k"], 2);
    // User tasks from JSONL; a bad file names the line.
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("tasks.jsonl");
    std::fs::write(&f, "{\"prompt\": \"Say 4.\", \"answer\": \"4\"}\n").unwrap();
    let (ok, out, err) = fathom(&[
        "eval",
        "--task",
        f.to_str().unwrap(),
        "--n",
        "5",
        "--max-tokens",
        "4",
        "--format",
        "json",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("\"n\":1"), "{out}");
    std::fs::write(&f, "{\"prompt\": 1}\n").unwrap();
    let (ok, _, err) = fathom(&["eval", "--task", f.to_str().unwrap()]);
    assert!(!ok && err.contains("tasks.jsonl:1"), "{err}");
}

/// `fathom serve` on a free port answers, then stops cleanly on SIGTERM (graceful shutdown).
#[cfg(unix)]
#[test]
fn serve_answers_and_stops_on_sigterm() {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut child = Command::new(env!("CARGO_BIN_EXE_fathom"))
        .args(["serve", "--port", "0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in `{line}`"))
        .to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed().as_secs() < 30, "serve did not stop on SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "{rest}");
    assert!(rest.contains("stopped"), "{rest}");
}

/// `tasks` → `sft` → `grpo` → `distill` through the binary on the default model, tiny budgets:
/// every stage writes a loadable final checkpoint, metrics and a plot; bad options are errors
/// that say which.
#[test]
fn post_training_commands_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name).to_string_lossy().into_owned();
    let (ok, _, err) = fathom(&[
        "tasks",
        "--task",
        "arithmetic:2",
        "--n",
        "40",
        "--style",
        "worked",
        "--out",
        &p("sft.jsonl"),
    ]);
    assert!(ok, "{err}");
    let line = std::fs::read_to_string(p("sft.jsonl")).unwrap();
    assert!(line.lines().count() == 40 && line.contains("</think>\\n<answer>"));
    // A mixed cold start: a quarter of the problems worked, the rest answer-only, evenly spread.
    let (ok, _, err) = fathom(&[
        "tasks",
        "--task",
        "arithmetic:2",
        "--n",
        "40",
        "--style",
        "worked",
        "--worked-share",
        "0.25",
        "--out",
        &p("mixed.jsonl"),
    ]);
    assert!(ok, "{err}");
    let mixed = std::fs::read_to_string(p("mixed.jsonl")).unwrap();
    let worked: Vec<bool> = mixed
        .lines()
        .map(|l| !l.contains("<think>\\n</think>"))
        .collect();
    assert_eq!(worked.len(), 40);
    assert_eq!(worked.iter().filter(|&&w| w).count(), 10);
    assert!(worked
        .chunks(4)
        .all(|c| c.iter().filter(|&&w| w).count() == 1));
    // Same problems as the all-worked file, only the solutions differ.
    for (a, b) in line.lines().zip(mixed.lines()) {
        let question = |s: &str| {
            let v: serde_json::Value = serde_json::from_str(s).unwrap();
            v["messages"][0]["content"].as_str().unwrap().to_string()
        };
        assert_eq!(question(a), question(b));
    }
    let (ok, _, err) = fathom(&[
        "tasks",
        "--n",
        "4",
        "--worked-share",
        "1.5",
        "--out",
        &p("bad.jsonl"),
    ]);
    assert!(!ok && err.contains("--worked-share"), "{err}");
    let (ok, out, err) = fathom(&[
        "sft",
        "--data",
        &p("sft.jsonl"),
        "--out",
        &p("sft"),
        "--steps",
        "2",
        "--seq-len",
        "64",
        "--batch-size",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["steps"], 2);
    assert!(tmp.path().join("sft/final/model.safetensors").exists());
    assert!(tmp.path().join("sft/metrics.png").exists());
    let (ok, out, err) = fathom(&[
        "grpo",
        "--model",
        &p("sft/final"),
        "--task",
        "arithmetic:2",
        "--out",
        &p("grpo"),
        "--steps",
        "1",
        "--prompts",
        "2",
        "--group-size",
        "2",
        "--max-tokens",
        "6",
        "--eval-n",
        "2",
        "--eval-k",
        "1",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["steps"], 1);
    assert_eq!(v["evals"].as_array().unwrap().len(), 2, "{v}");
    // The default model's main layers are MoE: rollouts do not speculate unless asked.
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("grpo/run_config.json")).unwrap()).unwrap();
    assert_eq!(run["config"]["draft_tokens"], 0, "{run}");
    // Two steps of SFT do not teach the model to finish an answer, so every trace is cut off and
    // none is kept: distillation says so instead of training on nothing.
    let (ok, _, err) = fathom(&[
        "distill",
        "--teacher",
        &p("grpo/final"),
        "--student",
        "models/default",
        "--out",
        &p("student"),
        "--problems",
        "3",
        "--samples",
        "1",
        "--max-tokens",
        "6",
        "--steps",
        "1",
        "--seq-len",
        "64",
        "--batch-size",
        "2",
    ]);
    assert!(
        !ok && err.contains("produced no trace with reward"),
        "{err}"
    );
    // Trace distillation from the embedded default model, which reasons on sums: with
    // --require-reasoning every kept trace holds reasoning in <think>.
    std::fs::write(
        p("sums.jsonl"),
        "{\"prompt\": \"What is 47 + 38?\", \"answer\": \"85\"}\n\
         {\"prompt\": \"What is 28 + 89?\", \"answer\": \"117\"}\n\
         {\"prompt\": \"What is 12 + 45?\", \"answer\": \"57\"}\n",
    )
    .unwrap();
    let (ok, _, err) = fathom(&[
        "distill",
        "--teacher",
        "models/default",
        "--student",
        "models/default",
        "--out",
        &p("reasoned"),
        "--task",
        &p("sums.jsonl"),
        "--problems",
        "3",
        "--samples",
        "1",
        "--max-tokens",
        "48",
        "--require-reasoning",
        "--steps",
        "1",
        "--seq-len",
        "64",
        "--batch-size",
        "2",
        "--val-fraction",
        "0",
    ]);
    assert!(ok, "{err}");
    let traces = std::fs::read_to_string(p("reasoned/traces.jsonl")).unwrap();
    assert!(traces.lines().count() >= 1, "{err}");
    for line in traces.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let answer = v["messages"][1]["content"].as_str().unwrap();
        let thought = answer.split("</think>").next().unwrap();
        assert!(
            thought.trim_start_matches("<think>").trim().len() > 5,
            "{answer}"
        );
    }
    // Logit distillation on the SFT data: the V3 teacher's distributions into the student.
    let (ok, _, err) = fathom(&[
        "distill",
        "--teacher",
        &p("grpo/final"),
        "--student",
        "models/default",
        "--out",
        &p("kd"),
        "--mode",
        "logits",
        "--data",
        &p("sft.jsonl"),
        "--loss",
        "jsd",
        "--steps",
        "2",
        "--seq-len",
        "64",
        "--batch-size",
        "2",
    ]);
    assert!(ok, "{err}");
    assert!(tmp.path().join("kd/final/config.json").exists());
    for (args, want) in [
        (
            vec!["grpo", "--out", &p("x"), "--group-size", "1"],
            "--group-size",
        ),
        (
            vec!["sft", "--data", &p("missing.jsonl"), "--out", &p("y")],
            "missing.jsonl",
        ),
        (
            vec![
                "tasks",
                "--task",
                "countdown",
                "--style",
                "problems",
                "--out",
                &p("z"),
            ],
            "countdown",
        ),
    ] {
        let (ok, _, err) = fathom(&args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
}

/// Chat shows R1 reasoning apart from the answer.
#[test]
fn chat_sets_reasoning_apart_from_the_answer() {
    // The default model reasons on sums (GRPO taught it to): the template pre-fills <think>, so
    // what it writes first is reasoning, and the answer after </think> is shown apart.
    let text = chat_with_input(
        &["--max-tokens", "48", "--temperature", "0"],
        b"What is 47 + 38?\n/exit\n",
    );
    assert!(text.starts_with("[reasoning]\n"), "{text:?}");
    assert!(text.contains("\n[answer]\n<answer>"), "{text:?}");
}
