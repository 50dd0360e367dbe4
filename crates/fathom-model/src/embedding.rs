//! Token embeddings, x₀ = E[token]: a dense table (training, Hugging Face checkpoints), or the
//! block-quantised rows a GGUF file stores, expanded one looked-up row at a time — so a
//! 100k-token table stays at its size in the file (memory-mapped) instead of 4 bytes a weight
//! (DeepSeek-V3's 129280 × 7168 is 3.7 GB in f32).

use crate::linear::stored_weight;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use fathom_core::WeightPlan;
use fathom_runtime::QMatrix;

#[derive(Debug, Clone)]
pub enum Embeddings {
    Dense(Tensor),
    /// The stored rows; lookups come out in `dtype` on `device`.
    Blocks {
        table: QMatrix,
        device: Device,
        dtype: DType,
    },
}

impl Embeddings {
    /// `{prefix}.weight` [vocab, hidden]: the file's blocks when the plan reads a file that
    /// stores it block-quantised, else a dense tensor (N(0, 0.02) for fresh variables).
    pub fn load(vb: VarBuilder, vocab: usize, hidden: usize, plan: &WeightPlan) -> Result<Self> {
        if let Some(table) = stored_weight(&vb, plan, vocab, hidden)? {
            return Ok(Embeddings::Blocks {
                table,
                device: vb.device().clone(),
                dtype: vb.dtype(),
            });
        }
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        Ok(Embeddings::Dense(vb.get_with_hints(
            (vocab, hidden),
            "weight",
            init,
        )?))
    }

    /// Rows for `ids` (any shape): [..ids dims, hidden]. An id outside the table is an error.
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        let flat = ids.flatten_all()?;
        let mut dims = ids.dims().to_vec();
        dims.push(self.hidden());
        match self {
            Embeddings::Dense(t) => t.index_select(&flat, 0)?.reshape(dims),
            Embeddings::Blocks {
                table,
                device,
                dtype,
            } => {
                let ids: Vec<u32> = flat.to_dtype(DType::U32)?.to_vec1()?;
                let h = table.cols();
                let mut out = vec![0f32; ids.len() * h];
                for (row, &id) in out.chunks_exact_mut(h).zip(&ids) {
                    if id as usize >= table.rows() {
                        candle_core::bail!(
                            "token id {id} is outside the embedding table of {} rows",
                            table.rows()
                        );
                    }
                    table.dequantize_row(id as usize, row);
                }
                Tensor::from_vec(out, dims, &Device::Cpu)?
                    .to_device(device)?
                    .to_dtype(*dtype)
            }
        }
    }

    /// The dense table (training, writing a checkpoint); `None` for stored blocks.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Embeddings::Dense(t) => Some(t),
            Embeddings::Blocks { .. } => None,
        }
    }

    /// The whole table as a tensor (tests, export): expands stored blocks.
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            Embeddings::Dense(t) => Ok(t.clone()),
            Embeddings::Blocks { table, device, .. } => {
                Tensor::from_vec(table.dequantize(), (table.rows(), table.cols()), device)
            }
        }
    }

    pub fn hidden(&self) -> usize {
        match self {
            Embeddings::Dense(t) => t.dims().last().copied().unwrap_or(0),
            Embeddings::Blocks { table, .. } => table.cols(),
        }
    }

    /// Bytes of one row as held (a lookup reads one).
    pub fn row_bytes(&self) -> usize {
        match self {
            Embeddings::Dense(t) => self.hidden() * t.dtype().size_in_bytes(),
            Embeddings::Blocks { table, .. } => table.row_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_runtime::{Format, WeightBytes};

    /// A block table's lookup is the dequantised table's row, in the ids' shape; a bad id is an
    /// error naming it.
    #[test]
    fn block_rows_equal_the_expanded_table() {
        let (vocab, hidden) = (10, 64);
        let bytes: Vec<u8> = (0..vocab * hidden / 32 * 34)
            .map(|i| (i * 89 % 251) as u8)
            .enumerate()
            // Each q8_0 block opens with an f16 scale: keep it a small finite number.
            .map(|(i, b)| if i % 34 == 1 { 0x2c } else { b })
            .collect();
        let table = QMatrix::new(Format::Q8_0, vocab, hidden, WeightBytes::owned(bytes)).unwrap();
        let blocks = Embeddings::Blocks {
            table,
            device: Device::Cpu,
            dtype: DType::F32,
        };
        let dense = Embeddings::Dense(blocks.to_dense().unwrap());
        let ids = Tensor::new(&[[3u32, 9, 0], [1, 1, 7]], &Device::Cpu).unwrap();
        let (a, b) = (blocks.lookup(&ids).unwrap(), dense.lookup(&ids).unwrap());
        assert_eq!(a.dims(), &[2, 3, hidden]);
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
        assert!(a.iter().all(|v| v.is_finite()) && a.iter().any(|v| *v != 0.0));
        let bad = Tensor::new(&[[10u32]], &Device::Cpu).unwrap();
        let err = blocks.lookup(&bad).unwrap_err().to_string();
        assert!(err.contains("token id 10"), "{err}");
        assert_eq!(blocks.row_bytes(), hidden / 32 * 34);
    }
}
