//! Activations quantised once per call for the int8 dot products: per 32 values an f32 scale
//! `d = max|x| / 127` and `q = round(x / d)` (llama.cpp's q8_0 rule), plus the sums of q over each
//! 16 values, which the offset and minimum terms of the block formats need (see `blocks.rs`).
//! One layout serves every weight format (llama.cpp uses q8_K for the k-quants; a scale per 32
//! values instead of per 256 is a little more precise and costs one multiply per chunk).

/// `rows` activation rows of `k` values each (k a multiple of 32).
#[derive(Debug, Clone, Default)]
pub struct QuantizedActs {
    pub rows: usize,
    pub k: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub bsum: Vec<f32>,
}

/// One row's slices.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub bsum: &'a [f32],
}

impl QuantizedActs {
    /// Quantise `x` ([rows, k] row-major), reusing this buffer's allocations.
    pub fn quantize_into(&mut self, x: &[f32], rows: usize, k: usize) {
        assert!(
            k % 32 == 0 && x.len() == rows * k,
            "activations: {rows}×{k} vs {}",
            x.len()
        );
        self.rows = rows;
        self.k = k;
        self.qs.resize(rows * k, 0);
        self.d.resize(rows * k / 32, 0.0);
        self.bsum.resize(rows * k / 16, 0.0);
        for (b, (src, q)) in x
            .chunks_exact(32)
            .zip(self.qs.chunks_exact_mut(32))
            .enumerate()
        {
            let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (qi, &v) in q.iter_mut().zip(src) {
                *qi = (v * id).round() as i8;
            }
            self.d[b] = d;
            for h in 0..2 {
                let s: i32 = q[16 * h..16 * h + 16].iter().map(|&v| v as i32).sum();
                self.bsum[2 * b + h] = s as f32;
            }
        }
    }

    pub fn quantize(x: &[f32], rows: usize, k: usize) -> Self {
        let mut a = QuantizedActs::default();
        a.quantize_into(x, rows, k);
        a
    }

    pub fn row(&self, r: usize) -> ActRow<'_> {
        let k = self.k;
        ActRow {
            qs: &self.qs[r * k..(r + 1) * k],
            d: &self.d[r * k / 32..(r + 1) * k / 32],
            bsum: &self.bsum[r * k / 16..(r + 1) * k / 16],
        }
    }

    /// Row r dequantised (tests).
    pub fn dequantized_row(&self, r: usize) -> Vec<f32> {
        let row = self.row(r);
        row.qs
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f32 * row.d[i / 32])
            .collect()
    }
}
