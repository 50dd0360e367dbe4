#!/usr/bin/env python3
"""Load benchmark for `fathom serve`: 1, 4, 16 and 64 concurrent streaming chat clients on
loopback against one server process. Reports aggregate generated tokens/s, p50/p99 time to first
token and inter-token latency, errors, and the server's resident memory (current and peak).

Standard library only. Each client sends requests one after another (chat, streaming, `max_tokens`
tokens, eos ignored so every request generates the same number of tokens) — at least `--requests`
and until the level has run `--seconds`; a level's throughput is all tokens received over its wall
time. The machine is shared and noisy, so `--rounds` rounds interleave the levels and each level
reports its median round.

    cargo build --release
    python3 tools/serve/load_bench.py [--model DIR] [--levels 1,4,16,64] [--max-tokens 64]
        [--seconds 5] [--rounds 3] [--binary target/release/fathom] [--extra "serve flags"] [--json OUT]
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss(pid):
    """(VmRSS, VmHWM) in bytes from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out.get("VmRSS", 0), out.get("VmHWM", 0)


def one_request(port, prompt, max_tokens, seed):
    """Stream one chat completion; returns (ttft, [inter-token gaps], tokens) or raises."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = json.dumps({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
        "temperature": 0.6, "seed": seed,
        "stream_options": {"include_usage": True},
    })
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    ttft, last, gaps, tokens = None, None, [], None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for c in chunk["choices"]:
            d = c.get("delta", {})
            if d.get("content") or d.get("reasoning_content"):
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                else:
                    gaps.append(now - last)
                last = now
    conn.close()
    if tokens is None:
        raise RuntimeError("stream ended without usage")
    return ttft if ttft is not None else time.perf_counter() - t0, gaps, tokens


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def run_level(port, clients, requests, max_tokens, seconds=0.0):
    """`clients` threads each send `requests` requests one after another, and go on sending until
    `seconds` have passed (so a level measures long enough on a noisy machine)."""
    ttfts, gaps, errors, tokens = [], [], [], [0]
    lock = threading.Lock()
    start = time.perf_counter()

    def client(i):
        r = 0
        while r < requests or time.perf_counter() - start < seconds:
            r += 1
            try:
                t, g, n = one_request(port, f"Client {i} asks: what is {i} + {r}?", max_tokens, i * 1000 + r)
                with lock:
                    ttfts.append(t)
                    gaps.extend(g)
                    tokens[0] += n
            except Exception as e:  # counted, reported
                with lock:
                    errors.append(str(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(ttfts) + len(errors),
        "tokens": tokens[0],
        "wall_s": wall,
        "tok_s": tokens[0] / wall,
        "ttft_p50_ms": percentile(ttfts, 50) * 1e3,
        "ttft_p99_ms": percentile(ttfts, 99) * 1e3,
        "itl_p50_ms": percentile(gaps, 50) * 1e3,
        "itl_p99_ms": percentile(gaps, 99) * 1e3,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/fathom"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=4, help="requests per client, at least")
    ap.add_argument("--seconds", type=float, default=5.0, help="clients keep sending until a level has run this long")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each level reports its median")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--extra", default="", help="extra flags for fathom serve")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    port = free_port()
    cmd = [a.binary, "serve", "--port", str(port)] + (["--model", a.model] if a.model else []) + a.extra.split()
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        server.stderr.readline()  # "fathom serve: model … on http://…"
        for _ in range(100):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        # Rounds interleave the levels so that a slow spell of the shared machine hits all of
        # them; each level reports its median round (by tok/s).
        levels = [int(x) for x in a.levels.split(",")]
        runs = {level: [] for level in levels}
        for rnd in range(a.rounds):
            for level in levels:
                row = run_level(port, level, a.requests, a.max_tokens, a.seconds)
                row["rss_mb"], row["peak_rss_mb"] = (x / 2**20 for x in rss(server.pid))
                runs[level].append(row)
                print(f"round {rnd + 1}: {level:>3} clients: {row['tok_s']:8.1f} tok/s  ttft p50 {row['ttft_p50_ms']:7.1f} ms "
                      f"p99 {row['ttft_p99_ms']:7.1f} ms  itl p50 {row['itl_p50_ms']:6.1f} ms "
                      f"p99 {row['itl_p99_ms']:6.1f} ms  errors {row['errors']}  rss {row['rss_mb']:.0f} MB",
                      file=sys.stderr)
        rows = []
        for level in levels:
            by_speed = sorted(runs[level], key=lambda r: r["tok_s"])
            row = dict(by_speed[len(by_speed) // 2])
            row["errors"] = sum(r["errors"] for r in runs[level])
            row["requests"] = sum(r["requests"] for r in runs[level])
            row["tok_s_rounds"] = [r["tok_s"] for r in runs[level]]
            rows.append(row)
        base = rows[0]["tok_s"]
        print(f"median of {a.rounds} interleaved rounds, {a.seconds:.0f} s per level per round, "
              f"{a.max_tokens} tokens per request")
        print("| clients | requests | aggregate tok/s | × vs 1 client | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | errors | RSS / peak (MB) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}× | "
                  f"{r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.2f} / {r['itl_p99_ms']:.2f} | "
                  f"{r['errors']} | {r['rss_mb']:.0f} / {r['peak_rss_mb']:.0f} |")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=2)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
