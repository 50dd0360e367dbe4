//! Next-token sampling. Order of operations follows HF's logits processors: repetition penalty,
//! temperature, then top-k, top-p and min-p filters on the probabilities; temperature 0 is greedy.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: f64,
    pub min_p: f64,
    pub repetition_penalty: f64,
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

    /// Pick the next token from `logits` given the ids seen so far (prompt + generated).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut l: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
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
        if self.params.temperature == 0.0 {
            return argmax(&l);
        }
        let t = self.params.temperature;
        let max = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut probs: Vec<(usize, f64)> = l
            .iter()
            .enumerate()
            .map(|(i, &x)| (i, ((x - max) / t).exp()))
            .collect();
        probs.sort_by(|a, b| {
            b.1.partial_cmp(&a.1)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.0.cmp(&b.0))
        });
        if let Some(k) = self.params.top_k {
            probs.truncate(k.max(1));
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        if self.params.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut acc = 0.0;
            let mut keep = 0;
            for p in &probs {
                keep += 1;
                acc += p.1 / total;
                if acc >= self.params.top_p {
                    break;
                }
            }
            probs.truncate(keep.max(1));
        }
        if self.params.min_p > 0.0 {
            let top = probs[0].1;
            probs.retain(|p| p.1 >= self.params.min_p * top);
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let mut u = self.rng.random::<f64>() * total;
        for &(i, p) in &probs {
            if u < p {
                return i as u32;
            }
            u -= p;
        }
        probs.last().map(|p| p.0 as u32).unwrap_or(0)
    }
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

    fn counts(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(params);
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            c[s.sample(logits, &[]) as usize] += 1;
        }
        c
    }

    #[test]
    fn greedy_and_filters() {
        let logits = [1.0f32, 3.0, 2.0, 0.5];
        assert_eq!(
            Sampler::new(SamplingParams::default()).sample(&logits, &[]),
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

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        // token 0: 3.0 → 1.5 < 2.0
        assert_eq!(s.sample(&[3.0, 2.0], &[0]), 1);
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
