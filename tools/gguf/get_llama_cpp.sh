#!/usr/bin/env bash
# Fetch llama.cpp as vendored by the llama-cpp-python source package on PyPI and build the tools
# the benchmarks use (llama-bench, llama-quantize). Usage: tools/gguf/get_llama_cpp.sh [DEST]
# Prints the llama.cpp source dir. Needs curl, a C++ compiler, and cmake + ninja (pip install).
# The converter (tools/gguf/convert.py) needs torch and transformers besides.
set -euo pipefail
DEST=${1:-/tmp/llama-cpp}
VER=0.3.36
mkdir -p "$DEST"
cd "$DEST"
if [ ! -d "llama_cpp_python-$VER" ]; then
  # PyPI's JSON API where it answers; otherwise through pip's own index (pip reads the sdist's
  # metadata, so it needs scikit-build-core installed: pip install scikit-build-core).
  if URL=$(curl -sf https://pypi.org/pypi/llama-cpp-python/$VER/json | python3 -c "import json,sys; print([u['url'] for u in json.load(sys.stdin)['urls'] if u['packagetype']=='sdist'][0])"); then
    curl -sL -o "llama_cpp_python-$VER.tar.gz" "$URL"
  else
    python3 -m pip download "llama-cpp-python==$VER" --no-deps --no-binary :all: --no-build-isolation -d . >&2
  fi
  tar xzf "llama_cpp_python-$VER.tar.gz"
fi
SRC="$DEST/llama_cpp_python-$VER/vendor/llama.cpp"
cd "$SRC"
cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF >&2
ninja -C build -j"$(nproc)" llama-bench llama-quantize >&2
echo "$SRC"
