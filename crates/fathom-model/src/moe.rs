//! DeepSeekMoE (V2 §2.2, V3 §2.1.2): shared experts always on, plus top-k of many fine-grained
//! routed experts.
//!
//! Routing (`route_tokens`), per token t with gate logits u_t = W_gate·x_t (f32: quantisation noise
//! flips routing):
//! - softmax `greedy` (V2-Lite): s = softmax(u); top-k on s.
//! - softmax `group_limited_greedy` (V2): group score = max of s in the group; keep `topk_group`
//!   groups; top-k on s within them.
//! - sigmoid `noaux_tc` (V3): s = σ(u); s' = s + b (`e_score_correction_bias`, selection only);
//!   group score = sum of the group's top-2 s'; keep `topk_group` groups; top-k on s'.
//!
//! Excluded groups are masked to −inf (official semantics; old HF V2 code used 0.0 — equal for
//! softmax scores unless k exceeds the kept experts). Weights are the *unbiased* s at the chosen
//! experts, divided by their sum (+1e-20) when `norm_topk_prob`, times `routed_scaling_factor`.
//! Output = Σ_e w_e·expert_e(x) + shared(x). Index selection is not differentiable; the weights are
//! (gathered from s), and expert outputs are combined with `index_add` (its backward is correct).

use crate::mlp::Mlp;
use crate::ops::{linear, sigmoid, softmax_last};
use crate::rows_matmul::axpy;
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use fathom_core::{ModelConfig, MoeConfig, ScoringFunc, TopkMethod};

#[derive(Debug, Clone)]
pub struct Gate {
    pub weight: Tensor,
    /// V3 only: added to scores for selection, never to weights; updated by the balancing rule, not
    /// by gradients.
    pub e_score_correction_bias: Option<Tensor>,
    pub cfg: MoeConfig,
}

/// Routing decision for a batch of tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    /// [n_tokens, k] chosen experts.
    pub experts: Vec<Vec<u32>>,
    /// [n_tokens, k] combination weights (differentiable w.r.t. gate weight and input).
    pub weights: Tensor,
    /// [n_tokens, E] the unbiased scores s (for balance losses).
    pub scores: Tensor,
}

