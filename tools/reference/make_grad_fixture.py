"""PyTorch autograd reference for Fathom's pretraining loss and its gradients.

Builds a tiny DeepSeek-V3 (transformers' DeepseekV3ForCausalLM: MLA with q-LoRA, 1 dense + 2 MoE
layers with noaux_tc routing and a non-zero e_score_correction_bias) plus D = 2 MTP modules (each
enorm, hnorm, eh_proj, one DeepseekV3DecoderLayer, shared_head.norm; shared embedding and head),
computes on a fixed batch, in float64 on the f32-rounded weights,

  L = CE(main) + λ/D Σ_k CE(MTP k) + Σ_{MoE layers, MTP blocks too} α Σ_i f_i P_i

(f_i = N_r/(K_r T) Σ_t 1[i ∈ TopK(s_t)] on the unbiased sigmoid scores, P_i = mean_t s_i/Σ_j s_j, per
sequence, averaged over the batch) and writes `fixtures/grad_v3/`:
  config.json, model.safetensors (HF layout, MTP layers at num_hidden_layers + k),
  reference.safetensors: tokens [b, n+1] int64, losses (f64), grad.<param name> (f32) for every
  parameter (experts split to per-expert names like the checkpoint).

Run:  python tools/reference/make_grad_fixture.py --out fixtures
"""

import argparse
import json
import os
import shutil
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
import make_fixtures as mf  # noqa: E402

torch.set_grad_enabled(True)

LAMBDA = 0.3
ALPHA = 0.05  # large, so the balance-loss gradient is visible at the test's tolerance
DEPTH = 2

CFG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 96, "hidden_size": 48, "intermediate_size": 80, "moe_intermediate_size": 24,
    "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 2,
    "n_shared_experts": 1, "n_routed_experts": 8, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 24, "q_lora_rank": 32, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "qk_nope_head_dim": 16, "topk_method": "noaux_tc", "n_group": 4, "topk_group": 2,
    "num_experts_per_tok": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
    "max_position_embeddings": 64, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
    "use_cache": False, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
    "num_nextn_predict_layers": DEPTH, "torch_dtype": "float32",
}


def split_experts(prefix: str, name: str, t: torch.Tensor, out: dict):
    """Fused transformers-5 expert tensors → per-expert HF names (for weights and for gradients)."""
    if name.endswith("mlp.experts.gate_up_proj"):
        base = prefix + name[: -len("gate_up_proj")]
        inter = t.shape[1] // 2
        for e in range(t.shape[0]):
            out[f"{base}{e}.gate_proj.weight"] = t[e, :inter]
            out[f"{base}{e}.up_proj.weight"] = t[e, inter:]
    elif name.endswith("mlp.experts.down_proj"):
        base = prefix + name[: -len("down_proj")]
        for e in range(t.shape[0]):
            out[f"{base}{e}.down_proj.weight"] = t[e]
    else:
        out[prefix + name] = t


