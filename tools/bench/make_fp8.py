"""Write an FP8 e4m3 copy (128×128 block scales, DeepSeek-V3's layout) of a Hugging Face checkpoint,
to measure loading FP8 straight into a quantised form (`fathom bench --quant q8_0`, peak RSS).

Run:  python tools/bench/make_fp8.py runs/bench-models/v3-210m runs/bench-models/v3-210m-fp8
"""

import json
import os
import shutil
import sys

from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
from make_fixtures import fp8_quantise  # noqa: E402


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    tensors = {k: v.float() for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    q, _ = fp8_quantise(tensors)
    q = {k: (v.to(__import__("torch").bfloat16) if v.dtype == __import__("torch").float32 and not k.endswith("_scale_inv") else v)
         for k, v in q.items()}
    save_file(q, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(src, f), os.path.join(out, f))
    print(f"{out}: {sum(v.numel() * v.element_size() for v in q.values()) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
