//! Block-quantised matrices and their products with f32 activations, for every common GGUF
//! format ([`Format`]): the activations are quantised to int8 once per call
//! ([`QuantizedActs`]), each weight row's blocks are unpacked once per tile of up to four
//! activation rows, and the rows of W are split over the thread pool. Decode (one row) and
//! prefill (hundreds of rows) run the same kernels; the weights are read in their stored bytes,
//! never expanded to f32 ([`QMatrix::matmul`]). AVX2 where the CPU has it, else the portable
//! kernel ([`Kernel`]).

mod activation;
#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod blocks;
mod format;
mod portable;

pub use activation::{ActPanels, ActRow, Panel, QuantizedActs, PANEL_ROWS};
pub use blocks::{decode_chunk, dequantize};
pub use format::Format;

use crate::parallel::{for_chunks, SharedOut};
use std::sync::Arc;

/// Bytes of a weight matrix: owned, or a range of something shared — typically the
/// memory-mapped checkpoint, so a stored tensor is used where it lies (zero-copy).
#[derive(Clone)]
pub struct WeightBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl WeightBytes {
    pub fn owned(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        WeightBytes {
            owner: Arc::new(bytes),
            start: 0,
            len,
        }
    }

    /// `range` of `owner`'s bytes; `None` when it lies outside them.
    pub fn shared(
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        range: std::ops::Range<usize>,
    ) -> Option<Self> {
        let total = (*owner).as_ref().len();
        (range.start <= range.end && range.end <= total).then(|| WeightBytes {
            owner,
            start: range.start,
            len: range.end - range.start,
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBytes({} bytes)", self.len)
    }
}

/// Which kernel runs the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The AVX2 kernel with AVX-512 VNNI's dot-product instructions on 256-bit vectors, and the
    /// 32 registers AVX-512 gives: tiles of [`Kernel::row_tile`] = 8 activation rows.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU runs, chosen at run time.
    pub fn best() -> Kernel {
        // Asked per product: detected once, not a fresh list each call.
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| *Kernel::available().last().expect("the portable kernel"))
    }

    /// Every kernel this CPU runs, slowest (the portable reference) first.
    pub fn available() -> Vec<Kernel> {
        let mut all = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::supported() {
                all.push(Kernel::Avx2);
            }
            if avx2::vnni_supported() {
                all.push(Kernel::Avx512Vnni);
            }
        }
        all
    }

    /// Whether this CPU runs `self`.
    pub fn supported(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::supported(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => avx2::vnni_supported(),
        }
    }

    /// Activation rows per tile of a product: each unpacked weight chunk is multiplied with this
    /// many rows while it sits in registers — as many as the accumulators fit (16 vector
    /// registers hold four rows' sums, 32 hold eight). The offset formats (q4_1, q5_1) keep
    /// four rows on VNNI too: their per-block min term is a scalar chain per row that measured
    /// slower at eight (qmatmul_bench, session 17: 23.5 vs 30.9 GMAC/s for q4_1).
    pub fn row_tile(self, format: Format) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni if !matches!(format, Format::Q4_1 | Format::Q5_1) => 8,
            _ => 4,
        }
    }

    /// Whether this kernel multiplies whole [`Panel`]s of eight activation rows.
    pub fn panels(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Avx512Vnni {
            return true;
        }
        false
    }

    /// One weight row `w` against NP panels of eight activation rows.
    fn dot_panels<const NP: usize>(
        self,
        f: Format,
        w: &[u8],
        panels: [Panel; NP],
    ) -> [[f32; PANEL_ROWS]; NP] {
        match self {
            // SAFETY: `matmul_acts` checked the CPU features and the widths.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { avx2::dot_panels(f, w, panels) },
            _ => unreachable!("{self:?} has no panel kernel"),
        }
    }

    /// out[i] = weight row i of `w` (rows of `rb` bytes) · `x`: the whole loop inside one
    /// call of the kernel (per-row calls and slicing were ~5 % of a decode step).
    fn dot_each_row(self, f: Format, w: &[u8], rb: usize, x: ActRow, out: &mut [f32]) {
        debug_assert_eq!(w.len(), rb * out.len());
        match self {
            Kernel::Portable => {
                for (o, row) in out.iter_mut().zip(w.chunks_exact(rb)) {
                    *o = portable::dot_row(f, row, &[x])[0];
                }
            }
            // SAFETY: the callers checked the CPU features and that x covers a row.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::dot_each_row(f, w, rb, x, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { avx2::dot_each_row_vnni(f, w, rb, x, out) },
        }
    }

    /// One weight row `w` against activation rows r0..r0 + R.
    fn dot_tile<const R: usize>(
        self,
        f: Format,
        w: &[u8],
        acts: &QuantizedActs,
        r0: usize,
    ) -> [f32; R] {
        let rows: [ActRow; R] = std::array::from_fn(|i| acts.row(r0 + i));
        match self {
            Kernel::Portable => portable::dot_row(f, w, &rows),
            // SAFETY: `matmul_acts` checked that the CPU has the features; activation rows
            // cover the row width (it checked `acts.k` against the matrix columns).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::dot_row(f, w, &rows) },
            // SAFETY: as above, for the VNNI features.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { avx2::dot_row_vnni(f, w, &rows) },
        }
    }
}