def build_mtp(cfg, depth: int, seed: int):
    """D MTP modules as in DeepSeek-V3 (module k at layer num_hidden_layers + k - 1)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3DecoderLayer, DeepseekV3RMSNorm)
    mods = []
    for k in range(depth):
        m = torch.nn.ModuleDict({
            "enorm": DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps),
            "hnorm": DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps),
            "eh_proj": torch.nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False),
            "block": DeepseekV3DecoderLayer(cfg, layer_idx=cfg.num_hidden_layers + k),
            "shared_head_norm": DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps),
        })
        with torch.no_grad():
            mf.init_weights(m, seed + k, 0.5)
        mods.append(m)
    return mods


def attach_router_hooks(model, mods) -> list:
    """Router logits of every MoE layer (main layers, then MTP blocks) land in the returned list."""
    captured = []

    def hook(_m, _inp, out):
        captured.append(out[0])
    for layer in list(model.model.layers) + [m["block"] for m in mods]:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(hook)
    return captured


def pretrain_loss(model, mods, tokens, lam: float, alpha: float, captured: list):
    """Fathom's objective (fathom-train `objective.rs`) in PyTorch: (total, lm, [L_k], balance)."""
    cfg = model.config
    vocab, E, K = cfg.vocab_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    captured.clear()
    b, n = tokens.shape[0], tokens.shape[1] - 1
    h = model.model(tokens[:, :n]).last_hidden_state
    lm = F.cross_entropy(model.lm_head(h).reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    seq_lens = [n] * (cfg.num_hidden_layers - cfg.first_k_dense_replace)
    mtp_losses = []
    prev = h
    for k0, m in enumerate(mods):
        k = k0 + 1
        ln = n - k
        emb = model.model.embed_tokens(tokens[:, k:k + ln])
        hin = m["eh_proj"](torch.cat([m["enorm"](emb), m["hnorm"](prev[:, :ln])], dim=-1))
        pos = torch.arange(ln)[None].expand(b, -1)
        cos_sin = model.model.rotary_emb(hin, pos)
        mask = torch.full((ln, ln), float("-inf"), dtype=hin.dtype).triu(1)[None, None]
        o = m["block"](hin, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        o = o[0] if isinstance(o, tuple) else o
        hk = m["shared_head_norm"](o)
        mtp_losses.append(F.cross_entropy(model.lm_head(hk).reshape(-1, vocab),
                                          tokens[:, k + 1:k + 1 + ln].reshape(-1)))
        seq_lens.append(ln)
        prev = hk
    assert len(captured) == len(seq_lens), (len(captured), seq_lens)
    bal = torch.zeros((), dtype=h.dtype)
    if alpha > 0:
        for logits, T in zip(captured, seq_lens):
            s = logits.to(h.dtype).sigmoid().reshape(b, T, E)
            P = (s / s.sum(-1, keepdim=True)).mean(1)                    # [b, E]
            top = s.detach().topk(K, dim=-1).indices                      # unbiased top-K
            f = torch.zeros(b, T, E, dtype=h.dtype).scatter_(2, top, 1.0).sum(1) * E / (K * T)
            bal = bal + alpha * (f * P).sum(-1).mean()
    total = lm + bal
    if mods:
        total = total + lam / len(mods) * sum(mtp_losses)
    return total, lm, mtp_losses, bal


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fixtures")
    args = ap.parse_args()
    with torch.no_grad():
        model = mf.build_model(CFG, seed=11)
    cfg = model.config
    cfg._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    L = cfg.num_hidden_layers
    mods = build_mtp(cfg, DEPTH, 100)
    # Round to f32 (what the checkpoint stores), then compute in f64.
    everything = torch.nn.ModuleList([model, *mods])
    everything.float()
    everything.double()

    def named_hf(with_grad: bool) -> dict:
        out = {}
        src = lambda p: (p.grad if with_grad else p.detach())  # noqa: E731
        for n, p in model.named_parameters():
            t = src(p)
            split_experts("", n, t if t is not None else torch.zeros_like(p), out)
        for k, m in enumerate(mods):
            pre = f"model.layers.{L + k}."
            for n, p in m.named_parameters():
                t = src(p)
                t = t if t is not None else torch.zeros_like(p)
                n = n.replace("shared_head_norm", "shared_head.norm").replace("block.", "")
                split_experts(pre, n, t, out)
        if not with_grad:
            for n, b in model.named_buffers():
                if n.endswith("e_score_correction_bias"):
                    out[n] = b
            for k, m in enumerate(mods):
                for n, b in m.named_buffers():
                    if n.endswith("e_score_correction_bias"):
                        out[f"model.layers.{L + k}." + n.replace("block.", "")] = b
        return {k: v.detach().float().contiguous() for k, v in out.items()}

    captured = attach_router_hooks(model, mods)

    g = torch.Generator().manual_seed(5)
    b, n = 2, 20
    tokens = torch.randint(2, CFG["vocab_size"], (b, n + 1), generator=g)
    total, lm, mtp_losses, bal = pretrain_loss(model, mods, tokens, LAMBDA, ALPHA, captured)
    total.backward()

    out_dir = os.path.join(args.out, "grad_v3")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(CFG, fh, indent=2)
    save_file(named_hf(False), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    ref = {f"grad.{k}": v for k, v in named_hf(True).items()}
    ref["tokens"] = tokens.to(torch.int64)
    for name, v in [("loss_total", total), ("loss_lm", lm), ("loss_balance", bal)] + \
            [(f"loss_mtp_{k + 1}", l) for k, l in enumerate(mtp_losses)]:
        ref[name] = v.detach().double().reshape(1)
    ref["lambda"] = torch.tensor([LAMBDA], dtype=torch.float64)
    ref["alpha"] = torch.tensor([ALPHA], dtype=torch.float64)
    save_file(ref, os.path.join(out_dir, "reference.safetensors"))
    print(f"grad_v3: loss {total.item():.6f} (lm {lm.item():.6f}, mtp {[round(l.item(), 6) for l in mtp_losses]}, "
          f"balance {bal.item():.6f}); {len(ref) - 8} gradient tensors")


if __name__ == "__main__":
    main()
