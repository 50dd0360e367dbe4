//! GGUF interop: files converted by llama.cpp's own `convert_hf_to_gguf.py` (fixtures/gguf, made
//! by `tools/gguf/make_fixtures.sh`) load with the same logits as the safetensors path, their
//! quantised tensors are used as stored, the tokenizer rebuilt from GGUF metadata encodes as
//! tokenizer.json does, and damaged files fail with an error naming the file.

mod common;
use common::{fixture, max_abs_diff, relative_mean_error};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use fathom_core::{
    GgufCheckpoint, ModelConfig, RopeScaling, SourceBackend, TextTokenizer, WeightStore,
};
use fathom_model::decoder::FeedForward;
use fathom_model::linear::Weight;
use fathom_model::CausalLm;

const PROMPT: [u32; 12] = [0, 5, 17, 42, 99, 7, 3, 250, 31, 64, 12, 200];

fn logits(model: &CausalLm) -> Tensor {
    let ids = Tensor::new(&[PROMPT], &Device::Cpu).unwrap();
    model.forward(&ids, 0, None).unwrap().squeeze(0).unwrap()
}

/// The V3 fixture through the safetensors path, with mscale set to mscale_all_dim: llama.cpp's
/// converter stores only mscale_all_dim and every released DeepSeek model has them equal.
fn v3_safetensors_as_llama_cpp_sees_it() -> CausalLm {
    let dir = fixture("deepseek_v3_tiny");
    let mut cfg = ModelConfig::from_path(&dir).unwrap();
    if let Some(RopeScaling::Yarn {
        mscale,
        mscale_all_dim,
        ..
    }) = &mut cfg.rope_scaling
    {
        *mscale = *mscale_all_dim;
    } else {
        panic!("fixture uses YaRN");
    }
    let store = WeightStore::open(&dir).unwrap();
    let vb = VarBuilder::from_backend(Box::new(SourceBackend(store)), DType::F32, Device::Cpu);
    CausalLm::new(&cfg, vb, false).unwrap()
}

