//! Next-token sampling. Order of operations follows HF's logits processors: repetition penalty
//! (over prompt and output, HF's multiplicative form), OpenAI's presence/frequency penalties (over
//! the output only: l_j −= c_j·frequency + [c_j > 0]·presence), temperature, then top-k, top-p and
//! min-p filters on the probabilities; temperature 0 is greedy.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: f64,
    pub min_p: f64,
    pub repetition_penalty: f64,
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Reject values that make no sense, naming the parameter.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if self.top_k == Some(0) {
            return Err("top_k must be >= 1".into());
        }
        Ok(())
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// Pick the next token from `logits` given the ids seen so far (prompt + generated);
    /// `history[output_start..]` is the generated part (what presence/frequency penalties count).
    pub fn sample(&mut self, logits: &[f32], history: &[u32], output_start: usize) -> u32 {
        let l = self.penalised(logits, history, output_start);
        if self.params.temperature == 0.0 {
            return argmax(&l);
        }
        self.sample_penalised(l)
    }

    /// Whether sampling is greedy (temperature 0): the token is the argmax of the penalised logits.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0
    }

    /// The full distribution `sample` draws from (temperature > 0): probabilities over the whole
    /// vocabulary after penalties, temperature and the top-k / top-p / min-p filters, zero outside
    /// the kept set, summing to 1. Speculative decoding compares the target's and the draft's.
    pub fn distribution(&self, logits: &[f32], history: &[u32], output_start: usize) -> Vec<f64> {
        let l = self.penalised(logits, history, output_start);
        let mut probs = tempered(&l, self.params.temperature.max(f64::MIN_POSITIVE));
        let n = probs.len();
        let (top_p, min_p) = (self.params.top_p, self.params.min_p);
        if let Some(k) = self.params.top_k {
            sort_prefix(&mut probs, k.clamp(1, n));
            probs.truncate(k.clamp(1, n));
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let kept = if top_p >= 1.0 && min_p <= 0.0 {
            probs.len()
        } else {
            let mut m = match self.params.top_k {
                Some(_) => probs.len(),
                None => likeliest_prefix(&mut probs),
            };
            // The prefix is sorted on entry; each pass that cannot decide sorts a 4× longer one.
            loop {
                let whole = m == probs.len();
                if let Some(end) = kept_prefix(&probs[..m], total, top_p, min_p, whole) {
                    break end;
                }
                m = (m * 4).min(probs.len());
                sort_prefix(&mut probs, m);
            }
        };
        let mass: f64 = probs[..kept].iter().map(|p| p.1).sum();
        let mut out = vec![0f64; n];
        for &(i, p) in &probs[..kept] {
            out[i] = p / mass;
        }
        out
    }

    /// A uniform draw in [0, 1) from this sampler's generator.
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// A token drawn from `probs` (non-negative, any total > 0).
    pub fn draw(&mut self, probs: &[f64]) -> u32 {
        let total: f64 = probs.iter().sum();
        let mut rest = self.uniform() * total;
        let mut last = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                if rest < p {
                    return i as u32;
                }
                rest -= p;
                last = i;
            }
        }
        last as u32
    }

    /// Logits after the repetition and presence/frequency penalties.
    fn penalised(&self, logits: &[f32], history: &[u32], output_start: usize) -> Vec<f64> {
        let mut l: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
        let (pp, fp) = (self.params.presence_penalty, self.params.frequency_penalty);
        if pp != 0.0 || fp != 0.0 {
            let mut count = std::collections::HashMap::<u32, usize>::new();
            for &t in history.get(output_start..).unwrap_or(&[]) {
                *count.entry(t).or_default() += 1;
            }
            for (t, c) in count {
                if let Some(x) = l.get_mut(t as usize) {
                    *x -= c as f64 * fp + pp;
                }
            }
        }
        let rp = self.params.repetition_penalty;
        if rp != 1.0 {
            let mut seen = vec![false; l.len()];
            for &t in history {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (x, s) in l.iter_mut().zip(seen) {
                if s {
                    *x = if *x > 0.0 { *x / rp } else { *x * rp };
                }
            }
        }
        l
    }

    fn sample_penalised(&mut self, l: Vec<f64>) -> u32 {
        let mut probs = tempered(&l, self.params.temperature);
        // Candidates are walked most likely first (ties by lower id). Only the prefix the filters
        // and the draw reach is sorted: first the candidates near the top one (one linear pass),
        // then, if the walk goes past them, the top m by selection, m growing ×4 — a full sort of
        // a 100k-entry vocabulary per token would cost more than a small model's forward.
        let n = probs.len();
        let (top_p, min_p) = (self.params.top_p, self.params.min_p);
        let (mut m, total) = match self.params.top_k {
            Some(k) => {
                let k = k.clamp(1, n);
                sort_prefix(&mut probs, k);
                probs.truncate(k);
                (k, probs.iter().map(|p| p.1).sum::<f64>())
            }
            None => {
                let total = probs.iter().map(|p| p.1).sum::<f64>();
                (likeliest_prefix(&mut probs), total)
            }
        };
        let unfiltered = top_p >= 1.0 && min_p <= 0.0;
        let u = self.rng.random::<f64>();
        // The prefix is sorted on entry; each pass the walk goes past sorts a 4× longer one.
        loop {
            let whole = m == probs.len();
            if unfiltered {
                // Inverse CDF over all candidates: the draw usually lands in the first few.
                let mut rest = u * total;
                for &(i, p) in &probs[..m] {
                    if rest < p {
                        return i as u32;
                    }
                    rest -= p;
                }
                if whole {
                    return probs[m - 1].0 as u32;
                }
            } else if let Some(end) = kept_prefix(&probs[..m], total, top_p, min_p, whole) {
                let kept = &probs[..end];
                let mut rest = u * kept.iter().map(|p| p.1).sum::<f64>();
                for &(i, p) in kept {
                    if rest < p {
                        return i as u32;
                    }
                    rest -= p;
                }
                return kept[end - 1].0 as u32;
            }
            m = (m * 4).min(probs.len());
            sort_prefix(&mut probs, m);
        }
    }
}

