//! A planned decode step: one token of one sequence through the whole model, every buffer
//! allocated when the plan is made, the threads of the pool working through the layer together
//! (ggml's way: one hand-off per region, a spin barrier between steps — [`team`]).
//!
//! What `fathom-model` computes as ~300 candle ops per token (each allocating its output and
//! dispatching the pool) runs here as one region per layer:
//!
//! - RMSNorm and the activation quantisation (llama.cpp's q8_0 / q8_K rules) on one thread;
//! - the projections that read the same input (MLA's q / kv_a; GQA's q, k, v) shared out as one
//!   step, weight rows in ~16 KiB units;
//! - MLA's absorbed attention over the latent cache split over cached positions: chunks of
//!   positions for all heads at once, then each head's merge ([`kernels::mla_chunk`],
//!   [`kernels::mla_merge`]; [`kernels::mla_head`] is the one-head reference they are tested
//!   against);
//! - the selected experts' gate and up rows with SiLU·mul in one pass, their down-projections
//!   and the shared expert's summed in place per output row.
//!
//! Between regions the calling thread appends the step's cache rows through [`KvStore`] (the
//! engine's own caches, so prefix caching, speculation and batching share them). The model side
//! (`fathom-model`) describes its layers in these terms ([`Model`]); the plan is tested against
//! that plain candle path (`fathom-model/tests/planned_decode.rs`).

pub mod buffers;
pub mod kernels;
pub mod team;

use crate::quant::QMatrix;
use buffers::{kernel, Buf, Groups, Slot, Vector};
use candle_core::{CpuStorage, DType, Storage, Tensor};
pub use kernels::{HeadScratch, MlaDims, RopeLayout};
use std::ops::Range;
use std::sync::Mutex;
use team::{Member, Team};

/// A dense f32 matrix read where candle holds it (no copy; the tensor is checked once here).
#[derive(Debug, Clone)]
pub struct DenseF32 {
    tensor: Tensor,
    rows: usize,
    cols: usize,
}

impl DenseF32 {
    /// A 2-D (or 1-D: one row) f32 tensor on the CPU that no optimiser updates.
    pub fn new(t: &Tensor, what: &str) -> Result<Self, String> {
        if t.dtype() != DType::F32 || !t.device().is_cpu() {
            return Err(format!(
                "{what}: {:?} on {:?}, not f32 on the CPU",
                t.dtype(),
                t.device()
            ));
        }
        if t.is_variable() || t.track_op() {
            return Err(format!("{what}: a trained variable"));
        }
        let (rows, cols) = match t.dims() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            d => return Err(format!("{what}: shape {d:?}")),
        };
        if !t.is_contiguous() {
            return Err(format!("{what}: not contiguous"));
        }
        Ok(DenseF32 {
            tensor: t.clone(),
            rows,
            cols,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `f` on the values (rows × cols, row-major).
    pub fn with<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        let (guard, layout) = self.tensor.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(v)) = &*guard else {
            panic!("checked f32 CPU tensor changed storage");
        };
        let at = layout.start_offset();
        f(&v[at..at + self.rows * self.cols])
    }

    /// A copy of the values (small vectors: norms, biases).
    pub fn to_vec(&self) -> Vec<f32> {
        self.with(|v| v.to_vec())
    }
}

/// The weight of a projection.
#[derive(Debug, Clone)]
pub enum Matrix {
    Quant(QMatrix),
    Dense(DenseF32),
}

impl Matrix {
    pub fn rows(&self) -> usize {
        match self {
            Matrix::Quant(q) => q.rows(),
            Matrix::Dense(d) => d.rows(),
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Matrix::Quant(q) => q.cols(),
            Matrix::Dense(d) => d.cols(),
        }
    }

    /// The activation group its kernel reads (None: f32 input).
    pub fn group(&self) -> Option<usize> {
        match self {
            Matrix::Quant(q) => Some(q.format().act_group()),
            Matrix::Dense(_) => None,
        }
    }

    /// Row `r` as f32 into `out`.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        match self {
            Matrix::Quant(q) => q.dequantize_row(r, out),
            Matrix::Dense(d) => d.with(|v| out.copy_from_slice(&v[r * d.cols..][..d.cols])),
        }
    }

    fn row_bytes(&self) -> usize {
        match self {
            Matrix::Quant(q) => q.row_bytes(),
            Matrix::Dense(d) => d.cols() * 4,
        }
    }

    /// Rows per shared unit: ~256 KiB of weights, a multiple of 8 (the dense kernel's blocks,
    /// so a split never changes a result bit), at most [`MAX_UNIT`]. Units are long because the
    /// steps that read several matrices per unit (gate and up; the experts' downs summed per
    /// output row) switch weight streams once per unit, and each switch loses the hardware
    /// prefetcher's run: V2-Lite-sized Q4_K_M decode went from 13 to 16–18 tok/s (2 threads)
    /// between 16 KiB and 256 KiB units.
    fn unit(&self) -> usize {
        ((256 * 1024 / self.row_bytes().max(1)) / 8 * 8).clamp(8, MAX_UNIT)
    }
}

