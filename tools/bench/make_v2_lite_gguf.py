"""A DeepSeek-V2-Lite-sized GGUF with random weights, written straight in llama.cpp's Q4_K_M
mixture (no torch, no f16 intermediate): 15.7B parameters, 2.4B active per token — 27 layers of
hidden 2048, MLA with kv_lora 512 and no q-LoRA (16 heads, nope 128, rope 64, v 128), the first
layer dense (10944), then 64 routed experts top-6 (softmax, 1408 wide) + 2 shared, vocabulary
102400, YaRN factor 40 over 4096 positions (V2-Lite's own config.json values).

Tensor names, shapes and metadata are what llama.cpp's `convert_hf_to_gguf.py` writes for
DeepSeek-V2 (MLA's kv_b split into attn_k_b / attn_v_b). Types follow `llama-quantize`'s
Q4_K_M rules (`llama_tensor_get_type`): Q4_K everywhere, Q6_K for `output` and for the
ffn_down tensors of the layers `use_more_bits` picks; a tensor whose row width is not a multiple
of 256 takes the k-quant's fallback (Q4_K → Q5_0, Q6_K → Q8_0): attn_k_b (128 wide), the
routed experts' ffn_down (1408) and the dense layer's (10944). Norms and the router stay F32.

Speed does not depend on what the weights say; the values are kept small and finite (random
codes, fixed block scales) so both engines decode without overflow. The tokenizer is the
400-token GPT-2 vocabulary of fixtures/gguf_formats padded with unused tokens to 102400.

  python tools/bench/make_v2_lite_gguf.py --out runs/bench-models/v2-lite.q4_k_m.gguf   # ~10.4 GB, ~1 min
(the name tools/bench/llama_cpp_compare.py looks for with --names v2-lite --formats q4_k_m)
(needs numpy and gguf from PyPI)
"""

import argparse
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYERS, HIDDEN, HEADS = 27, 2048, 16
NOPE, ROPE, V, KV_LORA = 128, 64, 128, 512
DENSE_FF, EXPERTS, USED, SHARED, EXPERT_FF = 10944, 64, 6, 2, 1408
VOCAB = 102400

# Block layout: (weights per block, bytes per block, byte offsets of the f16 scales).
LAYOUT = {
    T.Q4_K: (256, 144, (0, 2)),
    T.Q6_K: (256, 210, (208,)),
    T.Q5_0: (32, 22, (0,)),
    T.Q8_0: (32, 34, (0,)),
}
FALLBACK = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}


def use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def pick(kind, rows_width, layer=None):
    """llama-quantize's Q4_K_M choice for a tensor of this kind and row width."""
    t = T.Q4_K
    if kind == "output":
        t = T.Q6_K
    elif kind == "ffn_down" and use_more_bits(layer, LAYERS):
        t = T.Q6_K
    if rows_width % 256 != 0:
        t = FALLBACK[t]
    return t


