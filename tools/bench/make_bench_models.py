"""Build the two benchmark models of docs/benchmarks.md (random weights, std 0.02: speed does not
depend on what the weights say) as Hugging Face directories, with the embedded default model's
tokenizer (vocab padded to 16384, as real checkpoints pad):

  v3-210m    DeepSeek-V3 architecture: MLA (q-LoRA 384, kv-LoRA 256, rope 32, nope 64, v 64),
             12 layers of hidden 768 (1 dense), 24 routed experts (top-6, 4 groups, 2 kept,
             sigmoid noaux_tc) + 1 shared, expert width 256. ~210M params, ~80M active.
  qwen2-150m Qwen2: 16 layers, hidden 896, 14 heads / 2 KV heads, MLP 2432, tied embeddings.

Run:  python tools/bench/make_bench_models.py --out runs/bench-models   (needs torch, transformers)
      python tools/bench/make_bench_models.py --only qwen2-150m --numpy  (numpy only: the Qwen2
      model written straight to safetensors, f32, same shapes and init; no transformers check)
"""

import argparse
import os
import shutil

import json
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 16384

V3 = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=VOCAB,
    hidden_size=768, intermediate_size=2048, moe_intermediate_size=256, num_hidden_layers=12,
    num_attention_heads=12, num_key_value_heads=12, n_shared_experts=1, n_routed_experts=24,
    routed_scaling_factor=2.5, kv_lora_rank=256, q_lora_rank=384, qk_rope_head_dim=32,
    v_head_dim=64, qk_nope_head_dim=64, topk_method="noaux_tc", n_group=4, topk_group=2,
    num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=True,
    scoring_func="sigmoid", max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_bias=False, num_nextn_predict_layers=0,
    bos_token_id=0, eos_token_id=1,
)
# The same model with DeepSeek-V3's YaRN context extension (its rope_scaling, factor 4 here: a
# 4096-token original context stretched to 16384), for decode after a 4096-token prompt.
V3_YARN = dict(
    V3, max_position_embeddings=16384,
    rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=4096,
                      beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
)
QWEN2 = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=VOCAB, hidden_size=896,
    intermediate_size=2432, num_hidden_layers=16, num_attention_heads=14, num_key_value_heads=2,
    max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    bos_token_id=0, eos_token_id=1,
)


def build(spec, out):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    spec = dict(spec)
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    cfg.initializer_range = 0.02
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            elif "bias" in name and "e_score" not in name:
                p.zero_()
    model = model.to(torch.bfloat16)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(ROOT, "models", "default", f), os.path.join(out, f))
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: {n / 1e6:.1f}M params")


def qwen2_tensors(c):
    """(name, shape, is_bias_or_norm) in Hugging Face Qwen2 naming (tied embeddings)."""
    h, kv = c["hidden_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    yield "model.embed_tokens.weight", (c["vocab_size"], h), False
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (h, h), False
        yield p + "self_attn.q_proj.bias", (h,), True
        yield p + "self_attn.k_proj.weight", (kv, h), False
        yield p + "self_attn.k_proj.bias", (kv,), True
        yield p + "self_attn.v_proj.weight", (kv, h), False
        yield p + "self_attn.v_proj.bias", (kv,), True
        yield p + "self_attn.o_proj.weight", (h, h), False
        yield p + "mlp.gate_proj.weight", (c["intermediate_size"], h), False
        yield p + "mlp.up_proj.weight", (c["intermediate_size"], h), False
        yield p + "mlp.down_proj.weight", (h, c["intermediate_size"]), False
        yield p + "input_layernorm.weight", (h,), True
        yield p + "post_attention_layernorm.weight", (h,), True
    yield "model.norm.weight", (h,), True


def build_qwen2_numpy(out):
    """The Qwen2 model without torch: N(0, 0.02) matrices, zero biases, unit norms, f32."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {}
    for name, shape, small in qwen2_tensors(QWEN2):
        if small:
            arrays[name] = np.ones(shape, np.float32) if "norm" in name else np.zeros(shape, np.float32)
        else:
            arrays[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    header, offset = {}, 0
    for name, a in arrays.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays.values():
            f.write(a.tobytes())
    cfg = dict(QWEN2, torch_dtype="float32", hidden_act="silu", initializer_range=0.02)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(ROOT, "models", "default", name), os.path.join(out, name))
    n = sum(a.size for a in arrays.values())
    print(f"{out}: {n / 1e6:.1f}M params (numpy, f32)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-models"))
    ap.add_argument("--only", choices=["v3-210m", "v3-210m-yarn", "qwen2-150m"], default=None)
    ap.add_argument("--numpy", action="store_true", help="Qwen2 only, without torch/transformers")
    a = ap.parse_args()
    if a.numpy:
        if a.only != "qwen2-150m":
            ap.error("--numpy builds only --only qwen2-150m")
        build_qwen2_numpy(os.path.join(a.out, "qwen2-150m"))
        return
    if a.only in (None, "v3-210m"):
        build(V3, os.path.join(a.out, "v3-210m"))
    if a.only in (None, "v3-210m-yarn"):
        build(V3_YARN, os.path.join(a.out, "v3-210m-yarn"))
    if a.only in (None, "qwen2-150m"):
        build(QWEN2, os.path.join(a.out, "qwen2-150m"))


if __name__ == "__main__":
    main()
