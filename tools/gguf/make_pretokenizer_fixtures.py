"""Record llama.cpp's token ids for every pre-tokenizer name it knows, on one small vocabulary.

The vocabulary is fixtures/gguf_formats' (400-token byte-level BPE). For each name in
crates/fathom-core/src/pretokenizers.rs it writes a copy of that GGUF with
`tokenizer.ggml.pre` set to the name, runs the vendored llama.cpp's `llama-tokenize --ids
--no-bos` on each text of a corpus (English, code, digits, whitespace, punctuation, accents,
CJK, Cyrillic, Arabic), and writes fixtures/pretokenizers.json: {"corpus": [...],
"ids": {name: [[ids of text 0], ...] or "error: ..."}}. The test
crates/fathom-core/tests/pretokenizers.rs tokenizes the same texts with Fathom and compares.

  cmake --build $LLAMA/build --target llama-tokenize
  python tools/gguf/make_pretokenizer_fixtures.py --llama-cpp $LLAMA
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = [
    "Hello world! How's it going? I'm fine, they'll see.",
    "def main():\n    x = [1, 2, 3]\n    return x[0] + 42  # comment\n",
    "3.14159 and 1234567890, 12 345, 2026-12-07, $100.00",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   \n  trailing  ",
    "Ünïcödé café naïve résumé — “quotes” … ok?!",
    "日本語のテキストと中文字符，混合 English 文本。",
    "Привет, мир! Это тест. مرحبا بالعالم",
    "don't DON'T we've WE'VE it'd x's 'quoted'",
    "a+b=c; x<=y || z>=w && !q ^ ~r | s ` t",
    "    for (int i = 0; i < n; ++i) { sum += a[i]; }\r\n",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True)
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(a.llama_cpp, "gguf-py"))
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    table = open(os.path.join(ROOT, "crates", "fathom-core", "src", "pretokenizers.rs"), encoding="utf-8").read()
    names = re.findall(r'^    \("([^"]+)", "[A-Z0-9_]+", (?:true|false)\),$', table, re.M)
    base = os.path.join(ROOT, "fixtures", "gguf_formats", "q8_0.gguf")
    tokenize = os.path.join(a.llama_cpp, "build", "bin", "llama-tokenize")
    out = {"vocabulary": "fixtures/gguf_formats/q8_0.gguf", "corpus": CORPUS, "ids": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = os.path.join(tmp, f"{name}.gguf")
            reader = gguf.GGUFReader(base, "r")
            arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
            writer = gguf.GGUFWriter(path, arch=arch, endianess=reader.endianess)
            # copies every key and tensor, then closes the file
            copy_with_new_metadata(reader, writer, {"tokenizer.ggml.pre": MetadataDetails(gguf.GGUFValueType.STRING, name)}, [])
            rows = []
            for text in CORPUS:
                r = subprocess.run([tokenize, "-m", path, "-p", text, "--ids", "--no-bos", "--log-disable"],
                                   capture_output=True, text=True)
                last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
                if r.returncode != 0 or not last.startswith("["):
                    rows = "error: " + (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]
                    break
                rows.append(json.loads(last))
            out["ids"][name] = rows
            os.remove(path)
            print(name, "error" if isinstance(rows, str) else "ok")
    dest = os.path.join(ROOT, "fixtures", "pretokenizers.json")
    with open(dest, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
    print(dest)


if __name__ == "__main__":
    main()
