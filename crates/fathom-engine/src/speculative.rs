//! MTP speculative decoding (DeepSeek-V3 §2.2, §5.4.3: the MTP module as a draft model).
//!
//! After each verified token t_p at position p, MTP module 1 drafts: on (h_{p−1}, Emb(t_p)) — the
//! main model's last hidden state and the new token — it predicts t_{p+1}; module 2 (V3's
//! `num_nextn_predict_layers = 2`) reads module 1's state and Emb(d_1) and predicts t_{p+2}, and
//! so on down the chain; drafts past the last module reuse it on its own output hidden state and
//! the drafted token (the recursive reuse SGLang applies to V3's single module; `Drafter`). The
//! main model then verifies
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
//! The main cache is rolled back past the rejected drafts (`KvCache::truncate`); each MTP module's
//! own cache drops its draft rows and is extended with the verified rows' true hidden states on
//! the next draft call.

use crate::sampler::Sampler;
use candle_core::{Result, Tensor};
use fathom_core::ModelConfig;
use fathom_model::{CausalLm, KvCache};

/// Drafts per step the commands use unless told (`generate`, `chat`, `serve`): one per MTP module
/// — as DeepSeek-V3 deploys its one module — for models whose main layers are all dense, and 0
/// (off) for models with routed experts in the main layers. Measured (docs/speculative.md): a
/// dense-layer V3 decodes 1.5–1.9× faster with its modules drafting, while each verified row of the
/// MoE default model routes to other experts and costs nearly a step of its own, so speculation
/// there ran at 0.88–0.96× of plain decoding at the default temperature (0.91–0.97× in the server).
pub fn default_draft_tokens(cfg: &ModelConfig, mtp_modules: usize) -> usize {
    if (0..cfg.num_hidden_layers).any(|i| cfg.is_moe_layer(i)) {
        0
    } else {
        mtp_modules
    }
}

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

/// Drafts with the model's MTP modules; holds each module's KV cache for one sequence.
///
/// Module m (0-based; V3's module k = m + 1) at position i reads h^m_i (h^0 the main model's state,
/// h^{m+1} module m's output) and Emb(t_{i+m+1}), and predicts t_{i+m+2} — exactly as in training
/// (`fathom_train::objective`). After a step whose last verified position is p (its token t_{p+1}
/// the target's own), the chain drafts d_1 = t_{p+2} from module 0 at p, d_2 = t_{p+3} from
/// module 1 at p (reading Emb(d_1)), and so on: every module runs at position p, so module m's
/// rows p − m + 1 .. p read drafted tokens. Those rows are provisional and dropped afterwards;
/// module m's cache holds verified rows up to p − m, lagging m positions behind the main cache,
/// and the states h^m it has not consumed yet are carried to the next call. Drafts past the
/// last module reuse it recursively on its own output at positions p + 1, p + 2, … (SGLang's
/// treatment of V3's single module); with one module that is the whole scheme.
pub struct Drafter {
    /// One single-layer cache per module.
    caches: Vec<KvCache>,
    /// valid[m]: positions 0..valid[m] of module m's cache hold verified rows.
    valid: Vec<usize>,
    /// carry[m] (m ≥ 1): module m − 1's outputs at positions valid[m]..valid[m − 1] — inputs
    /// module m still has to take in. carry[0] is unused (module 0 reads the main model's rows).
    carry: Vec<Option<Tensor>>,
    /// next_of[i] = t_{i+1}, the verified token after position i.
    next_of: Vec<u32>,
}

/// A draft token and, when sampling, the draft distribution q it was drawn from.
pub struct Draft {
    pub token: u32,
    pub q: Option<Vec<f64>>,
}

impl Drafter {
    /// `None` when the model has no MTP module (speculation falls back to plain decoding). Drafts
    /// chain through every module the model holds (`CausalLm::mtp`; truncate it to reuse fewer).
    pub fn new(model: &CausalLm) -> Option<Self> {
        let modules = model.mtp.len();
        if modules == 0 {
            return None;
        }
        Some(Drafter {
            caches: (0..modules).map(|_| model.new_mtp_cache()).collect(),
            valid: vec![0; modules],
            carry: vec![None; modules],
            next_of: Vec::new(),
        })
    }

