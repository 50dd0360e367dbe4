"""Build the tiny reference checkpoints Fathom's parity tests run against.

Uses HF transformers + torch (CPU) as the reference implementation. For every fixture it writes a
Hugging Face directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) and
`reference.safetensors` holding, per prompt i:
  prompt_i   int64 [n]         the prompt token ids
  greedy_i   int64 [32]        32 greedy tokens from an uncached full recompute in transformers
  logits_i   f32  [n+32, V]    transformers' logits over prompt + greedy continuation
  mtp_logits_i f32 [n+31, V]   (V3 only) logits of MTP module 1, see `mtp_reference`
plus `template_reference.json` (rendered chat templates, by jinja2 through transformers).

Run:  python tools/reference/make_fixtures.py --out fixtures
Needs: pip install torch transformers safetensors tokenizers   (CPU is enough)
"""

import argparse
import json
import math
import os
import shutil

import torch
from safetensors.torch import save_file, load_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

torch.set_grad_enabled(False)

SPECIAL = [
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>",
    "<think>", "</think>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>", "<｜tool▁sep｜>",
]
BOS, EOS, PAD = SPECIAL[0], SPECIAL[1], SPECIAL[2]

# DeepSeek-R1's chat template (system prompts joined, earlier reasoning dropped, tool calls and
# outputs, `<think>\n` pre-filled after the generation prompt).
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- else %}"
    "{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

CORPUS = """The quick brown fox jumps over the lazy dog. A model reads text one token at a time.
DeepSeek uses multi-head latent attention and a mixture of experts. Experts share the work.
What is 12 + 35? The answer is 47. What is 9 * 8? The answer is 72. 100 - 58 = 42.
Think step by step, then answer. <think>add the tens, then the ones</think> <answer>47</answer>
Hello, world! How are you today? I am fine, thank you. The weather is nice and the sky is blue.
Rust is a systems programming language. Tensors flow through layers; logits come out at the end.
""" * 4


def build_tokenizer(vocab_size: int):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write_tokenizer(tok: Tokenizer, out: str):
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg = {
        "add_bos_token": False,  # the chat template writes bos itself
        "add_eos_token": False,
        # Real DeepSeek configs carry bos/eos as AddedToken objects; keep that shape.
        "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "eos_token": {"__type": "AddedToken", "content": EOS, "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "pad_token": {"__type": "AddedToken", "content": PAD, "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 16384,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)


def init_weights(model, seed: int, std: float):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            fan_in = p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=g) * (std if "embed" in name else 1.0 / math.sqrt(fan_in)))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn(b.shape, generator=g))