def random_blocks(qtype, rows, width, rng):
    per, nbytes, scales = LAYOUT[qtype]
    nblocks = rows * width // per
    b = rng.integers(0, 256, size=(nblocks, nbytes), dtype=np.uint8)
    # Small fixed scales (f16): q4_K/q6_K super-block d ≈ 2e-4 (dmin too), q5_0/q8_0 d ≈ 2e-3.
    val = np.float16(2e-4 if per == 256 else 2e-3).view(np.uint16)
    for at in scales:
        b[:, at] = val & 0xFF
        b[:, at + 1] = val >> 8
    if qtype == T.Q6_K:
        b[:, 192:208] = rng.integers(0, 64, size=(nblocks, 16), dtype=np.uint8)  # int8 scales ≥ 0
    return b.reshape(rows, width // per * nbytes)


def plan():
    """(name, ggml type, numpy shape of the logical tensor: [..., rows, width])."""
    t = [("token_embd.weight", T.Q4_K, (VOCAB, HIDDEN)),
         ("output_norm.weight", T.F32, (HIDDEN,)),
         ("output.weight", pick("output", HIDDEN), (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        b = f"blk.{i}"
        t += [(f"{b}.attn_norm.weight", T.F32, (HIDDEN,)),
              (f"{b}.attn_q.weight", pick("attn", HIDDEN), (HEADS * (NOPE + ROPE), HIDDEN)),
              (f"{b}.attn_kv_a_mqa.weight", pick("attn", HIDDEN), (KV_LORA + ROPE, HIDDEN)),
              (f"{b}.attn_kv_a_norm.weight", T.F32, (KV_LORA,)),
              (f"{b}.attn_k_b.weight", pick("attn", NOPE), (HEADS, KV_LORA, NOPE)),
              (f"{b}.attn_v_b.weight", pick("attn", KV_LORA), (HEADS, V, KV_LORA)),
              (f"{b}.attn_output.weight", pick("attn", HEADS * V), (HIDDEN, HEADS * V)),
              (f"{b}.ffn_norm.weight", T.F32, (HIDDEN,))]
        if i == 0:
            t += [(f"{b}.ffn_gate.weight", pick("ffn", HIDDEN), (DENSE_FF, HIDDEN)),
                  (f"{b}.ffn_up.weight", pick("ffn", HIDDEN), (DENSE_FF, HIDDEN)),
                  (f"{b}.ffn_down.weight", pick("ffn_down", DENSE_FF, i), (HIDDEN, DENSE_FF))]
        else:
            sh = SHARED * EXPERT_FF
            t += [(f"{b}.ffn_gate_inp.weight", T.F32, (EXPERTS, HIDDEN)),
                  (f"{b}.ffn_gate_exps.weight", pick("ffn", HIDDEN), (EXPERTS, EXPERT_FF, HIDDEN)),
                  (f"{b}.ffn_up_exps.weight", pick("ffn", HIDDEN), (EXPERTS, EXPERT_FF, HIDDEN)),
                  (f"{b}.ffn_down_exps.weight", pick("ffn_down", EXPERT_FF, i),
                   (EXPERTS, HIDDEN, EXPERT_FF)),
                  (f"{b}.ffn_gate_shexp.weight", pick("ffn", HIDDEN), (sh, HIDDEN)),
                  (f"{b}.ffn_up_shexp.weight", pick("ffn", HIDDEN), (sh, HIDDEN)),
                  (f"{b}.ffn_down_shexp.weight", pick("ffn_down", sh, i), (HIDDEN, sh))]
    return t


def tensor_data(qtype, shape, rng):
    if qtype == T.F32:
        if len(shape) == 1:
            return np.ones(shape, dtype=np.float32)  # norm weights
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    *lead, rows, width = shape
    n = int(np.prod(lead)) * rows if lead else rows
    return random_blocks(qtype, n, width, rng).reshape(*lead, rows, -1)


def add_metadata(w, tok):
    a = "deepseek2"
    w.add_string("general.name", "random V2-Lite-sized")
    w.add_uint32(f"{a}.block_count", LAYERS)
    w.add_uint32(f"{a}.context_length", 163840)
    w.add_uint32(f"{a}.embedding_length", HIDDEN)
    w.add_uint32(f"{a}.feed_forward_length", DENSE_FF)
    w.add_uint32(f"{a}.attention.head_count", HEADS)
    w.add_uint32(f"{a}.attention.head_count_kv", 1)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(f"{a}.expert_used_count", USED)
    w.add_uint32(f"{a}.expert_count", EXPERTS)
    w.add_uint32(f"{a}.expert_gating_func", 1)  # softmax
    w.add_uint32(f"{a}.attention.key_length", KV_LORA + ROPE)
    w.add_uint32(f"{a}.attention.value_length", KV_LORA)
    w.add_uint32(f"{a}.leading_dense_block_count", 1)
    w.add_uint32(f"{a}.vocab_size", VOCAB)
    w.add_uint32(f"{a}.attention.kv_lora_rank", KV_LORA)
    w.add_uint32(f"{a}.attention.key_length_mla", NOPE + ROPE)
    w.add_uint32(f"{a}.attention.value_length_mla", V)
    w.add_uint32(f"{a}.expert_feed_forward_length", EXPERT_FF)
    w.add_uint32(f"{a}.expert_shared_count", SHARED)
    w.add_float32(f"{a}.expert_weights_scale", 1.0)
    w.add_bool(f"{a}.expert_weights_norm", False)
    w.add_uint32(f"{a}.rope.dimension_count", ROPE)
    w.add_string(f"{a}.rope.scaling.type", "yarn")
    w.add_float32(f"{a}.rope.scaling.factor", 40.0)
    w.add_uint32(f"{a}.rope.scaling.original_context_length", 4096)
    w.add_float32(f"{a}.rope.scaling.yarn_log_multiplier", 0.1 * 0.707)
    w.add_uint32("general.file_type", 15)  # MOSTLY_Q4_K_M
    w.add_uint32("general.quantization_version", 2)
    # Tokenizer: the fixture's 400 GPT-2 tokens, padded with tokens no merge produces.
    f = tok.fields
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode() for i in f["tokenizer.ggml.tokens"].data]
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    merges = [bytes(f["tokenizer.ggml.merges"].parts[i]).decode() for i in f["tokenizer.ggml.merges"].data]
    tokens += [f"<unused_{i}>" for i in range(len(tokens), VOCAB)]
    types += [1] * (VOCAB - len(types))
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt-2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 1)
    w.add_bool("tokenizer.ggml.add_bos_token", False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tok = gguf.GGUFReader(os.path.join(ROOT, "fixtures", "gguf_formats", "q4_k_m.gguf"))
    tmp = a.out + ".part"
    w = gguf.GGUFWriter(tmp, "deepseek2")
    add_metadata(w, tok)
    tensors = plan()
    total = 0
    for name, qtype, shape in tensors:
        if qtype == T.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
            total += int(np.prod(shape)) * 4
        else:
            *lead, rows, width = shape
            per, nbytes, _ = LAYOUT[qtype]
            byte_shape = (*lead, rows, width // per * nbytes)
            n = int(np.prod(byte_shape))
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), n, raw_dtype=qtype)
            total += n
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(a.seed)
    done = 0
    for name, qtype, shape in tensors:
        data = tensor_data(qtype, shape, rng)
        w.write_tensor_data(data)
        done += data.nbytes
        print(f"\r{done / 1e9:6.2f} / {total / 1e9:.2f} GB  {name:40}", end="", file=sys.stderr)
    w.close()
    os.replace(tmp, a.out)
    params = sum(int(np.prod(s)) for _, _, s in tensors)
    print(f"\nwrote {a.out}: {len(tensors)} tensors, {params / 1e9:.2f}B parameters, "
          f"{os.path.getsize(a.out) / 1e9:.2f} GB", file=sys.stderr)


if __name__ == "__main__":
    main()
