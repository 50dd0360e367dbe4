"""Fathom vs llama.cpp on the same GGUF files, same quantisation, same thread count.

For each model × format it runs `llama-bench -p PP -n TG -t T -o json` and
`fathom bench --model FILE.gguf --threads T --format json`, alternating the two engines over
rounds so machine noise hits both alike, keeps each engine's best, and prints a Markdown table
with the ratios (Fathom / llama.cpp) and decode against the memory-bandwidth roofline.

Setup (once):
  LLAMA=$(tools/gguf/get_llama_cpp.sh /tmp/llama-cpp)               # llama.cpp from the PyPI sdist
  python tools/bench/make_bench_models.py --out runs/bench-models   # the HF models
  for m in v3-210m qwen2-150m; do                                   # llama.cpp's own converter
    python tools/gguf/convert.py --llama-cpp $LLAMA -- runs/bench-models/$m --outtype q8_0 --outfile runs/bench-models/$m.q8_0.gguf
    python tools/gguf/convert.py --llama-cpp $LLAMA -- runs/bench-models/$m --outtype f16 --outfile runs/bench-models/$m.f16.gguf
    $LLAMA/build/bin/llama-quantize --pure runs/bench-models/$m.f16.gguf runs/bench-models/$m.q4_0.gguf Q4_0
  done
Run:
  python tools/bench/llama_cpp_compare.py --llama-cpp $LLAMA [--threads 2 --pp 512 --tg 128 --rounds 2]
      [--formats q8_0,q4_0,q4_k_m,q4_1,...] [--baseline OLD_FATHOM_BINARY] [--depth 4096]
Other formats: `llama-quantize runs/bench-models/$m.f16.gguf runs/bench-models/$m.q4_k_m.gguf Q4_K_M`
(file names are `{model}.{format in lower case}.gguf`). `--baseline` also runs a previous Fathom
binary in the same rounds and reports new / previous; `--depth D` adds decode after a D-token
context (llama-bench `-d D`, Fathom `decode_after_prompt_tok_s` with a D-token prompt).
The V2-Lite-sized model (10.4 GB, random weights, no torch needed):
  python tools/bench/make_v2_lite_gguf.py --out runs/bench-models/v2-lite.q4_k_m.gguf
  python tools/bench/llama_cpp_compare.py --llama-cpp $LLAMA --names v2-lite --formats q4_k_m --pp 64 --tg 16
"""

import argparse
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def llama_bench(binary, model, pp, tg, threads):
    out = subprocess.run([binary, "-m", model, "-p", str(pp), "-n", str(tg), "-t", str(threads), "-r", "1",
                          "-o", "json"], check=True, capture_output=True, text=True)
    rows = json.loads(out.stdout)
    pp_ts = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg_ts = next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return pp_ts, tg_ts


def fathom_bench(binary, model, pp, tg, threads):
    out = subprocess.run([binary, "bench", "--model", model, "--prompt-tokens", str(pp), "--gen-tokens", str(tg),
                          "--threads", str(threads), "--repeat", "1", "--format", "json", "--no-spec"], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout)


