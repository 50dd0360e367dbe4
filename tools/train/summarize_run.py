"""Summarise a `fathom train` run directory: validation curve and MaxVio statistics.

Run:  python3 tools/train/summarize_run.py runs/tiny [runs/tiny-nobias ...]   (stdlib only)
"""

import json
import statistics
import sys


def summarize(run: str, after: int):
    recs = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if l.strip()]
    vals = [(r["step"], r["val_loss"], r.get("val_bpb")) for r in recs if "val_loss" in r]
    layers = sorted({l for r in recs for l, _ in r["max_vio"]})
    late = [r for r in recs if r["step"] > after]
    print(f"## {run}: {len(recs)} steps, {recs[-1]['tokens_seen']} tokens")
    print("val loss (nats/token) / bits per byte by step: " +
          ", ".join(f"{s}: {v:.3f}/{b:.3f}" for s, v, b in vals))
    print(f"MaxVio per MoE layer over steps {after + 1}..{recs[-1]['step']} (mean / median / max):")
    for l in layers:
        xs = [v for r in late for ll, v in r["max_vio"] if ll == l]
        print(f"  layer {l}: {statistics.mean(xs):.3f} / {statistics.median(xs):.3f} / {max(xs):.3f}")
    last_val = [r for r in recs if "val_max_vio" in r][-1]
    print(f"MaxVio over the whole validation set at step {last_val['step']} (V3's MaxVio_global): " +
          ", ".join(f"layer {l}: {v:.3f}" for l, v in last_val["val_max_vio"]))
    tps = [r["tokens_per_s"] for r in recs[5:]]
    print(f"tokens/s (per step, harmonic mean after step 5): {len(tps) / sum(1 / t for t in tps):.0f}")


if __name__ == "__main__":
    for run in sys.argv[1:]:
        summarize(run, after=100)
