//! Every block format's decoding against llama.cpp's reference dequantisation (fixtures from
//! `tools/reference/make_quant_fixtures.py`, gguf-py's port of ggml's `dequantize_row_*`), and
//! every kernel against dequantise-then-f32.

use fathom_runtime::quant::{decode_chunk, dequantize};
use fathom_runtime::{Format, Kernel, QMatrix, QuantizedActs, WeightBytes};
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/quant")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A format's fixture blocks and llama.cpp's dequantisation of them.
fn reference_blocks(format: Format) -> (Vec<u8>, Vec<f32>) {
    let bytes = fixture(&format!("{}.blocks", format.name()));
    let want = fixture(&format!("{}.f32", format.name()))
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (bytes, want)
}

/// A tiny deterministic generator (tests need no rand crate).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn uniform(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
    }
}

/// Random blocks of `format` with sane f16 scales: random bytes, scale fields overwritten.
fn random_blocks(format: Format, blocks: usize, rng: &mut Lcg) -> Vec<u8> {
    let scale_at: &[usize] = match format {
        Format::Q4_1 | Format::Q5_1 | Format::Q4K | Format::Q5K => &[0, 2],
        Format::Q2K => &[80, 82],
        Format::Q3K => &[108],
        Format::Q6K => &[208],
        _ => &[0],
    };
    let bb = format.block_bytes();
    let mut out: Vec<u8> = (0..blocks * bb).map(|_| rng.next() as u8).collect();
    for b in 0..blocks {
        for &at in scale_at {
            let v = half::f16::from_f32(rng.uniform() * 0.05);
            out[b * bb + at..b * bb + at + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    out
}

#[test]
fn dequantisation_equals_llama_cpps_reference() {
    for format in Format::ALL {
        let (bytes, want) = reference_blocks(format);
        let mut got = vec![0f32; want.len()];
        dequantize(format, &bytes, &mut got);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // The same products in a different order (w = dw·sc·u + corr vs ggml's forms): a few
            // ulps of the block's largest weight.
            assert!(
                (g - w).abs() <= 1e-6 * scale,
                "{format}: value {i}: {g} vs llama.cpp {w} (block max {scale})"
            );
        }
    }
}

#[test]
fn block_layout_sizes_match_ggml() {
    let want = [
        (Format::Q4_0, 32, 18),
        (Format::Q4_1, 32, 20),
        (Format::Q5_0, 32, 22),
        (Format::Q5_1, 32, 24),
        (Format::Q8_0, 32, 34),
        (Format::Q2K, 256, 84),
        (Format::Q3K, 256, 110),
        (Format::Q4K, 256, 144),
        (Format::Q5K, 256, 176),
        (Format::Q6K, 256, 210),
        (Format::IQ4NL, 32, 18),
        (Format::IQ4XS, 256, 136),
    ];
    for (f, e, b) in want {
        assert_eq!((f.block_elems(), f.block_bytes()), (e, b), "{f}");
        assert_eq!(Format::from_ggml_type(f.ggml_type()), Some(f));
    }
    // Fixture sizes follow from the same numbers.
    for f in Format::ALL {
        assert_eq!(
            fixture(&format!("{}.blocks", f.name())).len() % f.block_bytes(),
            0,
            "{f}"
        );
    }
}

/// Σ w_i · x_i in f64 over dequantised weights and the dequantised (int8) activations: what the
/// integer kernels must equal up to f32 accumulation.
fn reference_dot(format: Format, w: &[u8], acts: &QuantizedActs, r: usize) -> (f64, f64) {
    let cols = acts.k;
    let mut wf = vec![0f32; cols];
    dequantize(format, w, &mut wf);
    let x = acts.dequantized_row(r);
    let dot: f64 = wf.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
    let mag: f64 = wf
        .iter()
        .zip(&x)
        .map(|(a, b)| (*a as f64 * *b as f64).abs())
        .sum();
    (dot, mag)
}

#[test]
fn every_kernel_equals_dequantise_then_dot() {
    let mut rng = Lcg(7);
    let kernels = Kernel::available();
    if kernels.len() == 1 {
        eprintln!("note: this CPU runs only the portable kernel");
    }
    for format in Format::ALL {
        for (n, cols, m) in [
            (5usize, 256usize, 1usize),
            (9, 512, 3),
            (70, 1024, 6),
            (1, 256, 4),
            // Eight rows and more: whole panels of eight on VNNI, the rest in tiles.
            (9, 256, 8),
            (13, 512, 19),
        ] {
            let bytes = random_blocks(format, n * cols / format.block_elems(), &mut rng);
            let w = QMatrix::new(format, n, cols, WeightBytes::owned(bytes)).unwrap();
            let x: Vec<f32> = (0..m * cols).map(|_| rng.uniform()).collect();
            let acts = QuantizedActs::quantize(&x, m, cols, format.act_group());
            for &kernel in &kernels {
                // A planned decode step's share: weight rows n/2..n against activation row 0.
                let mut part = vec![0f32; n - n / 2];
                w.dot_rows(kernel, &acts, n / 2..n, &mut part);
                for (o, got) in (n / 2..n).zip(&part) {
                    let (want, mag) = reference_dot(format, w.row(o), &acts, 0);
                    assert!(
                        (*got as f64 - want).abs() <= 1e-5 * mag.max(1e-12),
                        "{format} {kernel:?} dot_rows, w row {o}: {got} vs {want}"
                    );
                }
                let mut y = vec![0f32; m * n];
                w.matmul_acts(kernel, &acts, &mut y);
                for r in 0..m {
                    for o in 0..n {
                        let (want, mag) = reference_dot(format, w.row(o), &acts, r);
                        let got = y[r * n + o] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * mag.max(1e-12),
                            "{format} {kernel:?} {n}×{cols}, x row {r}, w row {o}: {got} vs {want} (Σ|wx| {mag})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn quantised_product_tracks_the_f32_product() {
    // Against the float activations: the int8 activation rounding is the only extra error.
    let mut rng = Lcg(11);
    for format in Format::ALL {
        let (n, cols, m) = (16, 512, 2);
        let w = QMatrix::new(
            format,
            n,
            cols,
            WeightBytes::owned(random_blocks(
                format,
                n * cols / format.block_elems(),
                &mut rng,
            )),
        )
        .unwrap();
        let x: Vec<f32> = (0..m * cols).map(|_| rng.uniform()).collect();
        let y = w.matmul(&x, m);
        let wf = w.dequantize();
        for r in 0..m {
            for o in 0..n {
                let row = &wf[o * cols..(o + 1) * cols];
                let xr = &x[r * cols..(r + 1) * cols];
                let want: f64 = row.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                let mag: f64 = row
                    .iter()
                    .zip(xr)
                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                    .sum();
                let got = y[r * n + o] as f64;
                assert!(
                    (got - want).abs() <= 0.02 * mag,
                    "{format}: {got} vs {want} (Σ|wx| {mag})"
                );
            }
        }
    }
}

#[test]
fn one_row_kernel_agrees_with_the_chunk_definition() {
    // The portable kernel is the chunk decomposition itself: check it directly for one block of
    // each format, so a bug shared by `decode_chunk` and `dequantize` would still show here
    // against the fixture values.
    for format in Format::ALL {
        let (bytes, want) = reference_blocks(format);
        let be = format.block_elems();
        let block = &bytes[..format.block_bytes()];
        // Activation = one-hot of weight i (q = 127, d = 1/127): the dot product is weight i.
        for i in (0..be).step_by(7) {
            let mut qs = vec![0i8; be];
            qs[i] = 127;
            let d = vec![1.0 / 127.0; be / 32];
            let mut bsum = vec![0f32; be / 16];
            bsum[i / 16] = 127.0;
            let got = decode_chunk(format, block, i / 32).weight(i % 32);
            let w = QMatrix::new(format, 1, be, WeightBytes::owned(block.to_vec())).unwrap();
            let acts = QuantizedActs {
                rows: 1,
                k: be,
                group: format.act_group(),
                qs,
                d,
                bsum,
            };
            let mut y = [0f32];
            w.matmul_acts(Kernel::best(), &acts, &mut y);
            let scale = want[..be].iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!((got - want[i]).abs() <= 1e-6 * scale, "{format} weight {i}");
            assert!(
                (y[0] - want[i]).abs() <= 1e-5 * scale,
                "{format} weight {i}: kernel {} vs {}",
                y[0],
                want[i]
            );
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    assert!(QMatrix::new(Format::Q4K, 2, 128, WeightBytes::owned(vec![0; 288])).is_err());
    let e = QMatrix::new(Format::Q8_0, 2, 64, WeightBytes::owned(vec![0; 100])).unwrap_err();
    assert!(e.to_string().contains("136"), "{e}");
    let owner: std::sync::Arc<dyn AsRef<[u8]> + Send + Sync> = std::sync::Arc::new(vec![0u8; 10]);
    assert!(WeightBytes::shared(owner.clone(), 4..12).is_none());
    assert_eq!(
        WeightBytes::shared(owner, 2..6).unwrap().as_slice().len(),
        4
    );
}
