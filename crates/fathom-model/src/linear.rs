//! A projection y = x Wᵀ (+ b) whose weight is either a dense tensor (training, f32 inference) or a
//! llama.cpp block-quantised matrix multiplied by the runtime's int8 kernels
//! ([`fathom_runtime::QMatrix`], every common GGUF format, decode and prefill alike, on the stored
//! bytes). Quantisation happens tensor by tensor while loading, so a model is never held in f32
//! as a whole. A format whose block does not divide the input dimension falls back to q8_0
//! (32-wide blocks), else stays f32, as llama.cpp does for odd shapes. Weights a GGUF file already
//! stores block-quantised are used where they lie in the mapped file ([`WeightPlan::stored`]).

use crate::ops::linear;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use fathom_core::{StoredBlocks, WeightPlan, WeightQuant};
use fathom_runtime::{Format, QMatrix, WeightBytes};

/// From this many input rows on, a quantised projection expands its weight to f32 and runs the
/// f32 GEMM (long prefills); below it the int8 kernels run on the stored blocks. Measured
/// (`cargo run --release -p fathom-runtime --example qmatmul_bench -- 2048 2048 M`, 2 threads,
/// session 16), speed of the int8 GEMM over dequantise + f32 GEMM at M = 64, 128, 256, 512:
/// q4_K 2.3, 1.48, 0.98, 0.90×; q6_K 3.6, 1.69, 1.16, 0.94×; q8_0 1.8, 1.18, 0.69, 0.83×;
/// q4_0/q5_0 1.5, 1.0, 0.78, 0.55–0.70×. So formats with 256-weight blocks (the k-quants,
/// iq4_xs) switch at 256 rows, the 32-weight ones at 128; the formats not measured (q2_K, q3_K,
/// q5_K, q4_1, q5_1, iq4_nl, iq4_xs) follow their block width.
///
/// With AVX-512 VNNI the panel kernel runs from eight rows on and beats the f32 GEMM at every
/// batch measured (session 17, same bench, 2 threads, M = 128 / 512 / 2048: 1.9–3.8×,
/// 1.3–1.7×, 1.2–1.6× over all twelve formats), so there it never expands.
pub fn dequantize_from_rows(format: Format) -> usize {
    if fathom_runtime::Kernel::best().panels() {
        usize::MAX
    } else if format.block_elems() == 256 {
        256
    } else {
        128
    }
}

/// A host product y [rows, out] (row-major f32) as a tensor shaped like x [.., in] with its
/// last dimension `out`, on x's device in x's dtype.
fn host_output(y: Vec<f32>, x: &Tensor, out: usize) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1") = out;
    Tensor::from_vec(y, dims, &candle_core::Device::Cpu)?
        .to_device(x.device())?
        .to_dtype(x.dtype())
}

#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Quantized(QMatrix),
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

/// The runtime format of a candle block type (`None` for float types).
pub fn runtime_format(d: GgmlDType) -> Option<Format> {
    Some(match d {
        GgmlDType::Q4_0 => Format::Q4_0,
        GgmlDType::Q4_1 => Format::Q4_1,
        GgmlDType::Q5_0 => Format::Q5_0,
        GgmlDType::Q5_1 => Format::Q5_1,
        GgmlDType::Q8_0 => Format::Q8_0,
        GgmlDType::Q2K => Format::Q2K,
        GgmlDType::Q3K => Format::Q3K,
        GgmlDType::Q4K => Format::Q4K,
        GgmlDType::Q5K => Format::Q5K,
        GgmlDType::Q6K => Format::Q6K,
        _ => return None,
    })
}

/// The block format a matrix with `inp` columns is stored in when `quant` is asked for: `quant`
/// if its block divides the rows, else q8_0 (32-wide blocks), else `None` (stays float).
pub fn block_format_for(quant: WeightQuant, inp: usize) -> Option<GgmlDType> {
    [ggml_format(quant), GgmlDType::Q8_0]
        .into_iter()
        .find(|f| inp % f.block_size() == 0)
}