def llama_bench_depth(binary, model, depth, tg, threads):
    out = subprocess.run([binary, "-m", model, "-p", "0", "-n", str(tg), "-d", str(depth), "-t", str(threads),
                          "-r", "1", "-o", "json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)[0]["avg_ts"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp source dir with build/bin/llama-bench")
    ap.add_argument("--models", default=os.path.join(ROOT, "runs", "bench-models"))
    ap.add_argument("--names", default="v3-210m,qwen2-150m")
    ap.add_argument("--formats", default="q8_0,q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fathom", default=os.path.join(ROOT, "target", "release", "fathom"))
    ap.add_argument("--baseline", help="a previous fathom binary, run in the same rounds")
    ap.add_argument("--depth", type=int, default=0, help="also decode after a context of this many tokens")
    a = ap.parse_args()
    lb = os.path.join(a.llama_cpp, "build", "bin", "llama-bench")
    rows = []
    for name in a.names.split(","):
        for fmt in a.formats.split(","):
            path = os.path.join(a.models, f"{name}.{fmt}.gguf")
            if not os.path.exists(path):
                print(f"skipped: {path} does not exist", flush=True)
                continue
            best = {"lpp": 0, "ltg": 0, "fpp": 0, "ftg": 0, "bpp": 0, "btg": 0, "ld": 0, "fd": 0}
            rep, roof = None, 0.0
            for _ in range(a.rounds):
                lpp, ltg = llama_bench(lb, path, a.pp, a.tg, a.threads)
                if a.baseline:
                    try:
                        old = fathom_bench(a.baseline, path, a.pp, a.tg, a.threads)
                        best["bpp"] = max(best["bpp"], old["prefill_tok_s"])
                        best["btg"] = max(best["btg"], old["decode_tok_s"])
                    except subprocess.CalledProcessError:
                        pass  # the previous binary cannot load this format
                if a.depth:
                    best["ld"] = max(best["ld"], llama_bench_depth(lb, path, a.depth, a.tg, a.threads))
                    deep = fathom_bench(a.fathom, path, a.depth, a.tg, a.threads)
                    best["fd"] = max(best["fd"], deep["decode_after_prompt_tok_s"])
                rep = fathom_bench(a.fathom, path, a.pp, a.tg, a.threads)
                best["lpp"], best["ltg"] = max(best["lpp"], lpp), max(best["ltg"], ltg)
                best["fpp"] = max(best["fpp"], rep["prefill_tok_s"])
                best["ftg"] = max(best["ftg"], rep["decode_tok_s"])
                # The roofline from the best bandwidth measured (the probe is as noisy as the rest).
                roof = max(roof, rep["decode_roofline_tok_s"])
            rows.append((name, fmt, best, rep, roof))
            print(f"{name} {fmt}: {best} roofline {roof:.1f}", flush=True)
    print()
    if a.baseline:
        print("| model | weights | pp new / previous Fathom | tg new / previous Fathom |")
        print("|---|---|---|---|")
        for name, fmt, b, rep, roof in rows:
            if not b["bpp"]:
                print(f"| {name} | {fmt} | {b['fpp']:.1f} / — (the previous binary cannot load it) | {b['ftg']:.1f} / — |")
                continue
            print(f"| {name} | {fmt} | {b['fpp']:.1f} / {b['bpp']:.1f} = **{b['fpp'] / b['bpp']:.2f}×** | "
                  f"{b['ftg']:.1f} / {b['btg']:.1f} = **{b['ftg'] / b['btg']:.2f}×** |")
        print()
    if a.depth:
        print(f"| model | weights | tg{a.tg} at depth {a.depth}: llama.cpp | Fathom | ratio |")
        print("|---|---|---|---|---|")
        for name, fmt, b, rep, roof in rows:
            print(f"| {name} | {fmt} | {b['ld']:.1f} | {b['fd']:.1f} | **{b['fd'] / max(b['ld'], 1e-9):.2f}×** |")
        print()
    print(f"| model | weights | pp{a.pp} llama.cpp | pp{a.pp} Fathom | ratio | tg{a.tg} llama.cpp | tg{a.tg} Fathom | ratio "
          f"| roofline tok/s | Fathom / llama.cpp % of roofline | Fathom peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, fmt, b, rep, roof in rows:
        print(f"| {name} | {fmt} | {b['lpp']:.1f} | {b['fpp']:.1f} | **{b['fpp'] / b['lpp']:.2f}×** | {b['ltg']:.1f} | "
              f"{b['ftg']:.1f} | **{b['ftg'] / b['ltg']:.2f}×** | {roof:.0f} | {100 * b['ftg'] / roof:.0f} % / "
              f"{100 * b['ltg'] / roof:.0f} % | {rep['peak_rss_bytes'] / 1e6:.0f} |")


if __name__ == "__main__":
    main()
