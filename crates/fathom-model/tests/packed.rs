//! Continuous batching's packed forward equals running each sequence alone: several sequences at
//! different positions (chunked prefill mixed with decode) share one forward pass, each with its
//! own cache, and every sequence's logits match the whole-sequence uncached forward.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, max_abs_diff};
use fathom_model::{CausalLm, KvCache, Segment};

/// Logits of the last position of `ids`, computed without a cache over the whole sequence.
fn reference_last(model: &CausalLm, ids: &[u32]) -> Tensor {
    let x = Tensor::new(ids, &model.device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&x, 0, None).unwrap();
    logits.squeeze(0).unwrap().get(ids.len() - 1).unwrap()
}

fn check(name: &str, plain: bool) {
    let model = CausalLm::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
    let v = model.cfg.vocab_size as u32;
    let seqs: Vec<Vec<u32>> = (0..3u32)
        .map(|j| (0..16u32).map(|i| (i * 7 + j * 31 + 3) % v).collect())
        .collect();
    let new_cache = || {
        if plain {
            model.new_plain_cache()
        } else {
            model.new_cache()
        }
    };
    let mut caches: Vec<KvCache> = (0..3).map(|_| new_cache()).collect();
    // Steps: which (sequence, number of new rows) each pass packs. Sequence 0 prefills 5 then
    // decodes; 1 prefills in chunks of 3 and 4; 2 joins late with 10 rows (longer than the packed
    // attention kernel takes: it runs alone while the short rows packed after it go
    // through the kernel, and come back in row order), then single rows.
    let steps: Vec<Vec<(usize, usize)>> = vec![
        vec![(0, 5), (1, 3)],
        vec![(2, 10), (0, 1), (1, 4)],
        vec![(2, 1), (0, 1), (1, 1)],
        vec![(1, 1), (2, 2), (0, 1)],
    ];
    let mut done = [0usize; 3];
    let mut worst = 0f32;
    for step in &steps {
        let mut ids = vec![];
        let mut segments = vec![];
        let mut rows = vec![];
        for &(j, n) in step {
            segments.push(Segment {
                start: ids.len(),
                len: n,
                offset: done[j],
            });
            ids.extend_from_slice(&seqs[j][done[j]..done[j] + n]);
        }
        // Every row's logits are checked (speculative verification reads all of them).
        rows.extend(0..ids.len() as u32);
        // Caches in the step's order.
        let order: Vec<usize> = step.iter().map(|&(j, _)| j).collect();
        let mut refs: Vec<&mut KvCache> = vec![];
        let mut rest: Vec<Option<&mut KvCache>> = caches.iter_mut().map(Some).collect();
        for &j in &order {
            refs.push(rest[j].take().unwrap());
        }
        let logits = model
            .forward_packed(&ids, &segments, &mut refs, &rows)
            .unwrap();
        let mut r = 0;
        for &(j, n) in step {
            for _ in 0..n {
                done[j] += 1;
                let want = reference_last(&model, &seqs[j][..done[j]]);
                let got = logits.get(r).unwrap();
                worst = worst.max(max_abs_diff(&got, &want));
                r += 1;
            }
        }
    }
    for (j, c) in caches.iter().enumerate() {
        assert_eq!(c.seq_len(), done[j], "{name}: cache length of sequence {j}");
    }
    assert!(worst < 2e-5, "{name} (plain={plain}): max |Δlogit| {worst}");
}

#[test]
fn packed_matches_separate_deepseek_v3_latent() {
    check("deepseek_v3_tiny", false);
}

#[test]
fn packed_matches_separate_deepseek_v3_plain_cache() {
    check("deepseek_v3_tiny", true);
}

#[test]
fn packed_matches_separate_deepseek_v2_lite() {
    check("deepseek_v2_lite_tiny", false);
}

#[test]
fn packed_matches_separate_qwen2_grouped() {
    check("qwen2_tiny", false);
}

#[test]
fn packed_rejects_segments_that_do_not_tile() {
    let model = CausalLm::load(&fixture("qwen2_tiny"), DType::F32, &Device::Cpu).unwrap();
    let mut c = model.new_cache();
    let seg = [Segment {
        start: 0,
        len: 2,
        offset: 0,
    }];
    assert!(model
        .forward_packed(&[1, 2, 3], &seg, &mut [&mut c], &[2])
        .is_err());
}

/// A prefix cache's round trip: rows copied out of one sequence's cache in blocks and appended to
/// a fresh cache continue exactly as if the prefix had been computed there.
fn check_copied_prefix(name: &str) {
    let model = CausalLm::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
    let v = model.cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..12u32).map(|i| (i * 11 + 5) % v).collect();
    let mut first = model.new_cache();
    let x = Tensor::new(&ids[..9], &model.device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.forward(&x, 0, Some(&mut first)).unwrap();
    let blocks = [
        first.copy_rows(0, 4).unwrap(),
        first.copy_rows(4, 4).unwrap(),
    ];
    assert_eq!(blocks[0].len, 4);
    assert!(blocks[0].bytes() > 0);
    let mut second = model.new_cache();
    second.reserve(32);
    second.append_rows(&[&blocks[0], &blocks[1]]).unwrap();
    assert_eq!(second.seq_len(), 8);
    let seg = [Segment {
        start: 0,
        len: 4,
        offset: 8,
    }];
    let got = model
        .forward_packed(&ids[8..], &seg, &mut [&mut second], &[3])
        .unwrap()
        .get(0)
        .unwrap();
    let want = reference_last(&model, &ids);
    assert!(max_abs_diff(&got, &want) < 2e-5, "{name}");
    assert!(first.copy_rows(8, 4).is_err(), "rows past the cached ones");
    assert!(model.new_plain_cache().copy_rows(0, 0).is_ok());
}

#[test]
fn copied_prefix_continues_exactly_deepseek_v3() {
    check_copied_prefix("deepseek_v3_tiny");
}

#[test]
fn copied_prefix_continues_exactly_qwen2() {
    check_copied_prefix("qwen2_tiny");
}