/// Rows of one unit of shared work (stack buffers hold a unit's partial results).
const MAX_UNIT: usize = 256;

/// y = x Wᵀ (+ b).
#[derive(Debug, Clone)]
pub struct Proj {
    pub w: Matrix,
    pub bias: Option<Vec<f32>>,
}

impl Proj {
    /// out[i] = row (rows.start + i) of the product, serially on this thread.
    ///
    /// # Safety
    /// `x` was quantised for this matrix's group (if any) before the last barrier.
    unsafe fn dot_rows(&self, x: &Vector, rows: Range<usize>, out: &mut [f32]) {
        match &self.w {
            Matrix::Quant(q) => {
                q.dot_rows(kernel(), x.acts(q.format().act_group()), rows.clone(), out)
            }
            Matrix::Dense(d) => {
                let k = d.cols();
                d.with(|w| {
                    crate::rows_matmul::matvec(x.values(), &w[rows.start * k..rows.end * k], out)
                })
            }
        }
        if let Some(b) = &self.bias {
            for (o, &b) in out.iter_mut().zip(&b[rows]) {
                *o += b;
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Norm {
    pub weight: Vec<f32>,
    pub eps: f64,
}

/// down(silu(gate x) ⊙ up x).
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate: Proj,
    pub up: Proj,
    pub down: Proj,
}

/// Chooses experts from the router's logits: pushes (expert, weight) pairs. The model side
/// supplies it, so routing has one definition (`fathom-model`'s `moe.rs`).
pub type Route = Box<dyn Fn(&[f32], &mut Vec<(usize, f32)>) + Send + Sync>;

pub struct Moe {
    pub router: DenseF32,
    pub route: Route,
    pub experts: Vec<Mlp>,
    pub shared: Option<Mlp>,
    pub top_k: usize,
}

impl std::fmt::Debug for Moe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Moe({} experts, top {})", self.experts.len(), self.top_k)
    }
}

#[derive(Debug)]
pub enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

#[derive(Debug, Clone)]
pub enum MlaQuery {
    Full(Proj),
    LowRank { a: Proj, norm: Norm, b: Proj },
}

#[derive(Debug, Clone)]
pub struct Mla {
    pub q: MlaQuery,
    pub kv_a: Proj,
    pub kv_a_norm: Norm,
    /// [heads·(nope + v), rank]: W_UK and W_UV per head.
    pub kv_b: DenseF32,
    pub o: Proj,
    pub heads: usize,
    pub dims: MlaDims,
    pub scale: f32,
}

#[derive(Debug, Clone)]
pub struct Gqa {
    pub q: Proj,
    pub k: Proj,
    pub v: Proj,
    pub o: Proj,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Debug)]
pub enum Attention {
    Mla(Mla),
    Gqa(Gqa),
}

#[derive(Debug)]
pub struct Layer {
    pub attn_norm: Norm,
    pub attn: Attention,
    pub ffn_norm: Norm,
    pub ffn: Ffn,
}

/// cos/sin tables [positions, rotary dim / 2] (the model's own, YaRN factor included).
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: DenseF32,
    pub sin: DenseF32,
    pub layout: RopeLayout,
}

#[derive(Debug)]
pub struct Model {
    /// [vocab, hidden]: dense, or the file's blocks (one row expanded per step).
    pub embed: Matrix,
    pub layers: Vec<Layer>,
    pub norm: Norm,
    pub lm_head: Proj,
    pub rope: RopeTables,
}

/// One layer's cache as the attention reads it (positions 0..len, this step's row included).
pub enum LayerKv<'a> {
    /// MLA: normalised c_kv [len, rank] and roped k_pe [len, rope] (rows contiguous).
    Latent { c_kv: &'a [f32], k_pe: &'a [f32] },
    /// GQA: k and v of kv head g at `g·stride ..` ([len, head_dim] each).
    Grouped {
        k: &'a [f32],
        v: &'a [f32],
        stride: usize,
    },
}

