"""Prove a checkpoint written by `fathom train` loads in HF transformers with the same logits.

Runs `fathom forward` on a few token sequences, loads the same directory with
AutoModelForCausalLM (DeepseekV3ForCausalLM; it ignores the MTP layers, as transformers does for
real V3 checkpoints), and compares the logits. Exit status 1 if any |Δ| exceeds --tol.

Run:  python tools/reference/check_hf_load.py --model runs/tiny/final [--fathom target/release/fathom]
"""

import argparse
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--fathom", default="target/release/fathom")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    kw = dict(dtype=torch.float32, attn_implementation="eager")
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, experts_implementation="eager", **kw).eval()
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(args.model, **kw).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 7, 64, 150)]
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, ids in enumerate(seqs):
            out = os.path.join(tmp, f"logits_{i}.safetensors")
            subprocess.run([args.fathom, "forward", "--model", args.model, "--token-ids",
                            ",".join(map(str, ids)), "--output", out], check=True)
            ours = load_file(out)["logits"]
            with torch.no_grad():
                theirs = model(torch.tensor([ids])).logits[0]
            d = (ours - theirs).abs().max().item()
            same_argmax = bool((ours.argmax(-1) == theirs.argmax(-1)).all())
            worst = max(worst, d)
            print(f"seq {i}: {len(ids):4d} tokens  max|Δlogit| {d:.3e}  argmax identical: {same_argmax}")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: worst max|Δlogit| {worst:.3e} "
          f"(tolerance {args.tol})")
    sys.exit(0 if worst <= args.tol else 1)


if __name__ == "__main__":
    main()