/// Indices of the k largest values (ties: lower index first), in descending order.
fn top_k(values: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| {
        values[b]
            .partial_cmp(&values[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx
}

/// Pure selection rule on one token's scores (already biased for noaux_tc).
pub fn select_experts(choice: &[f64], cfg: &MoeConfig) -> Vec<usize> {
    let e = choice.len();
    let mut masked = choice.to_vec();
    if cfg.topk_method != TopkMethod::Greedy && cfg.n_group > 1 {
        let per = e / cfg.n_group;
        let group_score: Vec<f64> = (0..cfg.n_group)
            .map(|g| {
                let grp = &choice[g * per..(g + 1) * per];
                match cfg.topk_method {
                    TopkMethod::NoauxTc => top_k(grp, 2.min(per)).iter().map(|&i| grp[i]).sum(),
                    _ => grp.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                }
            })
            .collect();
        let keep = top_k(&group_score, cfg.topk_group);
        for g in 0..cfg.n_group {
            if !keep.contains(&g) {
                for v in &mut masked[g * per..(g + 1) * per] {
                    *v = f64::NEG_INFINITY;
                }
            }
        }
    }
    top_k(&masked, cfg.num_experts_per_tok)
}

/// The whole rule for one token on host floats (the planned decode step's router): scores from
/// the gate logits (f32, as `route_tokens` computes them), selection by [`select_experts`] on
/// s (+ bias), weights = unbiased s at the chosen experts, normalised and scaled in f32.
/// Returns (expert, weight) in selection order.
pub fn route_row(cfg: &MoeConfig, bias: Option<&[f32]>, logits: &[f32]) -> Vec<(usize, f32)> {
    let scores: Vec<f32> = match cfg.scoring_func {
        ScoringFunc::Sigmoid => logits.iter().map(|&u| 1.0 / ((-u).exp() + 1.0)).collect(),
        ScoringFunc::Softmax => {
            let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let e: Vec<f32> = logits.iter().map(|&v| (v - max).exp()).collect();
            let sum: f32 = e.iter().sum();
            e.iter().map(|&v| v / sum).collect()
        }
    };
    let choice: Vec<f64> = match bias {
        Some(b) => scores
            .iter()
            .zip(b)
            .map(|(&s, &b)| s as f64 + b as f64)
            .collect(),
        None => scores.iter().map(|&s| s as f64).collect(),
    };
    let chosen = select_experts(&choice, cfg);
    let mut w: Vec<f32> = chosen.iter().map(|&e| scores[e]).collect();
    if cfg.norm_topk_prob {
        let sum = w.iter().sum::<f32>() + 1e-20;
        w.iter_mut().for_each(|v| *v /= sum);
    }
    let scale = cfg.routed_scaling_factor as f32;
    chosen
        .into_iter()
        .zip(w.into_iter().map(|v| v * scale))
        .collect()
}

impl Gate {
    pub fn load(vb: VarBuilder, hidden: usize, cfg: &MoeConfig) -> Result<Self> {
        let weight = vb.get_with_hints(
            (cfg.n_routed_experts, hidden),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let e_score_correction_bias = if cfg.topk_method == TopkMethod::NoauxTc {
            Some(vb.get_with_hints(
                cfg.n_routed_experts,
                "e_score_correction_bias",
                candle_nn::Init::Const(0.0),
            )?)
        } else {
            None
        };
        Ok(Gate {
            weight,
            e_score_correction_bias,
            cfg: cfg.clone(),
        })
    }

    /// Decide experts and weights for x [n, d].
    pub fn route_tokens(&self, x: &Tensor) -> Result<Routing> {
        // [n, E]; few inference rows through the host kernel the planned decode step's router
        // uses too, so both paths route a token identically (a near-tie flipped otherwise).
        let logits = match crate::rows_matmul::matmul_rows(x, &self.weight)? {
            Some(l) => l,
            None => linear(x, &self.weight, None)?,
        };
        let scores = match self.cfg.scoring_func {
            ScoringFunc::Softmax => softmax_last(&logits)?,
            ScoringFunc::Sigmoid => sigmoid(&logits)?,
        };
        let s_host: Vec<Vec<f64>> = scores.detach().to_dtype(DType::F64)?.to_vec2()?;
        let bias: Option<Vec<f64>> = match &self.e_score_correction_bias {
            Some(b) => Some(b.detach().to_dtype(DType::F64)?.to_vec1()?),
            None => None,
        };
        let experts: Vec<Vec<u32>> = s_host
            .iter()
            .map(|s| {
                let choice: Vec<f64> = match &bias {
                    Some(b) => s.iter().zip(b).map(|(a, b)| a + b).collect(),
                    None => s.clone(),
                };
                select_experts(&choice, &self.cfg)
                    .into_iter()
                    .map(|i| i as u32)
                    .collect()
            })
            .collect();
        let n = experts.len();
        let k = self.cfg.num_experts_per_tok;
        let idx = Tensor::from_vec(
            experts.iter().flatten().copied().collect::<Vec<u32>>(),
            (n, k),
            x.device(),
        )?;
        let mut w = scores.gather(&idx, 1)?; // unbiased s at the chosen experts
        if self.cfg.norm_topk_prob {
            w = w.broadcast_div(&(w.sum_keepdim(1)? + 1e-20)?)?;
        }
        let weights = (w * self.cfg.routed_scaling_factor)?;
        Ok(Routing {
            experts,
            weights,
            scores,
        })
    }
}

/// Batches up to this many tokens take the host expert pass ([`Moe::routed_host`]).
const HOST_MAX_ROWS: usize = 64;

#[derive(Debug, Clone)]
pub struct Moe {
    pub gate: Gate,
    pub experts: Vec<Mlp>,
    pub shared_experts: Option<Mlp>,
}

impl Moe {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let m = cfg.moe.clone().expect("MoE config");
        let gate = Gate::load(vb.pp("gate"), cfg.hidden_size, &m)?;
        let experts = (0..m.n_routed_experts)
            .map(|e| {
                Mlp::load(
                    vb.pp("experts").pp(e),
                    cfg.hidden_size,
                    m.moe_intermediate_size,
                    false,
                    &cfg.weights,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let shared_experts = if m.n_shared_experts > 0 {
            Some(Mlp::load(
                vb.pp("shared_experts"),
                cfg.hidden_size,
                m.moe_intermediate_size * m.n_shared_experts,
                false,
                &cfg.weights,
            )?)
        } else {
            None
        };
        Ok(Moe {
            gate,
            experts,
            shared_experts,
        })
    }

    /// x [b, s, d] → [b, s, d], with the routing used (for load statistics).
    pub fn forward_with_routing(&self, x: &Tensor) -> Result<(Tensor, Routing)> {
        let (b, s, d) = x.dims3()?;
        let flat = x.reshape((b * s, d))?;
        let routing = self.gate.route_tokens(&flat)?;
        let k = self.gate.cfg.num_experts_per_tok;
        // Group (token, slot) pairs by expert so each expert runs once on its tokens.
        let mut per_expert: Vec<(Vec<u32>, Vec<u32>)> = vec![(vec![], vec![]); self.experts.len()];
        for (t, chosen) in routing.experts.iter().enumerate() {
            for (slot, &e) in chosen.iter().enumerate() {
                per_expert[e as usize].0.push(t as u32);
                per_expert[e as usize].1.push((t * k + slot) as u32);
            }
        }
        let routed = match self.routed_host(&flat, &routing, &per_expert)? {
            Some(out) => out,
            None => self.routed_tensors(&flat, &routing, &per_expert)?,
        };
        let out = match &self.shared_experts {
            Some(sh) => (routed + sh.forward(&flat)?)?,
            None => routed,
        };
        Ok((out.reshape((b, s, d))?, routing))
    }

    /// Σ_k g_k·FFN_k(x) over each token's routed experts, expert by expert as candle ops (the
    /// training path: every op records its backward).
    fn routed_tensors(
        &self,
        flat: &Tensor,
        routing: &Routing,
        per_expert: &[(Vec<u32>, Vec<u32>)],
    ) -> Result<Tensor> {
        let n = flat.dim(0)?;
        let k = self.gate.cfg.num_experts_per_tok;
        let flat_w = routing.weights.reshape((n * k, 1))?;
        let mut out = flat.zeros_like()?;
        for (e, (tokens, slots)) in per_expert.iter().enumerate() {
            if tokens.is_empty() {
                continue;
            }
            let tok = Tensor::from_slice(tokens, tokens.len(), flat.device())?;
            let pos = Tensor::from_slice(slots, slots.len(), flat.device())?;
            let y = self.experts[e].forward(&flat.index_select(&tok, 0)?)?;
            let y = y.broadcast_mul(&flat_w.index_select(&pos, 0)?)?;
            out = out.index_add(&tok, &y, 0)?;
        }
        Ok(out)
    }

    /// The same sum for a decode-sized batch in one host pass (inference only: f32 on the CPU,
    /// nothing tracking gradients, dense expert weights): each active expert's tokens are
    /// gathered, run through [`Mlp::forward_host`] and added with their gate weights — no
    /// per-expert tensor ops (at 16 sequences nearly every expert is active, and ~11 small ops
    /// each dominated the step). `None` when it does not apply.
    fn routed_host(
        &self,
        flat: &Tensor,
        routing: &Routing,
        per_expert: &[(Vec<u32>, Vec<u32>)],
    ) -> Result<Option<Tensor>> {
        let (n, d) = flat.dims2()?;
        if n > HOST_MAX_ROWS
            || flat.dtype() != DType::F32
            || !flat.device().is_cpu()
            || flat.track_op()
            || routing.weights.track_op()
        {
            return Ok(None);
        }
        let xs: Vec<f32> = flat.flatten_all()?.to_vec1()?;
        let gate_w: Vec<f32> = routing.weights.flatten_all()?.to_vec1()?;
        let active: Vec<usize> = (0..per_expert.len())
            .filter(|&e| !per_expert[e].0.is_empty())
            .collect();
        // Each active expert's SwiGLU on its gathered tokens, experts split over the pool's
        // threads (at 16 sequences nearly every expert runs; each is too small to split alone).
        let outputs: Vec<std::sync::Mutex<Option<Vec<f32>>>> =
            active.iter().map(|_| Default::default()).collect();
        let work: usize = active
            .iter()
            .map(|&e| per_expert[e].0.len() * 3 * d * self.experts[e].intermediate_size())
            .sum();
        crate::parallel::for_chunks(active.len(), work, |chunk| {
            let mut rows = Vec::new();
            for i in chunk {
                let (e, tokens) = (active[i], &per_expert[active[i]].0);
                rows.clear();
                for &t in tokens {
                    rows.extend_from_slice(&xs[t as usize * d..][..d]);
                }
                let y = self.experts[e].forward_host(&rows, tokens.len());
                *outputs[i].lock().expect("no thread panicked holding it") = y;
            }
        });
        // Gate-weighted sum in expert order, as a serial pass would add them.
        let mut out = vec![0f32; n * d];
        for (i, &e) in active.iter().enumerate() {
            let Some(y) = outputs[i].lock().expect("region finished").take() else {
                return Ok(None);
            };
            let (tokens, slots) = &per_expert[e];
            for (r, (&t, &slot)) in tokens.iter().zip(slots).enumerate() {
                axpy(
                    &mut out[t as usize * d..][..d],
                    gate_w[slot as usize],
                    &y[r * d..][..d],
                );
            }
        }
        Ok(Some(Tensor::from_vec(out, (n, d), flat.device())?))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_routing(x)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(method: TopkMethod, groups: usize, topk_group: usize, k: usize) -> MoeConfig {
        MoeConfig {
            n_routed_experts: 8,
            n_shared_experts: 1,
            num_experts_per_tok: k,
            moe_intermediate_size: 4,
            first_k_dense_replace: 0,
            moe_layer_freq: 1,
            n_group: groups,
            topk_group,
            topk_method: method,
            scoring_func: ScoringFunc::Sigmoid,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
        }
    }

    #[test]
    fn noaux_tc_ranks_groups_by_top2_sum_not_max() {
        // Groups of 2: g0 = {0.9, 0.0} (max 0.9, sum 0.9), g1 = {0.6, 0.6} (sum 1.2),
        // g2 = {0.5, 0.5} (sum 1.0), g3 = {0.1, 0.1}. Keep 2 groups → g1, g2; top-2 → 2, 3.
        let s = [0.9, 0.0, 0.6, 0.6, 0.5, 0.5, 0.1, 0.1];
        let mut got = select_experts(&s, &cfg(TopkMethod::NoauxTc, 4, 2, 2));
        got.sort();
        assert_eq!(got, vec![2, 3]);
        // Group-limited greedy ranks by max: g0 (0.9) and g1 (0.6) → experts 0 and 2 (or 3).
        let got = select_experts(&s, &cfg(TopkMethod::GroupLimitedGreedy, 4, 2, 2));
        assert_eq!(got[0], 0);
        assert!(got[1] == 2 || got[1] == 3);
        // Greedy ignores groups.
        assert_eq!(
            select_experts(&s, &cfg(TopkMethod::Greedy, 4, 2, 1)),
            vec![0]
        );
    }

    #[test]
    fn excluded_groups_are_never_chosen_even_with_negative_scores() {
        // All kept scores negative: masking with 0.0 would wrongly admit excluded experts; −inf does not.
        let s = [-0.5, -0.6, -0.1, -0.2, -3.0, -4.0, -5.0, -6.0];
        let got = select_experts(&s, &cfg(TopkMethod::NoauxTc, 4, 1, 2));
        let mut got = got;
        got.sort();
        assert_eq!(got, vec![2, 3]);
    }
}
