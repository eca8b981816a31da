#!/usr/bin/env bash
# Two evidence lanes at once on the lent two-GPU machine (one call, one GPU each, device time halved):
#   GPU 0: the Qwen3-30B-A3B-shaped checkpoint (drawn once) through notebook 04 (scripts/gpu_moe_evidence.sh);
#   GPU 1: the trained-24l checkpoint trained (TRAIN_SECONDS), then, once GPU 0's checkpoint exists, notebook 03
#          on the 30B-A3B shape, the CUDA tiny-MoE test and `qwenlab bench` beside transformers, then notebooks
#          TRAINED_NOTEBOOKS on the trained checkpoint (scripts/gpu_verdicts_evidence.sh).
# Each lane writes its own folder under $OUT (moe04/, moe03/, trained/) with its script's log. Carry .tok and .whl.
#
#   OUT=/some/dir bash scripts/gpu_x2_moe_trained.sh
#
# Knobs: NB04_ARGS (notebook 04 on the MoE shape), TRAIN_SECONDS (110), TRAINED_NOTEBOOKS ("06 03 03:nvfp4"),
# BENCH_ARGS (the MoE bench).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-reports/x2}
MOE=${MOE:-data/models/q30b-a3b}
NB04_ARGS=${NB04_ARGS:-latency_new_tokens=32 latency_positions=[64,256]}
BENCH_ARGS=${BENCH_ARGS:---hf dynamic --engines eager --new-tokens 64 --prefill-tokens 512}
mkdir -p "$OUT"
(
  CUDA_VISIBLE_DEVICES=0 OUT=$OUT/moe04 CKPT=$MOE NOTEBOOKS=04 SKIP_TESTS=1 SKIP_BENCH=1 BUDGET_S=560 \
    NB04_ARGS="$NB04_ARGS" bash scripts/gpu_moe_evidence.sh > "$OUT/lane0.out" 2>&1
) &
(
  export CUDA_VISIBLE_DEVICES=1
  OUT=$OUT/trained NOTEBOOKS="" BUDGET_S=150 TRAIN_SECONDS=${TRAIN_SECONDS:-110} SKIP_DEEP=1 \
    bash scripts/gpu_verdicts_evidence.sh > "$OUT/lane1-train.out" 2>&1
  mv "$OUT/trained/gpu_verdicts_evidence.log" "$OUT/trained/train.log"
  for _ in $(seq 120); do [ -f "$MOE/config.json" ] && break; sleep 2; done
  OUT=$OUT/moe03 CKPT=$MOE NOTEBOOKS=03 BUDGET_S=320 BENCH_ARGS="$BENCH_ARGS" \
    bash scripts/gpu_moe_evidence.sh > "$OUT/lane1-moe.out" 2>&1
  OUT=$OUT/trained NOTEBOOKS="${TRAINED_NOTEBOOKS:-06 03 03:nvfp4}" BUDGET_S=120 SKIP_DEEP=1 \
    bash scripts/gpu_verdicts_evidence.sh > "$OUT/lane1-trained.out" 2>&1
) &
wait
echo "both lanes done"
