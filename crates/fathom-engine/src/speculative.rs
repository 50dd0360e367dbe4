//! MTP speculative decoding (DeepSeek-V3 §2.2, §5.4.3: the MTP module as a draft model).
//!
//! After each verified token t_p at position p, the MTP module drafts: on (h_{p−1}, Emb(t_p)) —
//! the main model's last hidden state and the new token — it predicts t_{p+1}; for more than one
//! draft the same module runs again on its own output hidden state and the drafted token (the
//! recursive reuse SGLang applies to V3's single module). The main model then verifies
//! [t_p, d_1 … d_k] in one forward (a k+1-row segment: the packed attention kernel), and:
//!
//! - greedy: the longest prefix of drafts that equal the target's greedy choices is accepted, plus
//!   the target's token at the first mismatch (or after the last draft) — output identical to plain
//!   greedy decoding;
//! - sampling: draft d_i ~ q_i is accepted with probability min(1, p_i(d_i)/q_i(d_i)); at the first
//!   rejection a token is drawn from norm(max(0, p_i − q_i)), after k acceptances from p_{k+1}
//!   (Leviathan et al. 2023; Chen et al. 2023): every emitted token is distributed exactly as the
//!   target's p (tested in `tests/speculative.rs`).
//!
//! The main cache is rolled back past the rejected drafts (`KvCache::truncate`); the MTP module's
//! own cache drops its draft rows and is extended with the verified rows' true hidden states on
//! the next draft call.

use crate::sampler::Sampler;
use candle_core::{Result, Tensor};
use fathom_model::{CausalLm, KvCache};

/// Draft statistics: per draft position, how many drafts were offered and accepted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecStats {
    pub offered: Vec<u64>,
    pub accepted: Vec<u64>,
    /// Verification steps (main-model forwards after the prompt); each emits its accepted drafts
    /// plus one token of the target's own.
    pub steps: u64,
}

impl SpecStats {
    /// Acceptance rate per draft position (position 1 = the second token of a step).
    pub fn acceptance(&self) -> Vec<f64> {
        self.offered
            .iter()
            .zip(&self.accepted)
            .map(|(&o, &a)| if o == 0 { 0.0 } else { a as f64 / o as f64 })
            .collect()
    }

    /// Mean tokens per main-model forward: (steps + accepted drafts) / steps.
    pub fn tokens_per_step(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            (self.steps + self.accepted.iter().sum::<u64>()) as f64 / self.steps as f64
        }
    }

    pub fn record(&mut self, offered: usize, accepted: usize) {
        if self.offered.len() < offered {
            self.offered.resize(offered, 0);
            self.accepted.resize(offered, 0);
        }
        for i in 0..offered {
            self.offered[i] += 1;
            if i < accepted {
                self.accepted[i] += 1;
            }
        }
        self.steps += 1;
    }

    /// Add another run's counts (acceptance over several prompts).
    pub fn merge(&mut self, other: &SpecStats) {
        if self.offered.len() < other.offered.len() {
            self.offered.resize(other.offered.len(), 0);
            self.accepted.resize(other.offered.len(), 0);
        }
        for (i, (o, a)) in other.offered.iter().zip(&other.accepted).enumerate() {
            self.offered[i] += o;
            self.accepted[i] += a;
        }
        self.steps += other.steps;
    }

    /// "pos1 87%, pos2 61%; 1.9 tokens/step".
    pub fn summary(&self) -> String {
        let per: Vec<String> = self
            .acceptance()
            .iter()
            .enumerate()
            .map(|(i, a)| format!("draft {} {:.0}%", i + 1, 100.0 * a))
            .collect();
        format!(
            "MTP acceptance {}; {:.2} tokens per main forward",
            per.join(", "),
            self.tokens_per_step()
        )
    }
}

/// Drafts with the model's first MTP module; holds that module's KV cache for one sequence.
pub struct Drafter {
    cache: KvCache,
    /// Positions of the MTP cache that hold verified rows.
    valid: usize,
}

/// A draft token and, when sampling, the draft distribution q it was drawn from.
pub struct Draft {
    pub token: u32,
    pub q: Option<Vec<f64>>,
}

impl Drafter {
    /// `None` when the model has no MTP module (speculation falls back to plain decoding).
    pub fn new(model: &CausalLm) -> Option<Self> {
        if model.mtp.is_empty() {
            return None;
        }
        Some(Drafter {
            cache: if model.cfg.mla.is_some() {
                KvCache::new_latent(1)
            } else {
                KvCache::new(1)
            },
            valid: 0,
        })
    }