/// The engine's cache, as the plan appends to and reads it.
pub trait KvStore {
    /// Append this step's row of `layer`: MLA (c_kv, k_pe); GQA (k, v) of every kv head.
    fn append(&mut self, layer: usize, a: &[f32], b: &[f32]) -> Result<(), String>;
    /// Positions cached in `layer`.
    fn len(&self, layer: usize) -> usize;
    /// `f` on the layer's cache.
    fn with_layer(&self, layer: usize, f: &mut dyn FnMut(LayerKv<'_>)) -> Result<(), String>;
}

/// Buffers of the step, sized by the model when the plan is made.
struct Scratch {
    /// The residual stream [hidden].
    x: Buf,
    /// The normed input of attention or the FFN, with its int8 forms.
    h: Vector,
    /// Queries [heads · d_qk].
    q: Buf,
    /// q-LoRA: the down-projection's output, then (normed) the up-projection's input.
    qa_raw: Buf,
    qa: Vector,
    /// MLA: [c_kv ‖ k_pe] before norm and rope; GQA: k.
    kv: Buf,
    /// GQA: v.
    v: Buf,
    /// The rows this step appends to the cache.
    cache_a: Buf,
    cache_b: Buf,
    /// MLA: absorbed queries [heads, rank], roped q_pe [heads, rope], and the chunks' partial
    /// softmax states (resized between regions as the context grows).
    q_lat: Buf,
    q_pe: Buf,
    partials: Slot<Buf>,
    /// Attention output [heads · d_v] before o_proj.
    attn: Vector,
    /// A projection's output [hidden] before the residual add.
    tmp: Buf,
    /// FFN hidden activations: one slot per selected expert and one for the shared experts.
    act: Vec<Vector>,
    router_logits: Buf,
    routes: Slot<Vec<(usize, f32)>>,
    logits: Buf,
    /// Per thread: the attention kernels' scratch.
    heads: Vec<Mutex<HeadScratch>>,
}

/// A model planned for single-sequence decode (see the module header).
pub struct DecodePlan {
    model: Model,
    hidden: usize,
    vocab: usize,
    /// Per layer, the activation groups each input vector's readers want.
    groups: Vec<LayerGroups>,
    head_groups: Groups,
    state: Mutex<(Team, Scratch)>,
}

impl std::fmt::Debug for DecodePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DecodePlan({} layers)", self.model.layers.len())
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct LayerGroups {
    h_attn: Groups,
    qa: Groups,
    attn: Groups,
    h_ffn: Groups,
    act: Groups,
}

fn with_groups(g: Groups, projs: &[&Proj]) -> Groups {
    projs.iter().fold(g, |g, p| g.with(p.w.group()))
}

fn union(a: Groups, b: Groups) -> Groups {
    Groups {
        g32: a.g32 || b.g32,
        g256: a.g256 || b.g256,
    }
}

fn check(p: &Proj, rows: usize, cols: usize, what: &str) -> Result<(), String> {
    if p.w.rows() != rows || p.w.cols() != cols {
        return Err(format!(
            "{what}: [{}, {}], expected [{rows}, {cols}]",
            p.w.rows(),
            p.w.cols()
        ));
    }
    if p.bias.as_ref().is_some_and(|b| b.len() != rows) {
        return Err(format!("{what}: bias of {rows} expected"));
    }
    Ok(())
}

/// silu(g)·u = g·σ(g)·u.
fn swiglu(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

impl DecodePlan {
    /// Check the description's shapes and allocate the step's buffers.
    pub fn new(model: Model) -> Result<DecodePlan, String> {
        let hidden = model.embed.cols();
        let vocab = model.lm_head.w.rows();
        let (mut q_len, mut qa_len, mut kv_len, mut v_len, mut attn_len) = (0, 0, 0, 0, 0);
        let (mut act_len, mut slots, mut experts) = (0, 1, 0);
        let (mut lat_len, mut pe_len) = (0, 0);
        let mut groups = Vec::new();
        let half = model.rope.cos.cols();
        if model.rope.sin.cols() != half || model.rope.sin.rows() != model.rope.cos.rows() {
            return Err("rope tables: cos and sin differ in shape".into());
        }
        for (i, l) in model.layers.iter().enumerate() {
            let mut g = LayerGroups::default();
            let name = |what: &str| format!("layer {i} {what}");
            match &l.attn {
                Attention::Mla(m) => {
                    let d = m.dims;
                    let qk = m.heads * (d.nope + d.rope);
                    if d.rope != 2 * half {
                        return Err(name("rope dim vs the rope tables"));
                    }
                    match &m.q {
                        MlaQuery::Full(p) => {
                            check(p, qk, hidden, &name("q_proj"))?;
                            g.h_attn = with_groups(g.h_attn, &[p]);
                        }
                        MlaQuery::LowRank { a, norm, b } => {
                            let r = a.w.rows();
                            check(a, r, hidden, &name("q_a_proj"))?;
                            check(b, qk, r, &name("q_b_proj"))?;
                            if norm.weight.len() != r {
                                return Err(name("q_a_layernorm"));
                            }
                            g.h_attn = with_groups(g.h_attn, &[a]);
                            g.qa = with_groups(g.qa, &[b]);
                            qa_len = qa_len.max(r);
                        }
                    }
                    check(
                        &m.kv_a,
                        d.rank + d.rope,
                        hidden,
                        &name("kv_a_proj_with_mqa"),
                    )?;
                    if m.kv_a_norm.weight.len() != d.rank {
                        return Err(name("kv_a_layernorm"));
                    }
                    g.h_attn = with_groups(g.h_attn, &[&m.kv_a]);
                    if m.kv_b.rows() != m.heads * (d.nope + d.v) || m.kv_b.cols() != d.rank {
                        return Err(name("kv_b_proj shape"));
                    }
                    check(&m.o, hidden, m.heads * d.v, &name("o_proj"))?;
                    g.attn = with_groups(g.attn, &[&m.o]);
                    q_len = q_len.max(qk);
                    lat_len = lat_len.max(m.heads * d.rank);
                    pe_len = pe_len.max(m.heads * d.rope);
                    kv_len = kv_len.max(d.rank + d.rope);
                    attn_len = attn_len.max(m.heads * d.v);
                }
                Attention::Gqa(a) => {
                    let (h, kvh, d) = (a.heads, a.kv_heads, a.head_dim);
                    if kvh == 0 || h % kvh != 0 {
                        return Err(name(&format!("{h} heads over {kvh} kv heads")));
                    }
                    if d != 2 * half {
                        return Err(name("head dim vs the rope tables"));
                    }
                    check(&a.q, h * d, hidden, &name("q_proj"))?;
                    check(&a.k, kvh * d, hidden, &name("k_proj"))?;
                    check(&a.v, kvh * d, hidden, &name("v_proj"))?;
                    check(&a.o, hidden, h * d, &name("o_proj"))?;
                    g.h_attn = with_groups(g.h_attn, &[&a.q, &a.k, &a.v]);
                    g.attn = with_groups(g.attn, &[&a.o]);
                    q_len = q_len.max(h * d);
                    kv_len = kv_len.max(kvh * d);
                    v_len = v_len.max(kvh * d);
                    attn_len = attn_len.max(h * d);
                }
            }
            let mut mlps: Vec<&Mlp> = Vec::new();
            match &l.ffn {
                Ffn::Dense(m) => mlps.push(m),
                Ffn::Moe(moe) => {
                    if moe.router.cols() != hidden || moe.router.rows() != moe.experts.len() {
                        return Err(name("router shape"));
                    }
                    if moe.top_k == 0 || moe.top_k > moe.experts.len() {
                        return Err(name("top-k"));
                    }
                    mlps.extend(moe.experts.iter());
                    mlps.extend(moe.shared.iter());
                    slots = slots.max(moe.top_k + 1);
                    experts = experts.max(moe.experts.len());
                }
            }
            for m in mlps {
                let inter = m.gate.w.rows();
                check(&m.gate, inter, hidden, &name("gate_proj"))?;
                check(&m.up, inter, hidden, &name("up_proj"))?;
                check(&m.down, hidden, inter, &name("down_proj"))?;
                g.h_ffn = with_groups(g.h_ffn, &[&m.gate, &m.up]);
                g.act = union(g.act, with_groups(Groups::default(), &[&m.down]));
                act_len = act_len.max(inter);
            }
            for n in [&l.attn_norm, &l.ffn_norm] {
                if n.weight.len() != hidden {
                    return Err(name("norm width"));
                }
            }
            groups.push(g);
        }
        check(&model.lm_head, vocab, hidden, "lm_head")?;
        if model.norm.weight.len() != hidden {
            return Err("final norm width".into());
        }
        let team = Team::new();
        let scratch = Scratch {
            x: Buf::new(hidden),
            h: Vector::new(hidden),
            q: Buf::new(q_len),
            qa_raw: Buf::new(qa_len),
            qa: Vector::new(qa_len),
            kv: Buf::new(kv_len),
            v: Buf::new(v_len),
            cache_a: Buf::new(kv_len),
            cache_b: Buf::new(kv_len.max(v_len)),
            q_lat: Buf::new(lat_len),
            q_pe: Buf::new(pe_len),
            partials: Slot::new(Buf::new(0)),
            attn: Vector::new(attn_len),
            tmp: Buf::new(hidden),
            act: (0..slots).map(|_| Vector::new(act_len)).collect(),
            router_logits: Buf::new(experts),
            routes: Slot::new(Vec::with_capacity(slots)),
            logits: Buf::new(vocab),
            heads: (0..team.threads())
                .map(|_| Mutex::new(HeadScratch::default()))
                .collect(),
        };
        let head_groups = with_groups(Groups::default(), &[&model.lm_head]);
        Ok(DecodePlan {
            model,
            hidden,
            vocab,
            groups,
            head_groups,
            state: Mutex::new((team, scratch)),
        })
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    pub fn layers(&self) -> usize {
        self.model.layers.len()
    }

    /// Logits for `token` at position `pos` (every layer's cached length), appending this
    /// step's rows to `store`.
    pub fn step(
        &self,
        token: u32,
        pos: usize,
        store: &mut dyn KvStore,
    ) -> Result<Vec<f32>, String> {
        let m = &self.model;
        if token as usize >= m.embed.rows() {
            return Err(format!(
                "token {token} is outside the vocabulary of {}",
                m.embed.rows()
            ));
        }
        if pos >= m.rope.cos.rows() {
            return Err(format!(
                "position {pos} is past the context of {}",
                m.rope.cos.rows()
            ));
        }
        for l in 0..m.layers.len() {
            if store.len(l) != pos {
                return Err(format!(
                    "layer {l} caches {} positions but the step is at position {pos}",
                    store.len(l)
                ));
            }
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (team, s) = &mut *state;
        let s: &Scratch = s;
        let hid = self.hidden;
        // SAFETY: no region runs; x is written here alone.
        m.embed
            .row_into(token as usize, unsafe { s.x.part(0..hid) });
        team.run(|mb| self.front(0, pos, mb, s))?;
        let layers = m.layers.len();
        for l in 0..layers {
            // SAFETY: between regions; the front step wrote these rows.
            let (a, b) = unsafe { self.cache_rows(l, s) };
            store.append(l, a, b)?;
            if store.len(l) != pos + 1 {
                return Err(format!("layer {l}: the cache did not take the step's row"));
            }
            if let Attention::Mla(a) = &m.layers[l].attn {
                let need = (pos + 1).div_ceil(kernels::MLA_CHUNK) * a.heads * (2 + a.dims.rank);
                // SAFETY: no region runs.
                if unsafe { s.partials.get() }.len() < need {
                    unsafe { *s.partials.get_mut() = Buf::new(need.next_power_of_two()) };
                }
            }
            let mut result = Ok(());
            store.with_layer(l, &mut |kv| {
                result = team.run(|mb| {
                    self.back(l, pos, &kv, mb, s);
                    if l + 1 < layers {
                        self.front(l + 1, pos, mb, s);
                    } else {
                        self.head(mb, s);
                    }
                });
            })?;
            result?;
        }
        // SAFETY: no region runs.
        Ok(unsafe { s.logits.read(self.vocab) }.to_vec())
    }

    /// The rows this step appends to layer l's cache.
    ///
    /// # Safety
    /// Between regions.
    unsafe fn cache_rows<'s>(&self, l: usize, s: &'s Scratch) -> (&'s [f32], &'s [f32]) {
        match &self.model.layers[l].attn {
            Attention::Mla(m) => (s.cache_a.read(m.dims.rank), s.cache_b.read(m.dims.rope)),
            Attention::Gqa(a) => {
                let n = a.kv_heads * a.head_dim;
                (s.cache_a.read(n), s.cache_b.read(n))
            }
        }
    }

    /// cos/sin of position `pos`.
    fn rope_at<R>(&self, pos: usize, f: impl FnOnce(&[f32], &[f32]) -> R) -> R {
        let r = &self.model.rope;
        let half = r.cos.cols();
        r.cos.with(|c| {
            r.sin
                .with(|s| f(&c[pos * half..][..half], &s[pos * half..][..half]))
        })
    }

    // In the steps below every leader block writes while the other threads wait at the barrier
    // that follows it, and every shared step writes disjoint rows of its outputs: that is the
    // safety argument of each `unsafe` buffer access.

    /// Layer l up to its cache rows: the input norm, the projections, the rows to cache.
    fn front(&self, l: usize, pos: usize, mb: &Member, s: &Scratch) {
        let layer = &self.model.layers[l];
        let g = self.groups[l];
        let hid = self.hidden;
        mb.leader(|| unsafe {
            let n = &layer.attn_norm;
            kernels::rms_norm(s.x.read(hid), &n.weight, n.eps, s.h.f.part(0..hid));
            s.h.quantize(hid, g.h_attn);
        });
        mb.barrier();
        match &layer.attn {
            Attention::Mla(m) => {
                let d = m.dims;
                match &m.q {
                    MlaQuery::Full(p) => {
                        run_projs(mb, &[(p, &s.h, &s.q), (&m.kv_a, &s.h, &s.kv)]);
                        mb.barrier();
                    }
                    MlaQuery::LowRank { a, norm, b } => {
                        let r = a.w.rows();
                        run_projs(mb, &[(a, &s.h, &s.qa_raw), (&m.kv_a, &s.h, &s.kv)]);
                        mb.barrier();
                        mb.leader(|| unsafe {
                            kernels::rms_norm(
                                s.qa_raw.read(r),
                                &norm.weight,
                                norm.eps,
                                s.qa.f.part(0..r),
                            );
                            s.qa.quantize(r, g.qa);
                        });
                        mb.barrier();
                        run_projs(mb, &[(b, &s.qa, &s.q)]);
                        mb.barrier();
                    }
                }
                mb.leader(|| unsafe {
                    let kv = s.kv.read(d.rank + d.rope);
                    let n = &m.kv_a_norm;
                    kernels::rms_norm(&kv[..d.rank], &n.weight, n.eps, s.cache_a.part(0..d.rank));
                    let k_pe = s.cache_b.part(0..d.rope);
                    k_pe.copy_from_slice(&kv[d.rank..]);
                    self.rope_at(pos, |c, sn| {
                        kernels::rope(k_pe, c, sn, self.model.rope.layout)
                    });
                });
            }
            Attention::Gqa(a) => {
                run_projs(
                    mb,
                    &[(&a.q, &s.h, &s.q), (&a.k, &s.h, &s.kv), (&a.v, &s.h, &s.v)],
                );
                mb.barrier();
                mb.leader(|| unsafe {
                    let n = a.kv_heads * a.head_dim;
                    let k = s.cache_a.part(0..n);
                    k.copy_from_slice(s.kv.read(n));
                    self.rope_at(pos, |c, sn| {
                        for head in k.chunks_exact_mut(a.head_dim) {
                            kernels::rope(head, c, sn, self.model.rope.layout);
                        }
                    });
                    s.cache_b.part(0..n).copy_from_slice(s.v.read(n));
                });
            }
        }
        // The region ends here (the pool's join orders these writes before the append).
    }

    /// Layer l from attention over the cache (positions 0..=pos) to the end of its FFN.
    fn back(&self, l: usize, pos: usize, kv: &LayerKv, mb: &Member, s: &Scratch) {
        let layer = &self.model.layers[l];
        let g = self.groups[l];
        let hid = self.hidden;
        let t = pos + 1;
        let layout = self.model.rope.layout;
        let mut sc = s.heads[mb.tid].lock().unwrap_or_else(|e| e.into_inner());
        let sc = &mut *sc;
        match (&layer.attn, kv) {
            (Attention::Mla(m), LayerKv::Latent { c_kv, k_pe }) => {
                let d = m.dims;
                let (qk, h_n, r) = (d.nope + d.rope, m.heads, d.rank);
                let block = (d.nope + d.v) * r;
                let stride = 2 + r;
                let chunks = t.div_ceil(kernels::MLA_CHUNK);
                // SAFETY: sized for this t before the region (`step`).
                let partials = unsafe { s.partials.get() };
                m.kv_b.with(|w| {
                    // Absorb each head's query: q_lat = W_UKᵀ q_nope, q_pe roped.
                    mb.share(h_n, 1, |heads| {
                        for h in heads {
                            let qh = unsafe { &s.q.read(h_n * qk)[h * qk..][..qk] };
                            let q_pe = unsafe { s.q_pe.part(h * d.rope..(h + 1) * d.rope) };
                            q_pe.copy_from_slice(&qh[d.nope..]);
                            self.rope_at(pos, |c, sn| kernels::rope(q_pe, c, sn, layout));
                            let q_lat = unsafe { s.q_lat.part(h * r..(h + 1) * r) };
                            kernels::absorb_query(
                                &qh[..d.nope],
                                &w[h * block..][..d.nope * r],
                                q_lat,
                            );
                        }
                    });
                    mb.barrier();
                    // Cached positions in chunks, all heads per chunk (each c_kv row read once).
                    mb.share(chunks, 1, |cs| {
                        for ch in cs {
                            let p = ch * kernels::MLA_CHUNK..((ch + 1) * kernels::MLA_CHUNK).min(t);
                            let out = unsafe {
                                partials.part(ch * h_n * stride..(ch + 1) * h_n * stride)
                            };
                            kernels::mla_chunk(
                                d,
                                h_n,
                                unsafe { s.q_lat.read(h_n * r) },
                                unsafe { s.q_pe.read(h_n * d.rope) },
                                &c_kv[p.start * r..p.end * r],
                                &k_pe[p.start * d.rope..p.end * d.rope],
                                m.scale,
                                &mut sc.scores,
                                out,
                            );
                        }
                    });
                    mb.barrier();
                    // Merge the chunks per head and apply W_UV.
                    mb.share(h_n, 1, |heads| {
                        for h in heads {
                            let all = unsafe { partials.read(chunks * h_n * stride) };
                            let w_uv = &w[h * block + d.nope * r..][..d.v * r];
                            let out = unsafe { s.attn.f.part(h * d.v..(h + 1) * d.v) };
                            kernels::mla_merge(all, h_n, h, w_uv, &mut sc.o_lat, out);
                        }
                    });
                });
                mb.barrier();
                mb.leader(|| unsafe { s.attn.quantize(m.heads * d.v, g.attn) });
                mb.barrier();
                run_projs(mb, &[(&m.o, &s.attn, &s.tmp)]);
            }
            (Attention::Gqa(a), LayerKv::Grouped { k, v, stride }) => {
                let d = a.head_dim;
                let rep = a.heads / a.kv_heads;
                mb.share(a.heads, 1, |heads| {
                    for h in heads {
                        let mut q = std::mem::take(&mut sc.q_rope);
                        q.clear();
                        q.extend_from_slice(unsafe { &s.q.read(a.heads * d)[h * d..][..d] });
                        self.rope_at(pos, |c, sn| kernels::rope(&mut q, c, sn, layout));
                        let at = (h / rep) * stride;
                        let out = unsafe { s.attn.f.part(h * d..(h + 1) * d) };
                        kernels::gqa_head(&q, &k[at..at + t * d], &v[at..at + t * d], t, sc, out);
                        sc.q_rope = q;
                    }
                });
                mb.barrier();
                mb.leader(|| unsafe { s.attn.quantize(a.heads * d, g.attn) });
                mb.barrier();
                run_projs(mb, &[(&a.o, &s.attn, &s.tmp)]);
            }
            _ => panic!("layer {l}: the cache's kind does not match the attention"),
        }
        mb.barrier();
        mb.leader(|| unsafe {
            add_into(s.x.part(0..hid), s.tmp.read(hid));
            let n = &layer.ffn_norm;
            kernels::rms_norm(s.x.read(hid), &n.weight, n.eps, s.h.f.part(0..hid));
            s.h.quantize(hid, g.h_ffn);
            if let Ffn::Moe(moe) = &layer.ffn {
                let e = moe.experts.len();
                let logits = s.router_logits.part(0..e);
                moe.router
                    .with(|w| crate::rows_matmul::matvec(s.h.values(), w, logits));
                let routes = s.routes.get_mut();
                routes.clear();
                (moe.route)(logits, routes);
                routes.truncate(moe.top_k);
                routes.retain(|&(e, _)| e < moe.experts.len());
                // Expert order, as the plain path sums them.
                routes.sort_by_key(|&(e, _)| e);
            }
        });
        mb.barrier();
        match &layer.ffn {
            Ffn::Dense(mlp) => {
                gate_up(mb, &[(mlp, &s.h, &s.act[0])]);
                mb.barrier();
                mb.leader(|| unsafe { s.act[0].quantize(mlp.gate.w.rows(), g.act) });
                mb.barrier();
                run_projs(mb, &[(&mlp.down, &s.act[0], &s.tmp)]);
            }
            Ffn::Moe(moe) => {
                let routes = unsafe { s.routes.get() };
                let mut jobs: Vec<(&Mlp, &Vector, &Vector)> = routes
                    .iter()
                    .enumerate()
                    .map(|(j, &(e, _))| (&moe.experts[e], &s.h, &s.act[j]))
                    .collect();
                if let Some(sh) = &moe.shared {
                    jobs.push((sh, &s.h, &s.act[routes.len()]));
                }
                gate_up(mb, &jobs);
                mb.barrier();
                mb.share(jobs.len(), 1, |js| {
                    for j in js {
                        unsafe { jobs[j].2.quantize(jobs[j].0.gate.w.rows(), g.act) };
                    }
                });
                mb.barrier();
                let sums: Vec<(&Proj, &Vector, f32)> = jobs
                    .iter()
                    .enumerate()
                    .map(|(j, (mlp, _, act))| (&mlp.down, *act, routes.get(j).map_or(1.0, |r| r.1)))
                    .collect();
                down_sum(mb, &sums, &s.tmp, hid);
            }
        }
        mb.barrier();
        mb.leader(|| unsafe { add_into(s.x.part(0..hid), s.tmp.read(hid)) });
        // The next front (or the head) starts with a leader block: no barrier needed here.
    }

    /// The final norm and the logits.
    fn head(&self, mb: &Member, s: &Scratch) {
        let hid = self.hidden;
        mb.leader(|| unsafe {
            let n = &self.model.norm;
            kernels::rms_norm(s.x.read(hid), &n.weight, n.eps, s.h.f.part(0..hid));
            s.h.quantize(hid, self.head_groups);
        });
        mb.barrier();
        run_projs(mb, &[(&self.model.lm_head, &s.h, &s.logits)]);
    }
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}

/// Which job and rows a global unit index names, units numbered job after job.
fn locate(units: &[(usize, usize)], mut u: usize) -> (usize, Range<usize>) {
    for (j, &(unit, rows)) in units.iter().enumerate() {
        let n = rows.div_ceil(unit);
        if u < n {
            return (j, u * unit..((u + 1) * unit).min(rows));
        }
        u -= n;
    }
    unreachable!("unit index past the jobs")
}

/// One shared step over several projections: out = W·x for each (W, x, out).
fn run_projs(mb: &Member, jobs: &[(&Proj, &Vector, &Buf)]) {
    let units: Vec<(usize, usize)> = jobs
        .iter()
        .map(|(p, _, _)| (p.w.unit(), p.w.rows()))
        .collect();
    let total = units.iter().map(|&(u, r)| r.div_ceil(u)).sum();
    mb.share(total, 1, |range| {
        for u in range {
            let (j, rows) = locate(&units, u);
            let (p, x, out) = jobs[j];
            // SAFETY: this unit's rows are written by this thread alone; x was prepared before
            // the barrier preceding this step.
            unsafe { p.dot_rows(x, rows.clone(), out.part(rows)) };
        }
    });
}

/// The SwiGLU front of several MLPs in one shared step: act = silu(gate·x) ⊙ (up·x).
fn gate_up(mb: &Member, jobs: &[(&Mlp, &Vector, &Vector)]) {
    let units: Vec<(usize, usize)> = jobs
        .iter()
        .map(|(m, _, _)| (m.gate.w.unit().min(m.up.w.unit()), m.gate.w.rows()))
        .collect();
    let total = units.iter().map(|&(u, r)| r.div_ceil(u)).sum();
    let (mut g, mut up) = ([0f32; MAX_UNIT], [0f32; MAX_UNIT]);
    mb.share(total, 1, |range| {
        for u in range {
            let (j, rows) = locate(&units, u);
            let (m, x, act) = jobs[j];
            let n = rows.len();
            // SAFETY: as in `run_projs`.
            unsafe {
                m.gate.dot_rows(x, rows.clone(), &mut g[..n]);
                m.up.dot_rows(x, rows.clone(), &mut up[..n]);
                for (o, (&a, &b)) in act.f.part(rows).iter_mut().zip(g.iter().zip(&up)) {
                    *o = swiglu(a, b);
                }
            }
        }
    });
}

/// out = Σ_j c_j · (W_j · x_j) over output rows shared out (the experts' down-projections added
/// in place, in the order given).
fn down_sum(mb: &Member, jobs: &[(&Proj, &Vector, f32)], out: &Buf, rows: usize) {
    let unit = jobs
        .iter()
        .map(|(p, _, _)| p.w.unit())
        .min()
        .unwrap_or(MAX_UNIT);
    let (mut acc, mut part) = ([0f32; MAX_UNIT], [0f32; MAX_UNIT]);
    mb.share(rows.div_ceil(unit), 1, |range| {
        for u in range {
            let r = u * unit..((u + 1) * unit).min(rows);
            let n = r.len();
            acc[..n].fill(0.0);
            for &(p, x, c) in jobs {
                // SAFETY: as in `run_projs`.
                unsafe { p.dot_rows(x, r.clone(), &mut part[..n]) };
                for (a, &v) in acc[..n].iter_mut().zip(&part[..n]) {
                    *a += c * v;
                }
            }
            // SAFETY: this unit's rows of `out` are this thread's alone.
            unsafe { out.part(r) }.copy_from_slice(&acc[..n]);
        }
    });
}
