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

fn ggml(q: WeightQuant) -> GgmlDType {
    match q {
        WeightQuant::Q8_0 => GgmlDType::Q8_0,
        WeightQuant::Q4_0 => GgmlDType::Q4_0,
        WeightQuant::Q4K => GgmlDType::Q4K,
        WeightQuant::Q6K => GgmlDType::Q6K,
    }
}

/// Quantise a dense [out, in] weight, falling back to q8_0 or f32 when blocks do not fit.
pub fn ggml_format(q: WeightQuant) -> GgmlDType {
    ggml(q)
}

pub fn quantize_weight(w: Tensor, quant: WeightQuant) -> Result<Weight> {
    let inp = w.dim(1)?;
    for format in [ggml(quant), GgmlDType::Q8_0] {
        if inp % format.block_size() == 0 {
            let q = QTensor::quantize(&w.to_dtype(candle_core::DType::F32)?, format)?;
            return Ok(Weight::Quantized {
                matmul: QMatMul::from_qtensor(q)?,
                format,
            });
        }
    }
    Ok(Weight::Dense(w))
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
        match &self.weight {
            Weight::Dense(w) => linear(x, w, self.bias.as_ref()),
            Weight::Quantized { matmul, .. } => {
                let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
                if rows >= DEQUANTIZE_FROM_ROWS {
                    // Prefill: candle's quantised kernel is a dot product per (row, column) with no
                    // tiling; expanding the weight once and running the f32 GEMM is several times
                    // faster once enough rows share it (docs/benchmarks.md).
                    if let QMatMul::QTensor(q) = matmul {
                        let w = q.dequantize(x.device())?;
                        return linear(x, &w, self.bias.as_ref());
                    }
                }
                if let (QMatMul::QTensor(q), true) =
                    (matmul, x.dtype() == DType::F32 && x.device().is_cpu())
                {
                    // Decode: Fathom's mat-vec kernel (crate::qgemv) when it covers the format.
                    let host: Vec<f32> = x.flatten_all()?.to_vec1()?;
                    if let Some(y) = crate::qgemv::gemv(q, &host, rows) {
                        let mut dims = x.dims().to_vec();
                        *dims.last_mut().expect("rank ≥ 1") = q.shape().dims()[0];
                        let y = Tensor::from_vec(y, dims, x.device())?;
                        return match &self.bias {
                            Some(b) => y.broadcast_add(b),
                            None => Ok(y),
                        };
                    }
                }
                let y = matmul.forward(&x.contiguous()?)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
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