    /// Take in verified rows — `hidden` [n, d], the main model's final normed states at positions
    /// offset..offset+n, with `next_tokens`, the token after each — and draft `k` ≥ 1 tokens after
    /// the last of them. `pick` turns draft logits into a draft (given the drafts so far).
    pub fn draft(
        &mut self,
        model: &CausalLm,
        hidden: &Tensor,
        next_tokens: &[u32],
        offset: usize,
        k: usize,
        pick: &mut dyn FnMut(&[f32], &[u32]) -> Draft,
    ) -> Result<Vec<Draft>> {
        let n = next_tokens.len();
        if offset != self.valid[0] || offset != self.next_of.len() {
            candle_core::bail!(
                "the MTP cache holds {} positions, rows start at {offset}",
                self.valid[0]
            )
        }
        if n == 0 || hidden.dim(0)? != n || k == 0 {
            candle_core::bail!(
                "drafting needs at least one row ({n} tokens, {} states) and k ≥ 1 (k = {k})",
                hidden.dim(0)?
            )
        }
        let modules = self.caches.len();
        if model.mtp.len() < modules {
            candle_core::bail!(
                "the drafter chains {modules} MTP modules, the model has {}",
                model.mtp.len()
            )
        }
        self.next_of.extend_from_slice(next_tokens);
        let p = offset + n - 1;
        let mut drafts: Vec<Draft> = Vec::with_capacity(k);
        let mut drafted: Vec<u32> = Vec::with_capacity(k);
        // t_j: verified, or one of this step's drafts.
        let token = |j: usize, drafted: &[u32]| -> u32 {
            match self.next_of.get(j - 1) {
                Some(&t) => t,
                None => drafted[j - 1 - self.next_of.len()],
            }
        };
        // Module m's input states over its rows valid[m]..=p; module 0 reads the main model's.
        let mut input = hidden.clone();
        let mut last_out = None;
        let chain = k.min(modules);
        for m in 0..chain {
            let start = self.valid[m];
            let ids: Vec<u32> = (start..=p).map(|i| token(i + m + 1, &drafted)).collect();
            let out = run_module(model, m, &mut self.caches[m], &input, &ids, start)?;
            // Rows i < p + 1 − m read only verified tokens.
            let verified = (p + 1).saturating_sub(m).max(start);
            if m > 0 {
                // Module m has consumed its inputs up to `verified`; keep the rest that is verified.
                let upto = self.valid[m - 1];
                self.carry[m] = (verified < upto)
                    .then(|| input.narrow(0, verified - start, upto - verified))
                    .transpose()?;
            }
            self.valid[m] = verified;
            let last = out.narrow(0, p - start, 1)?;
            take_draft(model, &last, pick, &mut drafted, &mut drafts)?;
            if m + 1 < modules {
                // Module m + 1's inputs: the carried verified states, then this call's outputs.
                let fresh = out.narrow(0, 0, verified - start)?;
                let carried = self.carry[m + 1].take();
                if m + 1 < chain {
                    input = match carried {
                        Some(c) => Tensor::cat(&[&c, &out], 0)?,
                        None => out.clone(),
                    };
                } else {
                    // Module m + 1 does not run this step: it will need the verified states.
                    self.carry[m + 1] = match carried {
                        Some(c) => Some(Tensor::cat(&[&c, &fresh], 0)?),
                        None => (fresh.dim(0)? > 0).then_some(fresh),
                    };
                }
            }
            last_out = Some(last);
        }
        // Drafts past the chain: the last module reused on its own output at p + 1, p + 2, ….
        let reused = chain - 1;
        let mut pos = p + 1;
        let mut prev = last_out.expect("the chain runs at least module 0");
        while drafts.len() < k && pos < model.rope.max_positions() {
            let t = *drafted.last().expect("one draft at least");
            let h = run_module(model, reused, &mut self.caches[reused], &prev, &[t], pos)?;
            take_draft(model, &h, pick, &mut drafted, &mut drafts)?;
            prev = h;
            pos += 1;
        }
        // Drop the provisional rows (kept until now: the reused module attends over its own).
        for (cache, &valid) in self.caches.iter_mut().zip(&self.valid) {
            cache.truncate(valid)?;
        }
        Ok(drafts)
    }
}

/// MTP module `m` over rows start.. : input states [rows, d] and the token each row reads; its cache
/// grows by the rows. Returns its output states [rows, d].
fn run_module(
    model: &CausalLm,
    m: usize,
    cache: &mut KvCache,
    input: &Tensor,
    ids: &[u32],
    start: usize,
) -> Result<Tensor> {
    let next = model.embed(&Tensor::new(ids, &model.device)?.unsqueeze(0)?)?;
    model.mtp[m]
        .forward_decode(
            &input.unsqueeze(0)?,
            &next,
            &model.rope,
            start,
            &mut cache.layers[0],
        )?
        .squeeze(0)
}

/// The draft one output state [1, d] gives (through the shared head and `pick`), appended.
fn take_draft(
    model: &CausalLm,
    state: &Tensor,
    pick: &mut dyn FnMut(&[f32], &[u32]) -> Draft,
    drafted: &mut Vec<u32>,
    drafts: &mut Vec<Draft>,
) -> Result<()> {
    let logits: Vec<f32> = model
        .logits(&state.unsqueeze(0)?)?
        .flatten_all()?
        .to_vec1()?;
    let d = pick(&logits, drafted);
    drafted.push(d.token);
    drafts.push(d);
    Ok(())
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
    use super::{default_draft_tokens, SpecStats};
    use fathom_core::ModelConfig;
    use std::path::Path;

    /// On by default (one draft per module) for dense-layer models, off with routed experts.
    #[test]
    fn speculation_defaults_on_for_dense_layers_only() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/deepseek_v3_tiny");
        let text = std::fs::read_to_string(root.join("config.json")).unwrap();
        let mut raw: serde_json::Value = serde_json::from_str(&text).unwrap();
        let moe = ModelConfig::from_value(raw.clone(), &root).unwrap();
        assert!(moe.is_moe_layer(1));
        assert_eq!(default_draft_tokens(&moe, 1), 0);
        raw["first_k_dense_replace"] = raw["num_hidden_layers"].clone();
        let dense = ModelConfig::from_value(raw, &root).unwrap();
        assert_eq!(default_draft_tokens(&dense, 1), 1);
        assert_eq!(default_draft_tokens(&dense, 2), 2);
        assert_eq!(default_draft_tokens(&dense, 0), 0);
    }

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
