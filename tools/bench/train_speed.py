"""Training throughput, Fathom vs PyTorch, same model, batch and objective, side by side.

For a `fathom train` preset, builds the same DeepseekV3ForCausalLM in transformers (plus the MTP
modules and the sequence-wise balance loss, `make_grad_fixture.pretrain_loss`), and times full
optimizer steps (forward, backward, clip, AdamW) on CPU with the same thread count. Fathom's
number is the per-step tokens/s that `fathom train` logs (evaluation and checkpoint time excluded
on both sides). Prints a Markdown table row; --sweep also times Fathom under candle thread settings.

Run:  python tools/bench/train_speed.py --preset tiny --steps 40 --threads 2 [--sweep]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tools", "reference"))
import make_fixtures as mf  # noqa: E402
import make_grad_fixture as gf  # noqa: E402

torch.set_grad_enabled(True)


def hf_config(m: dict) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": m["vocab_size"], "hidden_size": m["hidden_size"],
        "intermediate_size": m["intermediate_size"], "moe_intermediate_size": m["moe_intermediate_size"],
        "num_hidden_layers": m["num_hidden_layers"], "num_attention_heads": m["num_attention_heads"],
        "num_key_value_heads": m["num_attention_heads"], "n_shared_experts": m["n_shared_experts"],
        "n_routed_experts": m["n_routed_experts"], "routed_scaling_factor": m.get("routed_scaling_factor", 1.0),
        "kv_lora_rank": m["kv_lora_rank"], "q_lora_rank": m.get("q_lora_rank"),
        "qk_rope_head_dim": m["qk_rope_head_dim"], "v_head_dim": m["v_head_dim"],
        "qk_nope_head_dim": m["qk_nope_head_dim"], "topk_method": "noaux_tc", "n_group": m.get("n_group", 1),
        "topk_group": m.get("topk_group", 1), "num_experts_per_tok": m["num_experts_per_tok"],
        "first_k_dense_replace": m.get("first_k_dense_replace", 0), "moe_layer_freq": 1,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
        "max_position_embeddings": m["max_position_embeddings"], "rms_norm_eps": 1e-6, "use_cache": False,
        "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "rope_theta": 10000.0,
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "num_nextn_predict_layers": m.get("num_nextn_predict_layers", 0),
    }


def pytorch_tokens_per_s(cfg: dict, steps: int, warmup: int, threads: int, attn: str) -> tuple[float, str]:
    torch.set_num_threads(threads)
    m, d, t = cfg["model"], cfg["data"], cfg["train"]
    with torch.no_grad():
        model = mf.build_model(hf_config(m), seed=0)
    model.config._attn_implementation = attn
    model.train()
    mods = gf.build_mtp(model.config, m.get("num_nextn_predict_layers", 0), 1)
    captured = gf.attach_router_hooks(model, mods)
    params = list(model.parameters()) + [p for mm in mods for p in mm.parameters()]
    opt = torch.optim.AdamW(params, lr=t["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    lam = cfg.get("mtp", {}).get("loss_weight", 0.3)
    alpha = cfg.get("balance", {}).get("seq_aux_alpha", 1e-4)
    b, n, acc = t["batch_size"], d["seq_len"], t.get("grad_accum", 1)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, m["vocab_size"], (b, n + 1), generator=g) for _ in range(acc)]
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for tok in batches:
            total, *_ = gf.pretrain_loss(model, mods, tok, lam, alpha, captured)
            (total / acc).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    impl = f"attn={model.config._attn_implementation}, experts={getattr(model.config, '_experts_implementation', '?')}"
    return b * n * acc * len(times) / sum(times), impl


def fathom_tokens_per_s(fathom: str, preset: str, steps: int, warmup: int, env: dict, extra: list) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAYON_", "CANDLE_"))}
        subprocess.run([fathom, "train", "--preset", preset, "--out", out, "--max-steps",
                        str(warmup + steps), *extra], check=True, env={**clean, **env},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    tps = [r["tokens_per_s"] for r in recs[warmup:]]
    # Aggregate as total tokens / total time (harmonic mean of per-step rates).
    return len(tps) / sum(1.0 / x for x in tps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fathom", default=os.path.join(ROOT, "target", "release", "fathom"))
    ap.add_argument("--sweep", action="store_true", help="also time Fathom under other candle thread settings")
    args = ap.parse_args()
    with open(os.path.join(ROOT, "crates", "fathom-train", "presets", f"{args.preset}.toml"), "rb") as f:
        cfg = tomllib.load(f)

    t = str(args.threads)
    # (name, env, extra args). Default: `fathom train`'s own choice, batch shards on `t` threads
    # with candle single-threaded inside each.
    settings = [(f"default: {t} data-parallel shards", {}, ["--threads", t])]
    if args.sweep:
        settings += [
            ("1 shard, candle 1 thread", {"RAYON_NUM_THREADS": "1"}, ["--threads", "1"]),
            (f"1 shard, candle {t} threads", {"RAYON_NUM_THREADS": t}, ["--threads", "1"]),
            (f"1 shard, candle {t} threads, spin 0",
             {"RAYON_NUM_THREADS": t, "CANDLE_BARRIER_POOL_SPIN_LIMIT": "0"}, ["--threads", "1"]),
        ]
    # Interleave the two engines so machine noise hits both alike.
    py, fa = {}, {name: [] for name, _, _ in settings}
    for _ in range(2):
        # PyTorch at its best: both attention implementations, the faster one counts.
        for attn in ("eager", "sdpa"):
            p, impl = pytorch_tokens_per_s(cfg, args.steps, args.warmup, args.threads, attn)
            py.setdefault(impl, []).append(p)
        for name, env, extra in settings:
            fa[name].append(fathom_tokens_per_s(args.fathom, args.preset, args.steps, args.warmup, env, extra))
    for impl, runs in py.items():
        print(f"PyTorch {torch.__version__} ({impl}), {args.threads} threads: runs {[round(x) for x in runs]} tok/s")
    best_impl, runs = max(py.items(), key=lambda kv: max(kv[1]))
    py_best = max(runs)
    print(f"PyTorch best: {best_impl}, {py_best:.0f} tok/s")
    print("| preset | threads | Fathom setting | Fathom tok/s | PyTorch tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    for name, vals in fa.items():
        best = max(vals)
        print(f"| {args.preset} | {args.threads} | {name} | {best:.0f} | {py_best:.0f} | {best / py_best:.2f}× |")


if __name__ == "__main__":
    main()
