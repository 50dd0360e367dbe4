//! Safetensors checkpoints: one `model.safetensors`, or shards named by `model.safetensors.index.json`.
//!
//! Files are memory-mapped and each tensor is converted on request, so peak memory stays near the
//! model's final size. FP8 e4m3 weights are dequantised with their `weight_scale_inv` block grid
//! (DeepSeek-V3 `README_WEIGHTS.md`: w = q · scale of its 128×128 block; edge blocks may be partial).
//! Wrapped in [`SourceBackend`], a [`WeightStore`] (or any [`TensorSource`], e.g. a GGUF file)
//! becomes a candle `VarBuilder` backend, so modules build from a `VarBuilder`.

use crate::error::{FathomError, Result};
use candle_core::{DType, Device, Shape, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, Metadata, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    meta: Metadata,
}

/// Raw, undecoded view of one stored tensor.
pub struct RawTensor<'a> {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
    pub file: &'a Path,
}

pub struct WeightStore {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// tensor name → shard index
    index: BTreeMap<String, usize>,
    /// FP8 block shape from `quantization_config.weight_block_size`.
    fp8_block: [usize; 2],
}

impl WeightStore {
    /// Open every safetensors file of a checkpoint directory (or a single `.safetensors` file).
    pub fn open(path: &Path) -> Result<Self> {
        let (dir, files) = if path.is_file() {
            (
                path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                vec![path.to_path_buf()],
            )
        } else {
            (path.to_path_buf(), Self::list_files(path)?)
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut index = BTreeMap::new();
        for (i, file) in files.iter().enumerate() {
            let shard = Self::open_shard(file)?;
            for name in shard.meta.tensors().keys() {
                if let Some(prev) = index.insert(name.clone(), i) {
                    return Err(FathomError::weights(
                        file,
                        name,
                        format!("also stored in {}", files[prev].display()),
                    ));
                }
            }
            shards.push(shard);
        }
        Ok(WeightStore {
            dir,
            shards,
            index,
            fp8_block: [128, 128],
        })
    }

    pub fn with_fp8_block(mut self, block: [usize; 2]) -> Self {
        self.fp8_block = block;
        self
    }

    fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| FathomError::io(&index_path, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| FathomError::Config {
                    file: index_path.clone(),
                    field: "<json>".into(),
                    msg: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| FathomError::Config {
                    file: index_path.clone(),
                    field: "weight_map".into(),
                    msg: "missing or not an object".into(),
                })?;
            let mut files: Vec<String> = Vec::new();
            for (tensor, f) in map {
                let f = f.as_str().ok_or_else(|| FathomError::Config {
                    file: index_path.clone(),
                    field: format!("weight_map.{tensor}"),
                    msg: "expected a file name".into(),
                })?;
                if !files.iter().any(|x| x == f) {
                    files.push(f.to_string());
                }
            }
            files.sort();
            let mut out = Vec::new();
            for f in files {
                let p = dir.join(&f);
                if !p.is_file() {
                    return Err(FathomError::Config {
                        file: index_path.clone(),
                        field: "weight_map".into(),
                        msg: format!("names shard {f}, which does not exist"),
                    });
                }
                out.push(p);
            }
            return Ok(out);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| FathomError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        found.sort();
        if found.is_empty() {
            return Err(FathomError::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no *.safetensors weights in this directory",
                ),
            ));
        }
        Ok(found)
    }

    fn open_shard(path: &Path) -> Result<Shard> {
        let file = File::open(path).map_err(|e| FathomError::io(path, e))?;
        // SAFETY: the checkpoint is read-only for our lifetime; a concurrent writer is user error, and
        // every access below is bounds-checked against the validated header.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| FathomError::io(path, e))?;
        // `deserialize` validates the header against the file length: truncated or corrupt → error.
        SafeTensors::deserialize(&mmap).map_err(|e| {
            FathomError::weights(path, "<header>", format!("invalid safetensors file: {e}"))
        })?;
        let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            FathomError::weights(path, "<header>", format!("invalid safetensors file: {e}"))
        })?;
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + n,
            meta,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The file a tensor would come from (for error messages), or the directory when absent.
    pub fn file_of(&self, name: &str) -> PathBuf {
        self.index
            .get(name)
            .map(|&i| self.shards[i].path.clone())
            .unwrap_or_else(|| self.dir.clone())
    }

    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| FathomError::weights(&self.dir, name, "missing from the checkpoint"))?;
        let shard = &self.shards[i];
        let info = shard.meta.info(name).expect("indexed tensor has info");
        let (a, b) = info.data_offsets;
        Ok(RawTensor {
            dtype: info.dtype,
            shape: info.shape.clone(),
            bytes: &shard.mmap[shard.data_start + a..shard.data_start + b],
            file: &shard.path,
        })
    }

    /// Load a tensor as f32 on the CPU, dequantising FP8 block weights.
    pub fn load_f32(&self, name: &str) -> Result<Tensor> {
        let raw = self.raw(name)?;
        let file = raw.file;
        let shape = Shape::from(raw.shape.clone());
        let dev = &Device::Cpu;
        let bad = |m: String| FathomError::weights(file, name, m);
        let t = match raw.dtype {
            StDtype::F32 => {
                Tensor::from_raw_buffer(raw.bytes, DType::F32, raw.shape.as_slice(), dev)?
            }
            StDtype::BF16 => {
                Tensor::from_raw_buffer(raw.bytes, DType::BF16, raw.shape.as_slice(), dev)?
                    .to_dtype(DType::F32)?
            }
            StDtype::F16 => {
                Tensor::from_raw_buffer(raw.bytes, DType::F16, raw.shape.as_slice(), dev)?
                    .to_dtype(DType::F32)?
            }
            StDtype::F64 => {
                Tensor::from_raw_buffer(raw.bytes, DType::F64, raw.shape.as_slice(), dev)?
                    .to_dtype(DType::F32)?
            }
            StDtype::F8_E4M3 => {
                let scale_name = format!("{name}_scale_inv");
                if !self.contains(&scale_name) {
                    return Err(bad(format!(
                        "FP8 weight without its block scales `{scale_name}`"
                    )));
                }
                let scale = self.load_f32(&scale_name)?;
                let values = dequantize_fp8_blocks(raw.bytes, &raw.shape, &scale, self.fp8_block)
                    .map_err(|m| bad(m))?;
                Tensor::from_vec(values, shape, dev)?
            }
            other => {
                return Err(bad(format!(
                    "unsupported dtype {other:?} for a float tensor"
                )))
            }
        };
        Ok(t)
    }

    /// Size in bytes and dtype of every tensor, for inspection.
    pub fn summary(&self) -> HashMap<String, (StDtype, Vec<usize>)> {
        let mut out = HashMap::new();
        for (name, &i) in &self.index {
            let info = self.shards[i].meta.info(name).expect("indexed");
            out.insert(name.clone(), (info.dtype, info.shape.clone()));
        }
        out
    }
}

