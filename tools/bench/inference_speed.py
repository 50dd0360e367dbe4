"""Fathom inference settings side by side on one model: cache (latent vs plain), weights (f32 vs
quantised) and candle threads, each through `fathom bench --json`, interleaved over repeats so
machine noise hits all alike. Prints a Markdown table with ratios to the first row.

Run:  python3 tools/bench/inference_speed.py --model models/base [--pp 256 --tg 128]   (stdlib only)
"""

import argparse
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench(fathom, model, pp, tg, args):
    out = subprocess.run([fathom, "bench", "--model", model, "--prompt-tokens", str(pp), "--gen-tokens",
                          str(tg), "--repeat", "1", "--json", *args], check=True, capture_output=True,
                         text=True, cwd=ROOT)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--pp", type=int, default=256)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fathom", default=os.path.join(ROOT, "target", "release", "fathom"))
    a = ap.parse_args()
    settings = [
        ("latent cache, f32, 1 thread", ["--threads", "1"]),
        ("latent cache, f32, 2 threads", ["--threads", "2"]),
        ("plain cache, f32, 1 thread", ["--threads", "1", "--plain-cache"]),
        ("latent cache, q8_0, 1 thread", ["--threads", "1", "--quant", "q8_0"]),
        ("latent cache, q4_0, 1 thread", ["--threads", "1", "--quant", "q4_0"]),
    ]
    best = {name: None for name, _ in settings}
    for _ in range(a.rounds):
        for name, args in settings:
            r = bench(a.fathom, a.model, a.pp, a.tg, args)
            b = best[name]
            if b is None:
                best[name] = r
            else:
                for k in ("prefill_tok_s", "decode_tok_s"):
                    b[k] = max(b[k], r[k])
                b["ttft_ms"] = min(b["ttft_ms"], r["ttft_ms"])
                b["peak_rss_bytes"] = min(b["peak_rss_bytes"], r["peak_rss_bytes"])
    base = best[settings[0][0]]
    print(f"model {a.model}: {base['total_params']} params ({base['active_params']} active), pp{a.pp} / tg{a.tg}, "
          f"best of {a.rounds}")
    print("| setting | prefill tok/s | decode tok/s | decode vs first row | TTFT ms | peak RSS MB | KV bytes/token |")
    print("|---|---|---|---|---|---|---|")
    for name, _ in settings:
        r = best[name]
        print(f"| {name} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.0f} | "
              f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}× | {r['ttft_ms']:.1f} | "
              f"{r['peak_rss_bytes'] / 1e6:.1f} | {r['kv_bytes_per_token']} |")


if __name__ == "__main__":
    main()
