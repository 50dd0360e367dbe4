"""Build the two benchmark models of docs/benchmarks.md (random weights, std 0.02: speed does not
depend on what the weights say) as Hugging Face directories, with the embedded default model's
tokenizer (vocab padded to 16384, as real checkpoints pad):

  v3-210m    DeepSeek-V3 architecture: MLA (q-LoRA 384, kv-LoRA 256, rope 32, nope 64, v 64),
             12 layers of hidden 768 (1 dense), 24 routed experts (top-6, 4 groups, 2 kept,
             sigmoid noaux_tc) + 1 shared, expert width 256. ~210M params, ~80M active.
  qwen2-150m Qwen2: 16 layers, hidden 896, 14 heads / 2 KV heads, MLP 2432, tied embeddings.

Run:  python tools/bench/make_bench_models.py --out runs/bench-models   (needs torch, transformers)
"""

import argparse
import os
import shutil

import torch
from transformers import AutoConfig, AutoModelForCausalLM

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
QWEN2 = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=VOCAB, hidden_size=896,
    intermediate_size=2432, num_hidden_layers=16, num_attention_heads=14, num_key_value_heads=2,
    max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    bos_token_id=0, eos_token_id=1,
)


def build(spec, out):
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench-models"))
    a = ap.parse_args()
    build(V3, os.path.join(a.out, "v3-210m"))
    build(QWEN2, os.path.join(a.out, "qwen2-150m"))


if __name__ == "__main__":
    main()
