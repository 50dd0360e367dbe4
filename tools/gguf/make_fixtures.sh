#!/usr/bin/env bash
# Convert the tiny HF fixtures to GGUF with llama.cpp's own converter (fixtures/gguf/*.gguf).
# Usage: tools/gguf/make_fixtures.sh LLAMA_CPP_DIR [PYTHON]
#   LLAMA_CPP_DIR: a llama.cpp source tree, e.g. vendor/llama.cpp of the llama-cpp-python sdist
#   (tools/gguf/get_llama_cpp.sh fetches and builds it). Needs torch, transformers, sentencepiece.
set -euo pipefail
L=${1:?llama.cpp source dir}
PY=${2:-python3}
cd "$(dirname "$0")/../.."
mkdir -p fixtures/gguf
for m in deepseek_v3_tiny qwen2_tiny llama_tiny; do
  "$PY" tools/gguf/convert.py --llama-cpp "$L" -- "fixtures/$m" --outtype f32 --outfile "fixtures/gguf/$m.f32.gguf"
done
"$PY" tools/gguf/convert.py --llama-cpp "$L" -- fixtures/deepseek_v3_tiny --outtype q8_0 --outfile fixtures/gguf/deepseek_v3_tiny.q8_0.gguf