def hf_layout_state_dict(model) -> dict:
    """transformers 5 holds experts fused ([E, 2I, H] gate_up, [E, H, I] down); real checkpoints name each
    expert. Write the real layout."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("mlp.experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = v[e, :inter].clone()
                out[f"{base}{e}.up_proj.weight"] = v[e, inter:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = v[e].clone()
        elif k == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
            continue
        else:
            out[k] = v.clone().contiguous()
    return out


def load_hf(path: str, dtype=torch.float32):
    kw = dict(dtype=dtype, attn_implementation="eager")
    try:
        return AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager", **kw).eval()
    except TypeError:
        return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def greedy_reference(model, prompt: list[int], steps: int = 32):
    ids = list(prompt)
    margins = []
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        top2 = torch.topk(logits, 2).values
        margins.append(float(top2[0] - top2[1]))
        ids.append(int(torch.argmax(logits)))
    full = model(torch.tensor([ids])).logits[0].float()
    return ids[len(prompt):], full, min(margins)


# --- MTP (V3): module 1 as transformers' MtpLayer runs it: h' = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]),
# one decoder block (a MoE layer: its index is num_hidden_layers >= first_k_dense_replace), shared_head.norm,
# shared lm_head. h_i is the main model's final (normed) hidden state.
def make_mtp(model, seed: int):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm
    cfg = model.config
    L = cfg.num_hidden_layers
    block = DeepseekV3DecoderLayer(cfg, layer_idx=L).eval()
    mods = torch.nn.ModuleDict({
        "enorm": DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps),
        "hnorm": DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps),
        "eh_proj": torch.nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False),
        "shared_head_norm": DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps),
        "block": block,
    })
    init_weights(mods, seed, 0.5)
    tensors = {}
    p = f"model.layers.{L}."
    tensors[p + "enorm.weight"] = mods["enorm"].weight.clone()
    tensors[p + "hnorm.weight"] = mods["hnorm"].weight.clone()
    tensors[p + "eh_proj.weight"] = mods["eh_proj"].weight.clone()
    tensors[p + "shared_head.norm.weight"] = mods["shared_head_norm"].weight.clone()
    tensors[p + "shared_head.head.weight"] = model.lm_head.weight.clone()
    tensors[p + "embed_tokens.weight"] = model.model.embed_tokens.weight.clone()

    class Wrap(torch.nn.Module):
        def __init__(self, b):
            super().__init__()
            self.b = b
            self.config = cfg
    for k, v in hf_layout_state_dict(Wrap(block)).items():
        tensors[p + k[2:]] = v
    return mods, tensors


def mtp_reference(model, mods, ids: list[int]):
    x = torch.tensor([ids])
    h = model.model(x).last_hidden_state  # [1, n, d], after the final norm
    emb = model.model.embed_tokens(x[:, 1:])
    hin = mods["eh_proj"](torch.cat([mods["enorm"](emb), mods["hnorm"](h[:, :-1])], dim=-1))
    n = hin.shape[1]
    pos = torch.arange(n)[None]
    cos_sin = model.model.rotary_emb(hin, pos)
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    out = mods["block"](hin, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    if isinstance(out, tuple):
        out = out[0]
    return model.lm_head(mods["shared_head_norm"](out))[0].float()


# --- FP8 e4m3 with 128x128 block scales (DeepSeek-V3 layout: weight F8_E4M3, weight_scale_inv F32).
FP8_SKIP = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "e_score_correction_bias", "shared_head.head")


def fp8_quantise(tensors: dict, block: int = 128):
    q_out, twin = {}, {}
    for k, w in tensors.items():
        if w.dim() != 2 or any(s in k for s in FP8_SKIP):
            q_out[k] = w
            twin[k] = w
            continue
        rows, cols = w.shape
        br, bc = math.ceil(rows / block), math.ceil(cols / block)
        scale = torch.zeros(br, bc, dtype=torch.float32)
        q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
        deq = torch.zeros(rows, cols, dtype=torch.float32)
        for i in range(br):
            for j in range(bc):
                blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
                s = blk.abs().max().clamp(min=1e-12) / 448.0
                qb = (blk / s).to(torch.float8_e4m3fn)
                scale[i, j] = s
                q[i * block:(i + 1) * block, j * block:(j + 1) * block] = qb
                deq[i * block:(i + 1) * block, j * block:(j + 1) * block] = qb.float() * s
        q_out[k] = q
        q_out[k + "_scale_inv"] = scale
        twin[k] = deq
    return q_out, twin


def to_dtype(tensors: dict, dtype):
    return {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v)
            for k, v in tensors.items()}


def write_config(out: str, cfg: dict):
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


PROMPT_TEXTS = ["The quick brown fox", "What is 12 + 35?", "Experts share the work. Rust is"]
CHAT = [{"role": "user", "content": "What is 9 * 8?"}]


def prompts_for(tok: Tokenizer, hf_tok):
    ps = [tok.encode(t).ids for t in PROMPT_TEXTS]
    ps.append(hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False))
    return ps


def record_reference(model, prompts, out: str, mtp=None):
    ref = {}
    worst = 1e9
    for i, p in enumerate(prompts):
        greedy, full, margin = greedy_reference(model, p)
        worst = min(worst, margin)
        ref[f"prompt_{i}"] = torch.tensor(p, dtype=torch.int64)
        ref[f"greedy_{i}"] = torch.tensor(greedy, dtype=torch.int64)
        ref[f"logits_{i}"] = full.contiguous()
        if mtp is not None:
            ref[f"mtp_logits_{i}"] = mtp_reference(model, mtp, p + greedy).contiguous()
    save_file(ref, os.path.join(out, "reference.safetensors"))
    return worst


def build_model(cfg_dict: dict, seed: int):
    tmp = "/tmp/fathom_cfg"
    os.makedirs(tmp, exist_ok=True)
    write_config(tmp, cfg_dict)
    config = AutoConfig.from_pretrained(tmp)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    init_weights(model, seed, 0.5)
    return model


def emit(name, cfg_dict, model, tok, hf_tok, args, dtype=torch.float32, mtp=None, extra=None):
    """Write the checkpoint (in `dtype`), reload it through transformers in f32 and record the reference."""
    out = os.path.join(args.out, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cfg = dict(cfg_dict)
    cfg["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    write_config(out, cfg)
    write_tokenizer(tok, out)
    tensors = to_dtype(hf_layout_state_dict(model), dtype)
    if extra:
        tensors.update(to_dtype(extra, dtype))
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    ref_model = load_hf(out, torch.float32)
    # MTP modules (V3) run in f32 beside the reloaded model; they share its embedding and head.
    mods = mtp
    margin = record_reference(ref_model, prompts_for(tok, hf_tok), out, mods)
    size = os.path.getsize(os.path.join(out, "model.safetensors"))
    print(f"{name}: {size/1e6:.2f} MB, min greedy top1-top2 margin {margin:.4f}")
    return out, tensors, ref_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fixtures")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print("transformers", transformers.__version__, "torch", torch.__version__)

    tok = build_tokenizer(384)
    tmp_tok = "/tmp/fathom_tok"
    os.makedirs(tmp_tok, exist_ok=True)
    write_tokenizer(tok, tmp_tok)
    hf_tok = PreTrainedTokenizerFast.from_pretrained(tmp_tok)
    vocab = 400  # > tokenizer size (384 + padding), as real checkpoints pad their vocab
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)

    common = dict(vocab_size=vocab, bos_token_id=bos_id, eos_token_id=eos_id, rms_norm_eps=1e-6,
                  hidden_act="silu", initializer_range=0.02, attention_dropout=0.0, use_cache=True)

    # DeepSeek-V3: q-LoRA, YaRN (mscale != mscale_all_dim to exercise both), noaux_tc with groups and a
    # non-zero correction bias, first dense layer, one MTP module. Legacy rope keys as real checkpoints have.
    v3 = dict(common, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=128,
              intermediate_size=200, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16, routed_scaling_factor=2.5,
              kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32,
              topk_method="noaux_tc", n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1,
              moe_layer_freq=1, norm_topk_prob=True, scoring_func="sigmoid", max_position_embeddings=512,
              rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                                "beta_fast": 32, "beta_slow": 1, "mscale": 0.9,
                                                "mscale_all_dim": 0.8},
              tie_word_embeddings=False, attention_bias=False, num_nextn_predict_layers=1)
    model = build_model(v3, 1)
    mtp_mods, mtp_tensors = make_mtp(model, 11)
    out, tensors, _ = emit("deepseek_v3_tiny", v3, model, tok, hf_tok, args, mtp=mtp_mods, extra=mtp_tensors)
    emit("deepseek_v3_tiny_bf16", v3, model, tok, hf_tok, args, dtype=torch.bfloat16)

    # FP8 copy of V3 (block 128x128, partial edge blocks) and its dequantised f32 twin.
    all_t = dict(hf_layout_state_dict(model))
    all_t.update(mtp_tensors)
    q, twin = fp8_quantise(all_t)
    twin_dir = os.path.join(args.out, "deepseek_v3_tiny_fp8_twin")
    shutil.rmtree(twin_dir, ignore_errors=True)
    os.makedirs(twin_dir)
    write_config(twin_dir, dict(v3, torch_dtype="float32"))
    write_tokenizer(tok, twin_dir)
    save_file(twin, os.path.join(twin_dir, "model.safetensors"), metadata={"format": "pt"})
    twin_model = load_hf(twin_dir)
    m = record_reference(twin_model, prompts_for(tok, hf_tok), twin_dir)
    print(f"deepseek_v3_tiny_fp8_twin: margin {m:.4f}")
    fp8_dir = os.path.join(args.out, "deepseek_v3_tiny_fp8")
    shutil.rmtree(fp8_dir, ignore_errors=True)
    os.makedirs(fp8_dir)
    write_config(fp8_dir, dict(v3, torch_dtype="bfloat16",
                               quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                    "activation_scheme": "dynamic",
                                                    "weight_block_size": [128, 128]}))
    write_tokenizer(tok, fp8_dir)
    # Two shards + index, as real checkpoints are laid out.
    names = sorted(q)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: q[k].contiguous() for k in keys}, os.path.join(fp8_dir, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    with open(os.path.join(fp8_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2)
    print("deepseek_v3_tiny_fp8: sharded", sum(os.path.getsize(os.path.join(fp8_dir, s)) for s in shards) / 1e6, "MB")

    # DeepSeek-V2-Lite style: one q_proj, softmax + greedy, no normalisation, default rope.
    v2l = dict(common, architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", hidden_size=96,
               intermediate_size=160, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8, routed_scaling_factor=1.0,
               kv_lora_rank=48, q_lora_rank=None, qk_rope_head_dim=16, v_head_dim=24, qk_nope_head_dim=24,
               topk_method="greedy", n_group=1, topk_group=1, num_experts_per_tok=3, first_k_dense_replace=1,
               moe_layer_freq=1, norm_topk_prob=False, scoring_func="softmax", max_position_embeddings=512,
               rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False, attention_bias=False,
               aux_loss_alpha=0.001, seq_aux=True)
    model = build_model(v2l, 2)
    emit("deepseek_v2_lite_tiny", v2l, model, tok, hf_tok, args)
    emit("deepseek_v2_lite_tiny_bf16", v2l, model, tok, hf_tok, args, dtype=torch.bfloat16)

    # DeepSeek-V2 style: q-LoRA, softmax + group-limited greedy (group score = max), YaRN.
    v2 = dict(v2l, hidden_size=96, q_lora_rank=64, topk_method="group_limited_greedy", n_group=4, topk_group=2,
              n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=2.0,
              rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
    model = build_model(v2, 3)
    emit("deepseek_v2_tiny", v2, model, tok, hf_tok, args)

    # Qwen2 (the R1-Distill-Qwen family): qkv bias, GQA; untied and tied. Config as transformers 5 writes it.
    for tied in (False, True):
        qw = dict(common, architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=96,
                  intermediate_size=192, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                  max_position_embeddings=512, rope_theta=1000000.0, tie_word_embeddings=tied,
                  use_sliding_window=False, sliding_window=None, max_window_layers=2)
        model = build_model(qw, 4 + tied)
        d = "/tmp/fathom_qwen_cfg"
        model.config.save_pretrained(d)
        with open(os.path.join(d, "config.json")) as f:
            written = json.load(f)
        name = "qwen2_tiny_tied" if tied else "qwen2_tiny"
        emit(name, written, model, tok, hf_tok, args)
        if not tied:
            emit("qwen2_tiny_bf16", written, model, tok, hf_tok, args, dtype=torch.bfloat16)

    # Llama (the R1-Distill-Llama family): GQA, llama3 rope scaling.
    ll = dict(common, architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=96, intermediate_size=192,
              num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
              rope_theta=500000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64})
    model = build_model(ll, 6)
    emit("llama_tiny", ll, model, tok, hf_tok, args)
    emit("llama_tiny_bf16", ll, model, tok, hf_tok, args, dtype=torch.bfloat16)

    # Chat template reference, rendered by jinja2 through transformers.
    convs = [
        ([{"role": "user", "content": "Hi"}], True),
        ([{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be kind."},
          {"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "<think>\nadd</think>\n\n4"}, {"role": "user", "content": "and 3+3?"}], True),
        ([{"role": "user", "content": "weather?"},
          {"role": "assistant", "content": "", "tool_calls": [
              {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
              {"type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
          {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "noon"}], True),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], False),
    ]
    tref = []
    for msgs, gen in convs:
        text = hf_tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False)
        tref.append({"messages": msgs, "add_generation_prompt": gen, "text": text, "ids": ids})
    enc = [{"text": t, "ids": tok.encode(t).ids} for t in PROMPT_TEXTS + ["héllo wörld 123 ✓", "<think>x</think>"]]
    with open(os.path.join(args.out, "template_reference.json"), "w", encoding="utf-8") as f:
        json.dump({"chat": tref, "encode": enc}, f, ensure_ascii=False, indent=1)
    print("template reference written")


if __name__ == "__main__":
    main()
