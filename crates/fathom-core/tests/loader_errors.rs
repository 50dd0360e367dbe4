//! Bad checkpoints give errors that name the file and the tensor or field — never a panic.

use fathom_core::{ModelConfig, SourceBackend, WeightStore};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn copy_dir(src: &Path, dst: &Path) {
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("qwen2_tiny"), dir.path());
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();

    std::fs::write(&file, &bytes[..bytes.len() - 1000]).unwrap();
    let err = WeightStore::open(dir.path())
        .err()
        .expect("truncated file must fail")
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("invalid safetensors"),
        "{err}"
    );

    let mut corrupt = bytes.clone();
    corrupt[10] = b'!'; // inside the JSON header
    std::fs::write(&file, &corrupt).unwrap();
    let err = WeightStore::open(dir.path())
        .err()
        .expect("corrupt header must fail")
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    std::fs::write(&file, b"abc").unwrap();
    assert!(WeightStore::open(dir.path()).is_err());
}

#[test]
fn missing_tensor_and_shape_mismatch_name_the_tensor() {
    use candle_core::{DType, Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("qwen2_tiny"), dir.path());
    let file = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    tensors.remove("model.layers.1.mlp.down_proj.weight");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let vb_err = load_model_err(dir.path());
    assert!(
        vb_err.contains("model.layers.1.mlp.down_proj.weight") && vb_err.contains("missing"),
        "{vb_err}"
    );

    tensors.insert(
        "model.layers.1.mlp.down_proj.weight".into(),
        Tensor::zeros((96, 100), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let vb_err = load_model_err(dir.path());
    assert!(
        vb_err.contains("model.layers.1.mlp.down_proj.weight") && vb_err.contains("shape mismatch"),
        "{vb_err}"
    );
    assert!(vb_err.contains("model.safetensors"), "{vb_err}");
}

/// Load every tensor the way the model does, through the VarBuilder backend.
fn load_model_err(dir: &Path) -> String {
    use candle_nn::var_builder::SimpleBackend;
    let cfg = ModelConfig::from_path(dir).unwrap();
    let store = SourceBackend(WeightStore::open(dir).unwrap());
    let shape = (cfg.hidden_size, cfg.intermediate_size);
    let name = "model.layers.1.mlp.down_proj.weight";
    store
        .get(
            shape.into(),
            name,
            candle_nn::Init::Const(0.0),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .err()
        .expect("must fail")
        .to_string()
}

#[test]
fn fp8_without_scale_and_bad_index() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("deepseek_v3_tiny_fp8"), dir.path());
    // Drop a scale from its shard.
    let name = "model.layers.0.mlp.gate_proj.weight";
    for shard in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        let p = dir.path().join(shard);
        let data = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&data).unwrap();
        if st.tensor(&format!("{name}_scale_inv")).is_ok() {
            let kept: Vec<(String, safetensors::tensor::TensorView)> = st
                .tensors()
                .into_iter()
                .filter(|(n, _)| n != &format!("{name}_scale_inv"))
                .collect();
            let out = safetensors::serialize(kept, None).unwrap();
            std::fs::write(&p, out).unwrap();
        }
    }
    let store = WeightStore::open(dir.path()).unwrap();
    let err = store.load_f32(name).unwrap_err().to_string();
    assert!(err.contains(name) && err.contains("scale"), "{err}");

    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "nope.safetensors"}}"#,
    )
    .unwrap();
    let err = WeightStore::open(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains("model.safetensors.index.json") && err.contains("nope.safetensors"),
        "{err}"
    );
}

#[test]
fn config_errors_name_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("deepseek_v3_tiny/config.json")).unwrap(),
    )
    .unwrap();
    cfg.as_object_mut().unwrap().remove("qk_rope_head_dim");
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = ModelConfig::from_path(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("qk_rope_head_dim"),
        "{err}"
    );
    std::fs::write(dir.path().join("config.json"), "{").unwrap();
    assert!(ModelConfig::from_path(dir.path())
        .unwrap_err()
        .to_string()
        .contains("config.json"));
    let err = ModelConfig::from_path(&dir.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
}
