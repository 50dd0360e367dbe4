#!/usr/bin/env bash
# The documented post-training run (docs/post-training.md): base model → SFT on a mixed cold
# start → GRPO on 2-digit arithmetic, then trace distillation into a fresh copy of the base
# model, against the same base model fine-tuned on the raw task data (answers only) for the same
# number of steps.
#
#   cargo build --release && bash tools/train/r1_pipeline.sh [OUT]      (default OUT=runs/r1)
#
# Every step is resumable: re-running the script skips finished stages (their final/ exists).
set -euo pipefail
cd "$(dirname "$0")/../.."
F=${FATHOM:-./target/release/fathom}
if [ -d models/base ]; then BASE=${BASE:-models/base}; else BASE=${BASE:-models/default}; fi
OUT=${1:-runs/r1}
TASK=arithmetic:2
STUDENT_STEPS=${STUDENT_STEPS:-500}
mkdir -p "$OUT"
stage() { [ -d "$OUT/$1/final" ] && echo "== $1: done, skipped" && return 1; echo "== $1"; return 0; }
t0=$(date +%s)

# Data. The cold start is R1's situation in miniature: 30,000 problems of which a quarter show
# column-arithmetic reasoning in <think> and the rest only the answer (empty reasoning). The raw
# task data (answers only) trains the distillation control.
[ -f "$OUT/sft.jsonl" ] || $F tasks --task $TASK --n 30000 --style worked --worked-share 0.25 \
  --out "$OUT/sft.jsonl"
[ -f "$OUT/raw.jsonl" ] || $F tasks --task $TASK --n 30000 --style answer --out "$OUT/raw.jsonl"

# SFT to the end of its schedule (cosine to lr/10): its final checkpoint is both "SFT alone" and
# GRPO's start.
if stage sft; then
  $F sft --model "$BASE" --data "$OUT/sft.jsonl" --out "$OUT/sft" --seq-len 128 --batch-size 16 \
    --steps 2000 --lr 1e-3 --eval-every 250 --save-every 250 --keep-checkpoints 10
fi
# GRPO: 64 prompts x 8 rollouts per step, groups whose rewards are all equal dropped, constant lr
# after a 10-step warm-up.
if stage grpo; then
  $F grpo --model "$OUT/sft/final" --task $TASK --out "$OUT/grpo" --steps 100 \
    --prompts 64 --group-size 8 --drop-uniform-groups --max-tokens 48 --temperature 1.0 \
    --lr 1e-4 --beta 0.04 --eval-every 10 --eval-n 300 --eval-k 1
fi
if stage distill; then
  # The teacher answers the same number of training problems as the raw data holds; only
  # correct, well-formed traces that reason are kept (R1 distils reasoning, not bare answers).
  $F distill --teacher "$OUT/grpo/final" --student "$BASE" --mode traces --task $TASK \
    --problems 30000 --samples 2 --require-reasoning --max-tokens 48 --out "$OUT/distill" \
    --seq-len 128 \
    --steps "$STUDENT_STEPS" --lr 1e-3 --eval-every 250 --save-every 250
fi
if stage raw-sft; then
  $F sft --model "$BASE" --data "$OUT/raw.jsonl" --out "$OUT/raw-sft" --seq-len 128 \
    --steps "$STUDENT_STEPS" --lr 1e-3 --eval-every 250 --save-every 250
fi

# Held-out evaluation of every stage on the same 1000 fresh problems: greedy accuracy, format
# rate, pass@8 at temperature 1.
for m in sft/final grpo/final distill/final raw-sft/final; do
  name=$(echo "$m" | tr '/' '-')
  [ -f "$OUT/eval-$name.json" ] || $F eval --model "$OUT/$m" --task $TASK --n 1000 --seed 7 \
    --k 8 --temperature 1.0 --max-tokens 48 --format json > "$OUT/eval-$name.json"
done
python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
print(f"| model | held-out accuracy (greedy) | format | pass@8 |")
print(f"|---|---|---|---|")
for m in ["sft-final", "grpo-final", "distill-final", "raw-sft-final"]:
    r = json.load(open(f"{out}/eval-{m}.json"))
    print(f"| {m} | {100*r['accuracy']:.1f} % | {100*r['format_rate']:.1f} % | {100*r['pass_at_k']:.1f} % |")
EOF
echo "wall time: $(( $(date +%s) - t0 )) s"
