//! Hugging Face checkpoint directories, written atomically: everything goes into a hidden temporary
//! sibling directory, files are fsynced, then one `rename` puts it in place (an existing directory
//! is moved aside first and removed after). A crash leaves either the old or the new checkpoint.
//!
//! Layout: `config.json`, `model.safetensors` (f32, HF tensor names; MTP layers carry their
//! `embed_tokens` / `shared_head.head` copies as V3 checkpoints do), the tokenizer files, and for
//! training checkpoints `optimizer.safetensors` + `optimizer.json` + `trainer_state.json`.

use crate::error::{io_err, Result, TrainError};
use crate::optim::AdamW;
use crate::pretrain::TrainableModel;
use candle_core::Tensor;
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Write `config.json`, `model.safetensors` and copy the tokenizer files from `tokenizer_dir`;
/// `extra` writes any further files into the temporary directory before it is renamed.
pub fn write_checkpoint(
    dir: &Path,
    config: &Value,
    tensors: &[(String, Tensor)],
    tokenizer_dir: Option<&Path>,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;

    let cfg_path = tmp.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(config).unwrap())
        .map_err(io_err(&cfg_path))?;
    let weights = tmp.join("model.safetensors");
    let map: HashMap<&str, Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, &weights).map_err(|e| TrainError::Checkpoint {
        path: weights.clone(),
        msg: e.to_string(),
    })?;
    if let Some(tok) = tokenizer_dir {
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            let src = tok.join(f);
            if src.exists() {
                std::fs::copy(&src, tmp.join(f)).map_err(io_err(&src))?;
            }
        }
    }
    extra(&tmp)?;
    for entry in std::fs::read_dir(&tmp).map_err(io_err(&tmp))? {
        let p = entry.map_err(io_err(&tmp))?.path();
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&p))?;
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(io_err(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Step-numbered checkpoint directories under `root`, oldest first.
pub fn list_step_checkpoints(root: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .exists()
                .then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

pub fn step_dir(root: &Path, step: usize) -> PathBuf {
    root.join(format!("step-{step:07}"))
}

/// Write the training checkpoint `root/step-NNNNNNN/` (weights, tokenizer, optimizer state, any
/// `extra_files`, and `trainer_state.json` last, whose presence marks it complete), then remove
/// all but the newest `keep` step checkpoints. Pretraining and post-training both save this way.
pub fn save_step_checkpoint(
    root: &Path,
    step: usize,
    tm: &TrainableModel,
    opt: &AdamW,
    tokenizer_dir: &Path,
    state: &impl Serialize,
    extra_files: &[(&str, String)],
    keep: usize,
) -> Result<PathBuf> {
    let dir = step_dir(root, step);
    write_checkpoint(
        &dir,
        &tm.hf_config,
        &tm.checkpoint_tensors(),
        Some(tokenizer_dir),
        |tmp| {
            opt.save(&tm.params, &tmp.join("optimizer.safetensors"))?;
            for (name, contents) in extra_files {
                let p = tmp.join(name);
                std::fs::write(&p, contents).map_err(io_err(&p))?;
            }
            let p = tmp.join("trainer_state.json");
            std::fs::write(&p, serde_json::to_string_pretty(state).unwrap()).map_err(io_err(&p))
        },
    )?;
    for (_, old) in list_step_checkpoints(root).iter().rev().skip(keep.max(1)) {
        std::fs::remove_dir_all(old).map_err(io_err(old))?;
    }
    Ok(dir)
}