/// A candle-quantised tensor [out, in] as a runtime matrix (its bytes moved, not expanded).
pub fn qmatrix_from_qtensor(q: &QTensor) -> Result<QMatrix> {
    let (out, inp) = q.shape().dims2()?;
    let format = runtime_format(q.dtype())
        .ok_or_else(|| candle_core::Error::Msg(format!("{:?} is not a block format", q.dtype())))?;
    QMatrix::new(format, out, inp, WeightBytes::owned(q.data()?.into_owned()))
        .map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// Quantise a dense [out, in] weight, falling back to q8_0 or f32 when blocks do not fit.
pub fn quantize_weight(w: Tensor, quant: WeightQuant) -> Result<Weight> {
    match block_format_for(quant, w.dim(1)?) {
        Some(format) => {
            let q = QTensor::quantize(&w.to_dtype(DType::F32)?, format)?;
            Ok(Weight::Quantized(qmatrix_from_qtensor(&q)?))
        }
        None => Ok(Weight::Dense(w)),
    }
}

/// `{prefix}.weight` [out, inp] as the file stores it in blocks, when the plan reads a file
/// that does; `None` otherwise (a float tensor, or no file).
pub(crate) fn stored_weight(
    vb: &VarBuilder,
    plan: &WeightPlan,
    out: usize,
    inp: usize,
) -> Result<Option<QMatrix>> {
    let Some(stored) = &plan.stored else {
        return Ok(None);
    };
    let name = format!("{}.weight", vb.prefix());
    let q = stored
        .quantized(&name)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    q.map(|q| stored_matrix(&name, q, out, inp)).transpose()
}

/// A file's stored blocks as a runtime matrix of the expected shape, naming the tensor when the
/// format is unknown or the shape or byte count disagree.
fn stored_matrix(name: &str, b: StoredBlocks, out: usize, inp: usize) -> Result<QMatrix> {
    if b.dims != [out, inp] {
        candle_core::bail!(
            "tensor `{name}`: stored shape {:?}, the config implies [{out}, {inp}]",
            b.dims
        );
    }
    QMatrix::new(b.format, out, inp, b.bytes)
        .map_err(|e| candle_core::Error::Msg(format!("tensor `{name}` ({}): {e}", b.format)))
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
        if let Some(q) = stored_weight(&vb, plan, out, inp)? {
            return Ok(Linear {
                weight: Weight::Quantized(q),
                bias,
            });
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
            Weight::Quantized(q) => Self::forward_quantized(q, x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// x Wᵀ for a block-quantised W: the runtime's int8 kernels on the stored blocks below
    /// [`dequantize_from_rows`] rows (decode, speculative verification, small expert batches);
    /// from there on the weight is expanded to f32 once for the call and the f32 GEMM runs.
    fn forward_quantized(q: &QMatrix, x: &Tensor) -> Result<Tensor> {
        let k = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / k;
        if rows >= dequantize_from_rows(q.format()) {
            let w = Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), x.device())?;
            return linear(x, &w.to_dtype(x.dtype())?, None);
        }
        let host: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        host_output(q.matmul(&host, rows), x, q.rows())
    }

    /// The projections `layers` of one input x, as [`Linear::forward`] each: where two or more
    /// are block-quantised and run on the stored blocks, x goes to the host and is quantised
    /// once for all of them (attention's q/k/v, the MLP's gate/up).
    pub fn forward_shared(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let k = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / k;
        let on_blocks = |l: &Linear| match &l.weight {
            Weight::Quantized(q) => rows < dequantize_from_rows(q.format()),
            Weight::Dense(_) => false,
        };
        let shared: Vec<&QMatrix> = layers
            .iter()
            .filter(|l| on_blocks(l))
            .filter_map(|l| match &l.weight {
                Weight::Quantized(q) => Some(q),
                Weight::Dense(_) => None,
            })
            .collect();
        if shared.len() < 2 {
            return layers.iter().map(|l| l.forward(x)).collect();
        }
        let host: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut ys = QMatrix::matmul_shared(&shared, &host, rows).into_iter();
        layers
            .iter()
            .map(|l| {
                if !on_blocks(l) {
                    return l.forward(x);
                }
                let out = l.out_features();
                let y = host_output(ys.next().expect("one output per shared matrix"), x, out)?;
                match &l.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            })
            .collect()
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
            Weight::Quantized(q) => q.rows(),
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
            Weight::Quantized(q) => (q.format().name().to_lowercase(), q.bytes().len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn lin(out: usize, inp: usize, quant: WeightQuant, bias: bool, seed: u64) -> Linear {
        let w: Vec<f32> = (0..out * inp)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1999) as f32 / 999.5) - 1.0)
            .collect();
        let w = Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap();
        let bias = bias.then(|| Tensor::arange(0f32, out as f32, &Device::Cpu).unwrap());
        Linear {
            weight: quantize_weight(w, quant).unwrap(),
            bias,
        }
    }

    /// Projections of one input quantised once give what each gives alone, bias included, and
    /// a dense projection among them runs its own path.
    #[test]
    fn shared_input_projections_equal_separate_ones() {
        let (hid, rows) = (256, 19);
        let layers = [
            lin(64, hid, WeightQuant::Q8_0, true, 1),
            lin(32, hid, WeightQuant::Q4K, false, 2),
            lin(48, hid, WeightQuant::Q4_0, false, 3),
            Linear::dense_weight(Tensor::ones((8, hid), DType::F32, &Device::Cpu).unwrap()),
        ];
        let x: Vec<f32> = (0..rows * hid)
            .map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0)
            .collect();
        let x = Tensor::from_vec(x, (1, rows, hid), &Device::Cpu).unwrap();
        let refs: Vec<&Linear> = layers.iter().collect();
        let shared = Linear::forward_shared(&refs, &x).unwrap();
        for (l, y) in layers.iter().zip(&shared) {
            let want = l.forward(&x).unwrap();
            assert_eq!(y.dims(), want.dims());
            let diff = (y - &want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() <= 1e-5, "{diff}");
        }
    }
}