/// (token, e^{(l − max)/T}) for every token: unnormalised tempered probabilities.
fn tempered(l: &[f64], t: f64) -> Vec<(usize, f64)> {
    let max = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    l.iter()
        .enumerate()
        .map(|(i, &x)| (i, ((x - max) / t).exp()))
        .collect()
}

/// Most likely first, ties by lower id.
fn likelier(a: &(usize, f64), b: &(usize, f64)) -> std::cmp::Ordering {
    b.1.partial_cmp(&a.1)
        .unwrap_or(std::cmp::Ordering::Equal)
        .then(a.0.cmp(&b.0))
}

/// Candidates at least this fraction of the most likely one's weight form the first sorted prefix.
const PREFIX_RATIO: f64 = 1e-3;

/// Move every candidate with at least [`PREFIX_RATIO`] of the top weight to the front, sorted most
/// likely first, and return how many. They are exactly the m most likely (all of them outrank every
/// other candidate), so walking them gives what walking the fully sorted vocabulary gives as far
/// as they go — found in one linear pass, where selecting a fixed m partitions the whole vocabulary
/// (that selection was ~10 % of the server's engine thread at 16 streams).
fn likeliest_prefix(probs: &mut [(usize, f64)]) -> usize {
    let top = probs.iter().map(|p| p.1).fold(0.0, f64::max);
    let mut m = 0;
    for i in 0..probs.len() {
        if probs[i].1 >= top * PREFIX_RATIO {
            probs.swap(i, m);
            m += 1;
        }
    }
    let m = m.max(1).min(probs.len());
    probs[..m].sort_by(likelier);
    m
}

/// Put the m most likely candidates first, in order.
fn sort_prefix(probs: &mut [(usize, f64)], m: usize) {
    if m < probs.len() {
        probs.select_nth_unstable_by(m, likelier);
    }
    probs[..m].sort_by(likelier);
}

/// Length of the kept set (top-p: the smallest prefix whose mass reaches top_p of `total`, at
/// least one; min-p: candidates ≥ min_p × the top one) when the sorted `prefix` decides it.
fn kept_prefix(
    prefix: &[(usize, f64)],
    total: f64,
    top_p: f64,
    min_p: f64,
    whole: bool,
) -> Option<usize> {
    let mut end = None;
    if top_p < 1.0 {
        let mut acc = 0.0;
        for (i, p) in prefix.iter().enumerate() {
            acc += p.1 / total;
            if acc >= top_p {
                end = Some(i + 1);
                break;
            }
        }
    }
    if min_p > 0.0 {
        let threshold = min_p * prefix[0].1;
        if let Some(i) = prefix.iter().position(|p| p.1 < threshold) {
            end = Some(end.map_or(i, |e: usize| e.min(i)).max(1));
        }
    }
    match end {
        Some(e) => Some(e),
        None if whole => Some(prefix.len()),
        None => None,
    }
}

