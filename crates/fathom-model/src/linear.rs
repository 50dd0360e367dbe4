//! A projection y = x Wᵀ (+ b) whose weight is either a dense tensor (training, f32 inference) or a
//! llama.cpp block-quantised matrix (q8_0, q6_k, q4_k, q4_0) multiplied by candle's quantised CPU
//! kernels. Quantisation happens tensor by tensor while loading, so a model is never held in f32
//! as a whole. A format whose block does not divide the input dimension falls back to q8_0
//! (32-wide blocks), else stays f32, as llama.cpp does for odd shapes. Weights a GGUF file already
//! stores block-quantised are used as stored ([`WeightPlan::stored`]).

use crate::ops::linear;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use fathom_core::{WeightPlan, WeightQuant};

/// From this many input rows on, a quantised projection expands its weight to f32 and uses the
/// f32 GEMM (prefill); below it (decode) it runs the quantised kernel.
pub const DEQUANTIZE_FROM_ROWS: usize = 32;

#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Quantized { matmul: QMatMul, format: GgmlDType },
}

#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

/// The GGML block type of a Fathom weight format.
pub fn ggml_format(q: WeightQuant) -> GgmlDType {
    match q {
        WeightQuant::Q8_0 => GgmlDType::Q8_0,
        WeightQuant::Q4_0 => GgmlDType::Q4_0,
        WeightQuant::Q4K => GgmlDType::Q4K,
        WeightQuant::Q6K => GgmlDType::Q6K,
    }
}

/// The block format a matrix with `inp` columns is stored in when `quant` is asked for: `quant`
/// if its block divides the rows, else q8_0 (32-wide blocks), else `None` (stays float).
pub fn block_format_for(quant: WeightQuant, inp: usize) -> Option<GgmlDType> {
    [ggml_format(quant), GgmlDType::Q8_0]
        .into_iter()
        .find(|f| inp % f.block_size() == 0)
}

/// Quantise a dense [out, in] weight, falling back to q8_0 or f32 when blocks do not fit.
pub fn quantize_weight(w: Tensor, quant: WeightQuant) -> Result<Weight> {
    match block_format_for(quant, w.dim(1)?) {
        Some(format) => {
            let q = QTensor::quantize(&w.to_dtype(DType::F32)?, format)?;
            Ok(Weight::Quantized {
                matmul: QMatMul::from_qtensor(q)?,
                format,
            })
        }
        None => Ok(Weight::Dense(w)),
    }
}

impl Linear {
    /// Load `{vb}.weight` [out, in] (and `{vb}.bias` [out] when `bias`): as stored when the file
    /// holds it block-quantised, else dense, quantised when the plan says so.
    pub fn load(
        vb: VarBuilder,
        out: usize,
        inp: usize,
        bias: bool,
        plan: &WeightPlan,
    ) -> Result<Self> {
        let bias = if bias {
            Some(vb.get_with_hints(out, "bias", candle_nn::Init::Const(0.0))?)
        } else {
            None
        };
        if let Some(stored) = &plan.stored {
            let name = format!("{}.weight", vb.prefix());
            let q = stored
                .quantized(&name)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            if let Some(q) = q {
                if q.shape().dims() != [out, inp] {
                    candle_core::bail!(
                        "tensor `{name}`: stored shape {:?}, the config implies [{out}, {inp}]",
                        q.shape().dims()
                    );
                }
                let format = q.dtype();
                return Ok(Linear {
                    weight: Weight::Quantized {
                        matmul: QMatMul::from_qtensor(q)?,
                        format,
                    },
                    bias,
                });
            }
        }
        let w = vb.get_with_hints(
            (out, inp),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let weight = match plan.quantize {
            Some(q) => quantize_weight(w, q)?,
            None => Weight::Dense(w),
        };
        Ok(Linear { weight, bias })
    }

    pub fn dense_weight(w: Tensor) -> Self {
        Linear {
            weight: Weight::Dense(w),
            bias: None,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Dense(w) => match crate::rows_matmul::matmul_rows(x, w)? {
                Some(y) => y,
                None => return linear(x, w, self.bias.as_ref()),
            },
            Weight::Quantized { matmul, .. } => Self::forward_quantized(matmul, x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// x Wᵀ for a block-quantised W: f32 GEMM over the expanded weight for prefill, Fathom's
    /// mat-vec kernel for decode where it covers the format, else candle's quantised matmul.
    fn forward_quantized(matmul: &QMatMul, x: &Tensor) -> Result<Tensor> {
        let QMatMul::QTensor(q) = matmul else {
            return matmul.forward(&x.contiguous()?);
        };
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
        if rows >= DEQUANTIZE_FROM_ROWS {
            // Prefill: candle's quantised kernel is a dot product per (row, column) with no
            // tiling; expanding the weight once and running the f32 GEMM is several times faster
            // once enough rows share it (docs/benchmarks.md).
            return linear(x, &q.dequantize(x.device())?, None);
        }
        if x.dtype() == DType::F32 && x.device().is_cpu() {
            let host: Vec<f32> = x.flatten_all()?.to_vec1()?;
            if let Some(y) = crate::qgemv::gemv(q, &host, rows) {
                let mut dims = x.dims().to_vec();
                *dims.last_mut().expect("rank ≥ 1") = q.shape().dims()[0];
                return Tensor::from_vec(y, dims, x.device());
            }
        }
        matmul.forward(&x.contiguous()?)
    }

    /// x [rows, in] (host f32) · Wᵀ through [`crate::rows_matmul`] when W is dense f32 without
    /// a bias and not trained; `None` otherwise.
    pub fn forward_host(&self, x: &[f32], rows: usize) -> Option<Vec<f32>> {
        match (&self.weight, &self.bias) {
            (Weight::Dense(w), None) => crate::rows_matmul::rows_times_weight(x, rows, w),
            _ => None,
        }
    }

    /// Output width (rows of W).
    pub fn out_features(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.dims()[0],
            Weight::Quantized { matmul, .. } => match matmul {
                QMatMul::QTensor(q) => q.shape().dims()[0],
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims()[0],
            },
        }
    }

    /// The dense weight, when not quantised (training reads it).
    pub fn dense(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::Quantized { .. } => None,
        }
    }

    /// (format name, bytes held) for reporting.
    pub fn storage(&self) -> (String, usize) {
        match &self.weight {
            Weight::Dense(w) => (
                format!("{:?}", w.dtype()).to_lowercase(),
                w.elem_count() * w.dtype().size_in_bytes(),
            ),
            Weight::Quantized { matmul, format } => {
                let bytes = match matmul {
                    QMatMul::QTensor(q) => q.storage_size_in_bytes(),
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                        t.elem_count() * t.dtype().size_in_bytes()
                    }
                };
                (format!("{format:?}").to_lowercase(), bytes)
            }
        }
    }
}
