#!/usr/bin/env bash
# Two evidence lanes at once on the lent two-GPU machine (one call, one GPU each):
#   GPU 0: scripts/gpu_moe_evidence.sh: the CUDA tiny-MoE test, the Qwen3-30B-A3B-shaped checkpoint (drawn once)
#          through notebooks 03 and 04, then `qwenlab bench` beside transformers if time is left;
#   GPU 1: scripts/gpu_verdicts_evidence.sh: the trained-24l checkpoint trained for TRAIN_STEPS steps, then notebooks
#          TRAINED_NOTEBOOKS on it.
# Only one lane loads a large model: two lanes each loading ~60 GB checkpoints thrash the host's page cache (a
# first try ran both MoE notebooks at once and each took over four times as long as alone). scripts/gpu_lanes.sh
# pins each lane to half the host's cores: with both lanes free to use every core, the MoE notebooks (bound by the
# host's kernel launches) ran 4-6x slower than alone and a trained-model notebook 04 3.7x slower.
# Each lane writes its own folder under $OUT (moe/, trained/) with its script's log. Carry .tok and .whl.
#
#   OUT=/some/dir bash scripts/gpu_x2_moe_trained.sh
#
# Knobs: NB04_ARGS (notebook 04, both lanes), TRAIN_STEPS (776), TRAINED_NOTEBOOKS ("06 03 03:nvfp4 04 04:nvfp4"),
# MOE_NOTEBOOKS ("03 04"), BENCH_ARGS (the MoE bench), BUDGET_S (560, each lane).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-reports/x2}
NB04_ARGS=${NB04_ARGS:-latency_new_tokens=32 latency_positions=[64,256]}
BENCH_ARGS=${BENCH_ARGS:---hf dynamic --engines eager --new-tokens 64 --prefill-tokens 512}
BUDGET_S=${BUDGET_S:-560}
mkdir -p "$OUT"
LANES_OUT=$OUT bash scripts/gpu_lanes.sh \
  "OUT=$OUT/moe NOTEBOOKS='${MOE_NOTEBOOKS:-03 04}' BUDGET_S=$BUDGET_S NB04_ARGS='$NB04_ARGS' BENCH_ARGS='$BENCH_ARGS' \
     bash scripts/gpu_moe_evidence.sh" \
  "OUT=$OUT/trained TRAIN_STEPS=${TRAIN_STEPS:-776} SKIP_DEEP=1 BUDGET_S=$BUDGET_S \
     NOTEBOOKS='${TRAINED_NOTEBOOKS:-06 03 03:nvfp4 04 04:nvfp4}' NB04_ARGS='$NB04_ARGS' bash scripts/gpu_verdicts_evidence.sh"
