"""fixtures/gguf_formats/: one small DeepSeek-V3 model (MLA + DeepSeekMoE, every matrix width a
multiple of 256 so the k-quants apply everywhere) converted by llama.cpp's own converter and
quantised by its `llama-quantize` to every block format Fathom's runtime reads, each with
llama.cpp's answer on one prompt: the last position's logits and 32 greedy tokens
(`tools/gguf/llama_logits.cpp`, f32 KV cache), and llama.cpp's logits on the f32 conversion of
the same weights (how far each format itself moves them). `cargo test -p fathom-model --test gguf_formats`
compares Fathom with them.

Run (needs torch + transformers + safetensors, and a built llama.cpp tree):
  LLAMA=$(tools/gguf/get_llama_cpp.sh /tmp/llama-cpp)
  g++ -O2 -std=c++17 tools/gguf/llama_logits.cpp -I$LLAMA/include -I$LLAMA/ggml/include \
      -L$LLAMA/build/bin -lllama -lggml -lggml-base -Wl,-rpath,$LLAMA/build/bin -o /tmp/llama_logits
  python tools/gguf/make_format_fixtures.py --llama-cpp $LLAMA --logits /tmp/llama_logits
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools", "reference"))

CONFIG = dict(
    vocab_size=400, bos_token_id=0, eos_token_id=1, rms_norm_eps=1e-6, hidden_act="silu",
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=256,
    intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=2, n_shared_experts=1, n_routed_experts=4, routed_scaling_factor=2.5,
    kv_lora_rank=256, q_lora_rank=256, qk_rope_head_dim=32, v_head_dim=128, qk_nope_head_dim=96,
    topk_method="noaux_tc", n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=0,
    moe_layer_freq=1, norm_topk_prob=True, scoring_func="sigmoid", max_position_embeddings=512,
    rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False, num_nextn_predict_layers=0,
    torch_dtype="float32",
)
# llama-quantize type names: every base format --pure, plus the two mixtures most files use.
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K",
         "IQ4_NL", "IQ4_XS"]
MIXED = {"Q4_K_M", "Q5_K_M"}
PROMPT = [0, 17, 42, 99, 123, 250, 7, 311, 64, 5, 200, 388]


def main():
    import make_fixtures as mf
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True)
    ap.add_argument("--logits", required=True, help="the built llama_logits binary")
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures", "gguf_formats"))
    ap.add_argument("--work", default="/tmp/fathom_format_fixture")
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    hf = os.path.join(a.work, "hf")
    os.makedirs(hf)
    model = mf.build_model(CONFIG, seed=5)
    mf.write_config(hf, CONFIG)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ROOT, "fixtures", "deepseek_v3_tiny", f), hf)
    save_file(mf.hf_layout_state_dict(model), os.path.join(hf, "model.safetensors"), metadata={"format": "pt"})
    f16 = os.path.join(a.work, "f16.gguf")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gguf", "convert.py"), "--llama-cpp", a.llama_cpp,
                    "--", hf, "--outtype", "f16", "--outfile", f16], check=True, capture_output=True)
    f32 = os.path.join(a.work, "f32.gguf")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gguf", "convert.py"), "--llama-cpp", a.llama_cpp,
                    "--", hf, "--outtype", "f32", "--outfile", f32], check=True, capture_output=True)
    ids = ",".join(map(str, PROMPT))
    # llama.cpp's logits on the unquantised weights: the scale of each format's own error.
    f32_logits = json.loads(subprocess.run([a.logits, f32, ids, "1"], check=True, capture_output=True,
                                           text=True).stdout)["logits"]
    os.makedirs(a.out, exist_ok=True)
    quantize = os.path.join(a.llama_cpp, "build", "bin", "llama-quantize")
    for t in TYPES:
        name = t.lower()
        path = os.path.join(a.out, f"{name}.gguf")
        args = [quantize] + ([] if t in MIXED else ["--pure"]) + [f16, path, t]
        subprocess.run(args, check=True, capture_output=True)
        ref = json.loads(subprocess.run([a.logits, path, ids, "32"], check=True, capture_output=True,
                                        text=True).stdout)
        ref["prompt"] = PROMPT
        ref["f32_logits"] = f32_logits
        ref["llama_quantize"] = " ".join(args[1:-3] + [t])
        with open(os.path.join(a.out, f"{name}.json"), "w") as fh:
            json.dump(ref, fh)
        print(f"{name}: {os.path.getsize(path) / 1e6:.2f} MB, greedy {ref['greedy'][:8]}…")


if __name__ == "__main__":
    main()
