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
}

#[test]
fn chat_repl_keeps_history() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_fathom"))
        .args([
            "chat",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--format",
            "json",
        ])
        .current_dir(root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"Hi\nand again\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
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