/// A row-major [rows, cols] matrix in a block format (each row whole blocks).
#[derive(Debug, Clone)]
pub struct QMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    bytes: WeightBytes,
}

/// Why bytes are not a matrix of the given shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShapeError {
    Width { cols: usize, block: usize },
    Length { expected: usize, found: usize },
}

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShapeError::Width { cols, block } => {
                write!(
                    f,
                    "row width {cols} is not a multiple of the format's block of {block}"
                )
            }
            ShapeError::Length { expected, found } => {
                write!(f, "expected {expected} bytes for the shape, found {found}")
            }
        }
    }
}

impl std::error::Error for ShapeError {}

impl QMatrix {
    pub fn new(
        format: Format,
        rows: usize,
        cols: usize,
        bytes: WeightBytes,
    ) -> Result<Self, ShapeError> {
        let block = format.block_elems();
        if cols % block != 0 {
            return Err(ShapeError::Width { cols, block });
        }
        let expected = rows * (cols / block) * format.block_bytes();
        if bytes.len() != expected {
            return Err(ShapeError::Length {
                expected,
                found: bytes.len(),
            });
        }
        Ok(QMatrix {
            format,
            rows,
            cols,
            bytes,
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn bytes(&self) -> &WeightBytes {
        &self.bytes
    }
    pub fn row_bytes(&self) -> usize {
        self.cols / self.format.block_elems() * self.format.block_bytes()
    }

    /// Row `r`'s stored blocks.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.bytes.as_slice()[r * rb..(r + 1) * rb]
    }

    /// Row `r` expanded to f32 into `out` (cols values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        dequantize(self.format, self.row(r), out);
    }

    /// The whole matrix as f32 [rows, cols].
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        let dst = SharedOut(out.as_mut_ptr());
        let cols = self.cols;
        // Rows split over the pool (prefill expands each weight once per call).
        for_chunks(
            self.rows,
            self.rows * cols,
            |rows: std::ops::Range<usize>| {
                // SAFETY: each chunk writes its own rows.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(dst.at(rows.start * cols), rows.len() * cols)
                };
                let rb = self.row_bytes();
                let bytes = &self.bytes.as_slice()[rows.start * rb..rows.end * rb];
                dequantize(self.format, bytes, out);
            },
        );
        out
    }

    /// Rows `idx` as f32 (embedding lookups).
    pub fn dequantize_rows(&self, idx: &[usize]) -> Vec<f32> {
        let mut out = vec![0f32; idx.len() * self.cols];
        for (dst, &r) in out.chunks_exact_mut(self.cols).zip(idx) {
            dequantize(self.format, self.row(r), dst);
        }
        out
    }

    /// out[i] = W[rows.start + i] · (activation row 0): one thread's share of a matrix in a
    /// planned decode step (`crate::decode`), serially, weight row by weight row.
    pub fn dot_rows(
        &self,
        kernel: Kernel,
        acts: &QuantizedActs,
        rows: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        assert_eq!(acts.k, self.cols, "activation width vs matrix columns");
        assert_eq!(acts.group, self.format.act_group(), "activation group");
        assert!(acts.rows >= 1 && rows.end <= self.rows && out.len() == rows.len());
        assert!(
            kernel.supported(),
            "{kernel:?} asked for on a CPU without it"
        );
        let rb = self.row_bytes();
        let w = &self.bytes.as_slice()[rows.start * rb..rows.end * rb];
        kernel.dot_each_row(self.format, w, rb, acts.row(0), out);
    }

    /// y [m, rows] = x [m, cols] · Wᵀ with the best kernel.
    ///
    /// The quantised activations live in a buffer of the calling thread, kept between calls: a
    /// fresh one per projection cost its page faults again every call (a prefill's are MBs).
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut ys = QMatrix::matmul_shared(&[self], x, m);
        ys.pop().expect("one matrix, one output")
    }

    /// yᵢ = x · Wᵢᵀ for several matrices of the same input (q/k/v, gate/up): x is quantised
    /// once per activation group the formats want, not once per matrix.
    pub fn matmul_shared(mats: &[&QMatrix], x: &[f32], m: usize) -> Vec<Vec<f32>> {
        let mut ys: Vec<Vec<f32>> = mats.iter().map(|w| vec![0f32; m * w.rows]).collect();
        with_scratch(&ACTS_BUF, |acts| {
            let mut done = vec![false; mats.len()];
            for i in 0..mats.len() {
                if done[i] {
                    continue;
                }
                let (group, cols) = (mats[i].format.act_group(), mats[i].cols);
                acts.quantize_into(x, m, cols, group);
                for j in i..mats.len() {
                    let w = mats[j];
                    if !done[j] && w.format.act_group() == group && w.cols == cols {
                        w.matmul_acts(Kernel::best(), acts, &mut ys[j]);
                        done[j] = true;
                    }
                }
            }
        });
        ys
    }

    /// y [acts.rows, rows] = acts · Wᵀ into `y` with `kernel`.
    ///
    /// Weight rows are split over the pool in chunks; inside a chunk, every tile of
    /// [`Kernel::row_tile`] activation rows passes over the chunk's weight rows, which stay in
    /// cache.
    pub fn matmul_acts(&self, kernel: Kernel, acts: &QuantizedActs, y: &mut [f32]) {
        assert_eq!(acts.k, self.cols, "activation width vs matrix columns");
        assert!(
            kernel.supported(),
            "{kernel:?} asked for on a CPU without it"
        );
        assert_eq!(
            acts.group,
            self.format.act_group(),
            "{} wants activation groups of {}",
            self.format,
            self.format.act_group()
        );
        let (m, n) = (acts.rows, self.rows);
        assert_eq!(y.len(), m * n, "output length");
        let dst = SharedOut(y.as_mut_ptr());
        // Weight rows per scheduling unit: enough that a unit's bytes (~16 KiB) amortise the
        // activation tiles streamed past them, few enough to balance two threads on small n.
        let unit = (16 * 1024 / self.row_bytes().max(1)).clamp(4, 64);
        let units = n.div_ceil(unit);
        let tile = kernel.row_tile(self.format);
        // VNNI with eight rows or more: whole panels of eight interleaved rows, the rest in
        // tiles (the buffer is the calling thread's, kept between calls).
        let use_panels = kernel.panels() && m >= PANEL_ROWS;
        with_scratch(&PANEL_BUF, |panels| {
            if use_panels {
                panels.build_from(acts);
            } else {
                panels.panels = 0;
            }
            let panels: &ActPanels = panels;
            let run = |range: std::ops::Range<usize>| {
                for u in range {
                    let rows = u * unit..((u + 1) * unit).min(n);
                    // Two panels at a time (each unpacked chunk and broadcast serves sixteen
                    // rows), then the odd one.
                    let mut pi = 0;
                    while pi < panels.panels {
                        let two = pi + 1 < panels.panels;
                        for wr in rows.clone() {
                            let (f, w) = (self.format, self.row(wr));
                            let put = |q: usize, out: &[f32; PANEL_ROWS]| {
                                for (i, &v) in out.iter().enumerate() {
                                    let r = (pi + q) * PANEL_ROWS + i;
                                    // SAFETY: (r, wr) is written by this unit only.
                                    unsafe { *dst.at(r * n + wr) = v };
                                }
                            };
                            if two {
                                let pair = [panels.panel(pi), panels.panel(pi + 1)];
                                let out = kernel.dot_panels(f, w, pair);
                                put(0, &out[0]);
                                put(1, &out[1]);
                            } else {
                                put(0, &kernel.dot_panels(f, w, [panels.panel(pi)])[0]);
                            }
                        }
                        pi += if two { 2 } else { 1 };
                    }
                    self.tiles(kernel, tile, acts, panels.panels * PANEL_ROWS, rows, &dst);
                }
            };
            for_chunks(units, m * n * self.cols, run);
        });
    }

    /// Activation rows r0.. against weight rows `rows`, `tile` activation rows at a time.
    fn tiles(
        &self,
        kernel: Kernel,
        tile: usize,
        acts: &QuantizedActs,
        r0: usize,
        rows: std::ops::Range<usize>,
        dst: &SharedOut,
    ) {
        let (m, n) = (acts.rows, self.rows);
        let mut r0 = r0;
        while r0 < m {
            let count = tile.min(m - r0);
            for wr in rows.clone() {
                let w = self.row(wr);
                let put = |out: &[f32]| {
                    for (i, &v) in out.iter().enumerate() {
                        // SAFETY: (r0 + i, wr) is written by this unit only.
                        unsafe { *dst.at((r0 + i) * n + wr) = v };
                    }
                };
                let f = self.format;
                match count {
                    1 => put(&kernel.dot_tile::<1>(f, w, acts, r0)),
                    2 => put(&kernel.dot_tile::<2>(f, w, acts, r0)),
                    3 => put(&kernel.dot_tile::<3>(f, w, acts, r0)),
                    4 => put(&kernel.dot_tile::<4>(f, w, acts, r0)),
                    5 => put(&kernel.dot_tile::<5>(f, w, acts, r0)),
                    6 => put(&kernel.dot_tile::<6>(f, w, acts, r0)),
                    7 => put(&kernel.dot_tile::<7>(f, w, acts, r0)),
                    _ => put(&kernel.dot_tile::<8>(f, w, acts, r0)),
                }
            }
            r0 += count;
        }
    }
}

/// `f` on this thread's scratch buffer in `key`, or on a fresh one when the buffer is already
/// lent out (a product nested inside another on the same thread).
fn with_scratch<T: Default + 'static, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut b) => f(&mut b),
        Err(_) => f(&mut T::default()),
    })
}

thread_local! {
    static ACTS_BUF: std::cell::RefCell<QuantizedActs> = std::cell::RefCell::new(QuantizedActs::default());
    static PANEL_BUF: std::cell::RefCell<ActPanels> = std::cell::RefCell::new(ActPanels::default());
}