/// OpenAI's `logprobs`: log-probability of `chosen` under the model's raw distribution
/// (log-softmax of the logits, before any sampling transform, as vLLM reports by default) and the
/// `top` most likely tokens with theirs, most likely first.
pub fn token_logprobs(logits: &[f32], chosen: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let log_z = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let lp = |i: usize| logits[i] - log_z;
    // Most likely first; ties by lower id.
    let likelier = |a: &usize, b: &usize| {
        logits[*b]
            .partial_cmp(&logits[*a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(b))
    };
    let mut best: Vec<usize> = (0..logits.len()).collect();
    let top = top.min(logits.len());
    if top > 0 {
        best.select_nth_unstable_by(top - 1, likelier);
    }
    best.truncate(top);
    best.sort_by(likelier);
    let chosen_lp = logits
        .get(chosen as usize)
        .map_or(f32::NEG_INFINITY, |_| lp(chosen as usize));
    (
        chosen_lp,
        best.into_iter().map(|i| (i as u32, lp(i))).collect(),
    )
}

pub fn argmax(l: &[f64]) -> u32 {
    let mut best = 0;
    for (i, &x) in l.iter().enumerate() {
        if x > l[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole vocabulary's tempered weights sorted most likely first (ties by lower id), cut
    /// to the shortest prefix holding `top_p` of the mass (all of it at 1): the order and set a
    /// sampler must draw from, computed the slow, obvious way.
    fn fully_sorted_top_p(logits: &[f32], temperature: f64, top_p: f64) -> Vec<(usize, f64)> {
        let l: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
        let mut p = tempered(&l, temperature);
        p.sort_by(likelier);
        if top_p < 1.0 {
            let total: f64 = p.iter().map(|x| x.1).sum();
            let mut acc = 0.0;
            let keep = p
                .iter()
                .position(|x| {
                    acc += x.1;
                    acc >= top_p * total
                })
                .unwrap()
                + 1;
            p.truncate(keep);
        }
        p
    }

    fn counts(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(params);
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            c[s.sample(logits, &[], 0) as usize] += 1;
        }
        c
    }

    #[test]
    fn greedy_and_filters() {
        let logits = [1.0f32, 3.0, 2.0, 0.5];
        assert_eq!(
            Sampler::new(SamplingParams::default()).sample(&logits, &[], 0),
            1
        );
        let c = counts(
            SamplingParams {
                temperature: 1.0,
                top_k: Some(2),
                ..Default::default()
            },
            &logits,
            2000,
        );
        assert_eq!(c[0] + c[3], 0, "top-k 2 keeps tokens 1 and 2 only: {c:?}");
        assert!(c[1] > c[2] && c[2] > 300, "{c:?}");
        // p = softmax = [0.086, 0.636, 0.234, 0.052]: top_p 0.6 keeps token 1 only.
        let c = counts(
            SamplingParams {
                temperature: 1.0,
                top_p: 0.6,
                ..Default::default()
            },
            &logits,
            500,
        );
        assert_eq!(c[1], 500);
        // min_p 0.3: tokens with p >= 0.3·0.636 = 0.19 → 1 and 2.
        let c = counts(
            SamplingParams {
                temperature: 1.0,
                min_p: 0.3,
                ..Default::default()
            },
            &logits,
            2000,
        );
        assert_eq!(c[0] + c[3], 0);
    }

    #[test]
    fn sampling_matches_softmax_frequencies_and_is_seeded() {
        let logits = [0.0f32, 1.0, 2.0];
        let n = 20000;
        let c = counts(
            SamplingParams {
                temperature: 1.0,
                seed: 7,
                ..Default::default()
            },
            &logits,
            n,
        );
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        for (i, &x) in logits.iter().enumerate() {
            let p = (x as f64).exp() / z;
            let f = c[i] as f64 / n as f64;
            assert!((f - p).abs() < 0.015, "token {i}: freq {f} vs p {p}");
        }
        let again = counts(
            SamplingParams {
                temperature: 1.0,
                seed: 7,
                ..Default::default()
            },
            &logits,
            n,
        );
        assert_eq!(c, again);
    }

    /// Over a 1000-token vocabulary with a flat tail, the kept set and the draw reach far past the
    /// first sorted prefix (64): frequencies must still follow the filtered softmax, computed
    /// here by a full sort.
    #[test]
    fn filters_over_a_large_vocabulary_match_the_fully_sorted_distribution() {
        let v = 1000;
        let logits: Vec<f32> = (0..v).map(|i| ((i * 37) % 101) as f32 * 0.01).collect();
        for (top_p, min_p) in [(1.0, 0.0), (0.9, 0.0), (1.0, 0.8), (0.3, 0.9)] {
            let params = SamplingParams {
                temperature: 1.0,
                top_p,
                min_p,
                seed: 3,
                ..Default::default()
            };
            // Reference: sort everything, cut by top-p mass then min-p, renormalise.
            let mut p = fully_sorted_top_p(&logits, 1.0, top_p);
            let top = p[0].1;
            p.retain(|x| x.1 >= min_p * top);
            assert!(
                p.len() > 64,
                "the case must need more than the first prefix"
            );
            let kept: f64 = p.iter().map(|x| x.1).sum();
            let n = 10000;
            let c = counts(params, &logits, n);
            let inside: usize = p.iter().map(|x| c[x.0]).sum();
            assert_eq!(
                inside, n,
                "top_p {top_p} min_p {min_p}: sampled outside the kept set"
            );
            // Mass of the most and least likely kept tokens (by groups of equal logit).
            for group in [&p[..10], &p[p.len() - 10..]] {
                let want: f64 = group.iter().map(|x| x.1).sum::<f64>() / kept;
                let got = group.iter().map(|x| c[x.0]).sum::<usize>() as f64 / n as f64;
                assert!(
                    (got - want).abs() < 0.01,
                    "top_p {top_p} min_p {min_p}: {got} vs {want}"
                );
            }
        }
    }

    /// The token drawn for each uniform draw is the one a walk over the fully sorted vocabulary
    /// gives (temperature only, and with top-p), over peaked and flat distributions, including
    /// draws that land past the first prefix; the first prefix is exactly the most likely tokens.
    #[test]
    fn draws_equal_a_walk_over_the_fully_sorted_vocabulary() {
        let v = 3000;
        // (temperature, top-p, logit spread; spread 0 = one token far above a heavy flat tail,
        // each tail token under PREFIX_RATIO of the top but most of the mass together).
        for (temperature, top_p, spread) in [
            (0.6, 1.0, 8.0),
            (1.0, 1.0, 0.5),
            (1.3, 0.9, 3.0),
            (1.0, 1.0, 0.0),
            (1.0, 0.8, 0.0),
        ] {
            let logits: Vec<f32> = (0..v)
                .map(|i| match (spread, i) {
                    (0.0, 0) => 0.0,
                    (0.0, _) => -7.6 - (i % 7) as f32 * 0.01,
                    _ => ((i * 7919) % 1009) as f32 / 1009.0 * spread,
                })
                .collect();
            let params = SamplingParams {
                temperature,
                top_p,
                seed: 11,
                ..Default::default()
            };
            let mut s = Sampler::new(params.clone());
            let mut draws = StdRng::seed_from_u64(11);
            let full = fully_sorted_top_p(&logits, temperature, 1.0);
            let kept = fully_sorted_top_p(&logits, temperature, top_p);
            let cut = kept.len();
            let mass: f64 = kept.iter().map(|p| p.1).sum();
            let first_prefix = {
                let mut probs = full.clone();
                probs.sort_by_key(|p| p.0);
                likeliest_prefix(&mut probs)
            };
            let mut deep = 0;
            for _ in 0..2000 {
                let u = draws.random::<f64>();
                let mut rest = u * mass;
                let mut want = kept[cut - 1].0;
                for (rank, &(i, p)) in kept.iter().enumerate() {
                    if rest < p {
                        want = i;
                        deep += usize::from(rank >= first_prefix);
                        break;
                    }
                    rest -= p;
                }
                assert_eq!(s.sample(&logits, &[], 0) as usize, want);
            }
            if spread == 0.0 {
                assert!(
                    deep > 500,
                    "the heavy tail must take draws past the first prefix"
                );
            }
            let mut probs = full.clone();
            probs.sort_by_key(|p| p.0);
            let m = likeliest_prefix(&mut probs);
            assert_eq!(probs[..m], full[..m]);
            assert!(m == full.len() || full[m].1 < full[0].1 * PREFIX_RATIO);
        }
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        // token 0: 3.0 → 1.5 < 2.0
        assert_eq!(s.sample(&[3.0, 2.0], &[0], 0), 1);
        assert!(SamplingParams {
            presence_penalty: 2.5,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn presence_and_frequency_penalties_count_output_tokens_only() {
        let params = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.4,
            ..Default::default()
        };
        // Token 0 appears in the prompt only: not penalised, stays the argmax.
        let mut s = Sampler::new(params.clone());
        assert_eq!(s.sample(&[3.0, 2.9, 0.0], &[0, 0, 0], 3), 0);
        // Token 0 generated twice: 3.0 − (2·0.4 + 0.5) = 1.7 < 2.9 − (0.4 + 0.5) = 2.0.
        assert_eq!(s.sample(&[3.0, 2.9, 0.0], &[5, 0, 0, 1], 1), 1);
        // Once each: 3.0 − 0.9 = 2.1 > 2.9 − 0.9.
        assert_eq!(s.sample(&[3.0, 2.9, 0.0], &[0, 1], 0), 0);
    }

    #[test]
    fn logprobs_are_log_softmax_of_raw_logits() {
        let logits = [1.0f32, 3.0, 2.0];
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        let (lp, top) = token_logprobs(&logits, 2, 2);
        assert!((lp - (2.0f32.exp() / z).ln()).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((top[0].1 - (3.0f32.exp() / z).ln()).abs() < 1e-6);
        assert!(token_logprobs(&logits, 0, 0).1.is_empty());
        assert_eq!(token_logprobs(&logits, 0, 10).1.len(), 3);
    }
}