/// w[r, c] = e4m3(q[r, c]) · scale[r / br, c / bc]  — exact in f32, as the reference does it.
pub fn dequantize_fp8_blocks(
    bytes: &[u8],
    shape: &[usize],
    scale: &Tensor,
    block: [usize; 2],
) -> std::result::Result<Vec<f32>, String> {
    if shape.len() != 2 {
        return Err(format!(
            "FP8 block weights must be 2-D, found shape {shape:?}"
        ));
    }
    let (rows, cols) = (shape[0], shape[1]);
    let (br, bc) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
    if scale.dims() != [br, bc] {
        return Err(format!(
            "scale grid {:?} does not match weight {shape:?} in {}×{} blocks (expected [{br}, {bc}])",
            scale.dims(),
            block[0],
            block[1]
        ));
    }
    let scale: Vec<f32> = scale
        .flatten_all()
        .and_then(|s| s.to_vec1())
        .map_err(|e| e.to_string())?;
    // 256-entry table: every e4m3 bit pattern decoded once.
    let lut: Vec<f32> = (0..=255u8)
        .map(|b| float8::F8E4M3::from_bits(b).to_f32())
        .collect();
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let srow = &scale[(r / block[0]) * bc..(r / block[0] + 1) * bc];
        let qrow = &bytes[r * cols..(r + 1) * cols];
        for (c, &q) in qrow.iter().enumerate() {
            out.push(lut[q as usize] * srow[c / block[1]]);
        }
    }
    Ok(out)
}

/// What a checkpoint format provides to model construction: HF-named tensors as f32 (converted to
/// the requested dtype by [`SourceBackend`]).
pub trait TensorSource: Send + Sync {
    /// Tensor `name` as f32 on the CPU.
    fn load_f32(&self, name: &str) -> Result<Tensor>;
    fn contains(&self, name: &str) -> bool;
    /// The file `name` comes from, for error messages.
    fn file_of(&self, name: &str) -> PathBuf;

    /// Tensor `name` checked against `shape`, converted to `dtype` on `dev`.
    fn load(&self, name: &str, shape: &Shape, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.load_f32(name)?;
        if t.shape() != shape {
            return Err(FathomError::weights(
                &self.file_of(name),
                name,
                format!(
                    "shape mismatch: checkpoint has {:?}, the config implies {:?}",
                    t.dims(),
                    shape.dims()
                ),
            ));
        }
        Ok(t.to_dtype(dtype)?.to_device(dev)?)
    }
}

impl TensorSource for WeightStore {
    fn load_f32(&self, name: &str) -> Result<Tensor> {
        WeightStore::load_f32(self, name)
    }
    fn contains(&self, name: &str) -> bool {
        WeightStore::contains(self, name)
    }
    fn file_of(&self, name: &str) -> PathBuf {
        WeightStore::file_of(self, name)
    }
}

/// Adapts any [`TensorSource`] to candle's `VarBuilder`, keeping its error messages (file and
/// tensor named).
pub struct SourceBackend<S>(pub S);

impl<S: TensorSource> candle_nn::var_builder::SimpleBackend for SourceBackend<S> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .load(name, &s, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0
            .load_f32(name)
            .and_then(|t| Ok(t.to_dtype(dtype)?.to_device(dev)?))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}