    /// Extend the MTP cache over verified rows — `hidden` [n, d] (the main model's final normed
    /// states at positions offset..offset+n) with `next_tokens` (the token after each) — and draft
    /// `k` tokens from the last row on. `pick` turns draft logits into a draft (given the drafts so
    /// far). Draft rows are dropped from the MTP cache before returning.
    pub fn draft(
        &mut self,
        model: &CausalLm,
        hidden: &Tensor,
        next_tokens: &[u32],
        offset: usize,
        k: usize,
        pick: &mut dyn FnMut(&[f32], &[u32]) -> Draft,
    ) -> Result<Vec<Draft>> {
        let module = &model.mtp[0];
        if offset != self.valid {
            candle_core::bail!(
                "MTP cache holds {} positions, rows start at {offset}",
                self.valid
            )
        }
        let n = next_tokens.len();
        let mut prev = hidden.unsqueeze(0)?;
        let mut next = model.embed(&Tensor::new(next_tokens, &model.device)?.unsqueeze(0)?)?;
        let mut pos = offset;
        let mut drafts: Vec<Draft> = Vec::with_capacity(k);
        let mut tokens: Vec<u32> = Vec::with_capacity(k);
        for j in 0..k {
            let h =
                module.forward_decode(&prev, &next, &model.rope, pos, &mut self.cache.layers[0])?;
            if j == 0 {
                self.valid = offset + n;
            }
            let rows = h.dim(1)?;
            let last = h.narrow(1, rows - 1, 1)?;
            let logits: Vec<f32> = model.logits(&last)?.flatten_all()?.to_vec1()?;
            let d = pick(&logits, &tokens);
            let token = d.token;
            tokens.push(token);
            drafts.push(d);
            pos += rows;
            if pos + 1 >= model.rope.max_positions() {
                break;
            }
            prev = last;
            next = model.embed(&Tensor::new(&[token], &model.device)?.unsqueeze(0)?)?;
        }
        self.cache.truncate(self.valid)?;
        Ok(drafts)
    }
}

/// The target's verdict on one step's drafts.
pub struct Verdict {
    /// Drafts accepted (a prefix of them).
    pub accepted: usize,
    /// The token after them: the target's correction, or its next token when all were accepted.
    pub next: u32,
}

/// Decide how many drafts the target accepts. `target_logits[i]` are the main model's logits at
/// the row that predicts the token after draft i (row 0: after the verified token); `history`
/// holds the sequence so far (prompt + output), `output_start` where the output begins.
pub fn verify(
    sampler: &mut Sampler,
    target_logits: &[Vec<f32>],
    drafts: &[Draft],
    history: &[u32],
    output_start: usize,
) -> Verdict {
    let mut seen = history.to_vec();
    for (i, d) in drafts.iter().enumerate() {
        let logits = &target_logits[i];
        if sampler.is_greedy() {
            let want = sampler.sample(logits, &seen, output_start);
            if want != d.token {
                return Verdict {
                    accepted: i,
                    next: want,
                };
            }
        } else {
            let p = sampler.distribution(logits, &seen, output_start);
            let q = d.q.as_ref().expect("sampled drafts carry q");
            let (pd, qd) = (p[d.token as usize], q[d.token as usize]);
            if qd <= 0.0 || sampler.uniform() >= (pd / qd).min(1.0) {
                let residual: Vec<f64> = p.iter().zip(q).map(|(a, b)| (a - b).max(0.0)).collect();
                let next = if residual.iter().sum::<f64>() > 0.0 {
                    sampler.draw(&residual)
                } else {
                    sampler.draw(&p)
                };
                return Verdict { accepted: i, next };
            }
        }
        seen.push(d.token);
    }
    let logits = &target_logits[drafts.len()];
    let next = if sampler.is_greedy() {
        sampler.sample(logits, &seen, output_start)
    } else {
        let p = sampler.distribution(logits, &seen, output_start);
        sampler.draw(&p)
    };
    Verdict {
        accepted: drafts.len(),
        next,
    }
}

/// A draft picker for `Drafter::draft`: greedy drafts when the sampler is greedy, else drafts
/// sampled from the MTP's distribution under the same sampling parameters.
pub fn pick_draft<'a>(
    sampler: &'a mut Sampler,
    history: &'a [u32],
    output_start: usize,
) -> impl FnMut(&[f32], &[u32]) -> Draft + 'a {
    move |logits: &[f32], drafted: &[u32]| {
        let mut seen = history.to_vec();
        seen.extend_from_slice(drafted);
        if sampler.is_greedy() {
            Draft {
                token: sampler.sample(logits, &seen, output_start),
                q: None,
            }
        } else {
            let q = sampler.distribution(logits, &seen, output_start);
            Draft {
                token: sampler.draw(&q),
                q: Some(q),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SpecStats;

    #[test]
    fn merged_stats_count_both_runs() {
        let (mut a, mut b) = (SpecStats::default(), SpecStats::default());
        a.record(1, 1);
        b.record(2, 1);
        b.record(2, 0);
        a.merge(&b);
        assert_eq!(a.offered, vec![3, 2]);
        assert_eq!(a.accepted, vec![2, 0]);
        assert_eq!(a.steps, 3);
        // (3 steps + 2 accepted drafts) / 3 steps.
        assert!((a.tokens_per_step() - 5.0 / 3.0).abs() < 1e-12);
    }
}
