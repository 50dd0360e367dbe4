#!/usr/bin/env python3
"""The official `openai` Python package against `fathom serve`, unmodified: models, chat,
streaming, reasoning_content, usage with cached tokens, completions, errors, and tool calls.

Tool calls need a model that emits DeepSeek's tool-call markup; the embedded default model does
not, so the script writes a second, tiny checkpoint whose weights encode a bigram table that
replies `Look it up</think><｜tool▁calls▁begin｜>…weather<｜tool▁sep｜>{}…` (the same construction
as the Rust test `tool_calls_come_out_as_openai_tool_calls`), using the server's `/tokenize`.

    pip install openai          # tested with openai 3.54.0
    cargo build --release
    python3 tools/serve/openai_client_check.py
"""
import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.path.join(ROOT, "target/release/fathom")
DEFAULT = os.path.join(ROOT, "models/default")
RESULTS = []


def check(name, ok, detail=""):
    RESULTS.append((name, bool(ok)))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}")


def start(model, key=None):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cmd = [BINARY, "serve", "--model", model, "--port", str(port), "--model-name", "fathom"]
    if key:
        cmd += ["--api-key", key]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def tokenize(port, body):
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("POST", "/tokenize", json.dumps(body), {"Authorization": "Bearer k"})
    return json.loads(c.getresponse().read())["tokens"]


def write_safetensors(path, tensors):
    """Pure-Python safetensors writer for f32 tensors given as (shape, flat list)."""
    header, blobs, offset = {}, [], 0
    for name, (shape, data) in tensors.items():
        blob = struct.pack(f"<{len(data)}f", *data)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def bigram_checkpoint(out, script, eos, vocab):
    h = len(script) + 1
    dim = {t: i for i, t in enumerate(script)}
    embed = [0.0] * (vocab * h)
    for t in range(vocab):
        embed[t * h + dim.get(t, h - 1)] = 1.0
    head = [0.0] * (vocab * h)
    for i in range(len(script) - 1):
        head[script[i + 1] * h + i] = 10.0
    head[eos * h + len(script) - 1] = 10.0
    head[eos * h + h - 1] = 10.0
    d, l = 4, "model.layers.0"
    t = {"model.embed_tokens.weight": ((vocab, h), embed), "lm_head.weight": ((vocab, h), head),
         "model.norm.weight": ((h,), [1.0] * h),
         f"{l}.input_layernorm.weight": ((h,), [1.0] * h),
         f"{l}.post_attention_layernorm.weight": ((h,), [1.0] * h),
         f"{l}.self_attn.o_proj.weight": ((h, d), [0.0] * (h * d)),
         f"{l}.mlp.down_proj.weight": ((h, 4), [0.0] * (h * 4))}
    for p in ("q_proj", "k_proj", "v_proj"):
        t[f"{l}.self_attn.{p}.weight"] = ((d, h), [0.0] * (d * h))
    for p in ("gate_proj", "up_proj"):
        t[f"{l}.mlp.{p}.weight"] = ((4, h), [0.0] * (4 * h))
    write_safetensors(os.path.join(out, "model.safetensors"), t)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
           "hidden_size": h, "intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1,
           "num_key_value_heads": 1, "head_dim": d, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
           "rope_theta": 10000.0, "bos_token_id": 0, "eos_token_id": eos, "tie_word_embeddings": False}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEFAULT, name), out)


def main():
    print(f"openai {openai.__version__}")
    proc, port = start(DEFAULT, key="k")
    tmp = tempfile.mkdtemp()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k")
        models = client.models.list()
        check("models.list", [m.id for m in models.data] == ["fathom"])

        msgs = [{"role": "user", "content": "What is 12 + 35?"}]
        r = client.chat.completions.create(model="fathom", messages=msgs, max_tokens=48, temperature=0)
        m = r.choices[0].message
        reasoning = getattr(m, "reasoning_content", None) or (m.model_extra or {}).get("reasoning_content")
        check("chat: reasoning_content split out", isinstance(reasoning, str) and len(reasoning) > 0,
              repr((reasoning or "")[:40]))
        check("chat: usage", r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
              and r.usage.prompt_tokens_details.cached_tokens is not None)

        stream = client.chat.completions.create(model="fathom", messages=msgs, max_tokens=48, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        sr, sc, usage = "", "", None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                extra = c.delta.model_extra or {}
                sr += extra.get("reasoning_content") or ""
                sc += c.delta.content or ""
        check("stream: deltas equal the non-streamed message", (sr, sc) == (reasoning, m.content or ""))
        check("stream: include_usage", usage is not None and usage.completion_tokens == r.usage.completion_tokens)

        system = "You are a careful assistant who checks every sum twice before answering. " * 3
        for q in ("What is 2 + 2?", "What is 3 + 5?"):
            r2 = client.chat.completions.create(model="fathom", max_tokens=4, messages=[
                {"role": "system", "content": system}, {"role": "user", "content": q}])
        check("prefix cache: cached_tokens reported", r2.usage.prompt_tokens_details.cached_tokens > 0,
              f"{r2.usage.prompt_tokens_details.cached_tokens} of {r2.usage.prompt_tokens}")

        c = client.completions.create(model="fathom", prompt="To be, or not", max_tokens=8, temperature=0)
        check("completions", c.choices[0].text != "" and c.usage.completion_tokens > 0)

        try:
            client.chat.completions.create(model="nope", messages=msgs)
            check("unknown model → 400", False)
        except openai.BadRequestError as e:
            check("unknown model → 400", e.status_code == 400 and "does not exist" in str(e))
        try:
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong").models.list()
            check("wrong key → 401", False)
        except openai.AuthenticationError:
            check("wrong key → 401", True)

        # Tool calls, through the bigram checkpoint.
        reply = ("Look it up</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>weather<｜tool▁sep｜>{}"
                 "<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
        last = tokenize(port, {"messages": [{"role": "user", "content": "x"}]})[-1]
        script = [last] + tokenize(port, {"prompt": reply})
        assert len(set(script)) == len(script), "a bigram script needs distinct tokens"
        vocab = json.load(open(os.path.join(DEFAULT, "config.json")))["vocab_size"]
        bigram_checkpoint(tmp, script, 1, vocab)
        tproc, tport = start(tmp)
        try:
            tc = openai.OpenAI(base_url=f"http://127.0.0.1:{tport}/v1", api_key="none")
            tools = [{"type": "function", "function": {"name": "weather", "description": "Weather now",
                      "parameters": {"type": "object", "properties": {}}}}]
            ask = [{"role": "user", "content": "Weather in Paris?"}]
            r = tc.chat.completions.create(model="fathom", messages=ask, tools=tools, temperature=0)
            call = (r.choices[0].message.tool_calls or [None])[0]
            check("tools: tool_calls parsed", call is not None and call.function.name == "weather"
                  and json.loads(call.function.arguments) == {} and r.choices[0].finish_reason == "tool_calls")
            names = []
            for chunk in tc.chat.completions.create(model="fathom", messages=ask, tools=tools, stream=True):
                for ch in chunk.choices:
                    names += [t.function.name for t in (ch.delta.tool_calls or [])]
            check("tools: streamed tool_calls delta", names == ["weather"])
            follow = ask + [r.choices[0].message.model_dump(exclude_none=True),
                            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}]
            r3 = tc.chat.completions.create(model="fathom", messages=follow, tools=tools, max_tokens=2)
            check("tools: tool result message accepted", r3.choices[0].message is not None)
        finally:
            tproc.terminate()
            tproc.wait()
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    failed = [n for n, ok in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