#[test]
fn deepseek2_f32_gguf_matches_safetensors() {
    let reference = v3_safetensors_as_llama_cpp_sees_it();
    let gguf = CausalLm::load(
        &fixture("gguf/deepseek_v3_tiny.f32.gguf"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    // The config llama.cpp's metadata describes is the fixture's (minus MTP, which it skips).
    let (a, b) = (&reference.cfg, &gguf.cfg);
    assert_eq!(a.mla, b.mla);
    assert_eq!(a.moe, b.moe);
    assert_eq!(a.rope_scaling, b.rope_scaling);
    assert_eq!(
        (a.vocab_size, a.hidden_size, a.num_hidden_layers),
        (b.vocab_size, b.hidden_size, b.num_hidden_layers)
    );
    assert!(gguf.mtp.is_empty());
    let d = max_abs_diff(&logits(&reference), &logits(&gguf));
    eprintln!("deepseek2 f32 GGUF vs safetensors: max |Δlogit| {d:.2e}");
    assert!(d < 1e-4, "max |Δlogit| {d}");

    // Decode through the latent cache agrees too (kv_b_proj rebuilt from attn_k_b/attn_v_b).
    let mut c1 = reference.new_cache();
    let mut c2 = gguf.new_cache();
    let ids = Tensor::new(&[PROMPT], &Device::Cpu).unwrap();
    reference.forward(&ids, 0, Some(&mut c1)).unwrap();
    gguf.forward(&ids, 0, Some(&mut c2)).unwrap();
    for (i, tok) in [9u32, 300, 45, 2, 77].iter().enumerate() {
        let t = Tensor::new(&[[*tok]], &Device::Cpu).unwrap();
        let pos = PROMPT.len() + i;
        let x = reference.forward(&t, pos, Some(&mut c1)).unwrap();
        let y = gguf.forward(&t, pos, Some(&mut c2)).unwrap();
        let d = max_abs_diff(&x, &y);
        assert!(d < 1e-4, "decode step {i}: max |Δlogit| {d}");
    }
}

#[test]
fn deepseek2_q8_0_gguf_uses_llama_cpp_blocks_as_stored() {
    let reference = logits(&v3_safetensors_as_llama_cpp_sees_it());
    let m = CausalLm::load(
        &fixture("gguf/deepseek_v3_tiny.q8_0.gguf"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let FeedForward::Moe(moe) = &m.layers[1].ffn else {
        panic!("layer 1 is MoE")
    };
    for lin in [
        &moe.experts[3].gate_proj,
        &moe.experts[15].down_proj,
        &m.lm_head,
    ] {
        match &lin.weight {
            Weight::Quantized(q) => assert_eq!(q.format(), fathom_runtime::Format::Q8_0),
            Weight::Dense(_) => panic!("a q8_0 tensor was expanded to floats"),
        }
    }
    let rel = relative_mean_error(&logits(&m), &reference);
    eprintln!(
        "deepseek2 q8_0 GGUF (llama.cpp-quantised) vs f32: mean |Δlogit|/mean |logit| {rel:.4}"
    );
    // Same bound as Fathom's own q8_0 (measured 0.025 there).
    assert!(rel < 0.05, "relative logit error {rel}");
}

/// Qwen2 and Llama GGUF logits against transformers' own logits for the same prompt.
#[test]
fn qwen2_and_llama_gguf_match_transformers() {
    for name in ["qwen2_tiny", "llama_tiny"] {
        let refs = candle_core::safetensors::load(
            fixture(name).join("reference.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let prompt: Vec<u32> = refs["prompt_0"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = &refs["logits_0"];
        let m = CausalLm::load(
            &fixture(&format!("gguf/{name}.f32.gguf")),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let ids = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let got = m.forward(&ids, 0, None).unwrap().squeeze(0).unwrap();
        let want = want.narrow(0, 0, prompt.len()).unwrap();
        let d = max_abs_diff(&got, &want);
        eprintln!("{name} GGUF vs transformers: max |Δlogit| {d:.2e}");
        assert!(d < 1e-4, "{name}: max |Δlogit| {d}");
    }
    // Llama's RoPE scaling arrives as `rope_freqs`, its q/k rows permuted: both undone.
    let m = CausalLm::load(
        &fixture("gguf/llama_tiny.f32.gguf"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(matches!(
        m.cfg.rope_scaling,
        Some(RopeScaling::FreqFactors { .. })
    ));
}

#[test]
fn tokenizer_from_gguf_metadata_encodes_like_tokenizer_json() {
    let ckpt = GgufCheckpoint::open(&fixture("gguf/deepseek_v3_tiny.f32.gguf")).unwrap();
    let from_gguf = ckpt.tokenizer().unwrap();
    let from_json = TextTokenizer::from_dir(&fixture("deepseek_v3_tiny")).unwrap();
    for text in [
        "Hello world, it's 2026!",
        "  spaces\tand\nnewlines\n\n",
        "<｜User｜>What is 12+30?<｜Assistant｜><think>\nadd</think>42",
        "ünïcödé 数字 123456",
    ] {
        assert_eq!(
            from_gguf.encode(text, false).unwrap(),
            from_json.encode(text, false).unwrap(),
            "{text:?}"
        );
    }
    assert_eq!(from_gguf.bos_id, from_json.bos_id);
    assert!(from_gguf.eos_ids.contains(&1));
    // The chat template travels in the metadata.
    let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
    let (a, _) = from_gguf.apply_chat_template(&msgs, None, true).unwrap();
    let (b, _) = from_json.apply_chat_template(&msgs, None, true).unwrap();
    assert_eq!(a, b);
}

#[test]
fn damaged_gguf_files_fail_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixture("gguf/qwen2_tiny.f32.gguf")).unwrap();

    let truncated = tmp.path().join("truncated.gguf");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let err = CausalLm::load(&truncated, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated.gguf"), "{err}");
    assert!(err.contains("truncated or corrupt"), "{err}");

    let bad_magic = tmp.path().join("bad_magic.gguf");
    let mut bytes = good.clone();
    bytes[..4].copy_from_slice(b"NOPE");
    std::fs::write(&bad_magic, &bytes).unwrap();
    let err = CausalLm::load(&bad_magic, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad_magic.gguf") && err.contains("not a readable GGUF"),
        "{err}"
    );

    let header_only = tmp.path().join("header_only.gguf");
    std::fs::write(&header_only, &good[..40]).unwrap();
    let err = CausalLm::load(&header_only, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("header_only.gguf"), "{err}");
}
