"""Reference blocks for every block format Fathom's kernels read: random blocks (valid f16
scales, every other byte random) and their dequantisation by llama.cpp's own Python package
`gguf` (gguf-py, a line-for-line port of ggml's dequantize_row_* functions), written to
fixtures/quant/{format}.blocks (the bytes) and {format}.f32 (little-endian floats).

Run:  pip install gguf numpy && python tools/reference/make_quant_fixtures.py --out fixtures/quant
"""

import argparse
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize

# (format, byte offsets of its f16 scale fields within a block)
FORMATS = {
    "q4_0": (T.Q4_0, [0]),
    "q4_1": (T.Q4_1, [0, 2]),
    "q5_0": (T.Q5_0, [0]),
    "q5_1": (T.Q5_1, [0, 2]),
    "q8_0": (T.Q8_0, [0]),
    "q2_K": (T.Q2_K, [80, 82]),
    "q3_K": (T.Q3_K, [108]),
    "q4_K": (T.Q4_K, [0, 2]),
    "q5_K": (T.Q5_K, [0, 2]),
    "q6_K": (T.Q6_K, [208]),
    "iq4_nl": (T.IQ4_NL, [0]),
    "iq4_xs": (T.IQ4_XS, [0]),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fixtures/quant")
    ap.add_argument("--blocks", type=int, default=8)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(20)
    for name, (qtype, scale_at) in FORMATS.items():
        elems, nbytes = GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, size=(args.blocks, nbytes), dtype=np.uint8)
        for b in range(args.blocks):
            for at in scale_at:
                # Scales of either sign, magnitudes 1e-3 … 1 (minima too, as real files have).
                v = np.float16(rng.choice([-1, 1]) * 10 ** rng.uniform(-3, 0))
                blocks[b, at:at + 2] = np.frombuffer(v.tobytes(), dtype=np.uint8)
        values = dequantize(blocks.reshape(-1), qtype).astype("<f4").reshape(-1)
        assert values.size == args.blocks * elems
        blocks.tofile(os.path.join(args.out, f"{name}.blocks"))
        values.tofile(os.path.join(args.out, f"{name}.f32"))
        print(name, blocks.size, "bytes", values.size, "values")


if __name__ == "__main__":
    main()
