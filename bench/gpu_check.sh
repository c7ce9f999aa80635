#!/usr/bin/env bash
# One GPU check, one command: bench/gpu_step.py at the LLaVA-1.5 7B and 13B shapes (pretrain and
# finetune, bf16, gradient checkpointing, random weights), then its tokens/s, MFU (ours and
# FlagPerf's) and peak memory beside `llavarun plan`'s prediction for the same configuration.
#
#   bash bench/gpu_check.sh            # one H100/H200: under 10 minutes (gpu_step's budget: 420 s)
#   bash bench/gpu_check.sh --tiny     # tiny shapes on CPU (tests/trainer/test_gpu_check.py)
#
# On one 80 GB card the 13B finetune (and, where needed, 7B) runs fewer decoder layers at the
# real width (gpu_step picks the count so 16-bit weights, gradients and AdamW moments fit; the
# table shows layers/full and a per-layer extrapolation to full depth). Needs torch and
# transformers only: no DeepSpeed, hjson or pydantic. Results go to $OUT (default bench-out/).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-bench-out}
mkdir -p "$out"
extra=()
if [[ "${1:-}" == "--tiny" ]]; then
  extra=(--tiny)
  shift
fi
"$python" bench/gpu_step.py "${extra[@]}" --time-budget "${GPU_CHECK_BUDGET:-420}" --out "$out/gpu_step.json" "$@" \
  > "$out/gpu_step.stdout"
PYTHONPATH="operator:trainer${PYTHONPATH:+:$PYTHONPATH}" "$python" -m llava_operator.capacity.gpucheck \
  "$out/gpu_step.json" | tee "$out/gpu_check.txt"
PYTHONPATH="operator:trainer${PYTHONPATH:+:$PYTHONPATH}" "$python" -m llava_operator.capacity.gpucheck \
  "$out/gpu_step.json" --json > "$out/gpu_check.json"
