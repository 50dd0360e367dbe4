"""Run llama.cpp's own `convert_hf_to_gguf.py` on a checkpoint whose tokenizer llama.cpp does not
know by hash.

llama.cpp identifies a BPE pre-tokenizer by hashing the encoding of a probe text and refuses
unknown hashes. Fathom's tokenizers (`fathom tokenizer train`, the fixtures) are byte-level BPE
with the GPT-2 split regex, which is llama.cpp's `gpt-2` pre-tokenizer; this wrapper answers
`gpt-2` for them (or the name given by --pre) and otherwise runs the converter unchanged.

Usage:
  python tools/gguf/convert.py --llama-cpp DIR [--pre gpt-2] -- MODEL_DIR --outtype f32|f16|q8_0 --outfile F.gguf
"""

import argparse
import os
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp source tree (has convert_hf_to_gguf.py)")
    ap.add_argument("--pre", default="gpt-2", help="llama.cpp pre-tokenizer name to report")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    root = os.path.abspath(args.llama_cpp)
    sys.path.insert(0, os.path.join(root, "gguf-py"))
    sys.path.insert(0, root)
    import conversion.base as base  # noqa: E402  (llama.cpp's module)
    import convert_hf_to_gguf  # noqa: E402

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return args.pre

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    rest = [a for a in args.rest if a != "--"]
    sys.argv = ["convert_hf_to_gguf.py"] + rest
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
