#!/usr/bin/env bash
# GPU evidence for issue 4 (memory fluctuation): notebook 05 and the stress matrix on a Qwen3-4B-shaped
# checkpoint (random bf16 weights) on CUDA. Run from anywhere; qwenlab runs from this checkout (PYTHONPATH).
#
#   OUT=/some/dir scripts/gpu_memory_evidence.sh       # on the lent H100: $OUT is set for you
#
# Writes to $OUT (default reports/memory-h100), few files on purpose (the device tool returns at most 8):
#   gpu_memory_evidence.log        everything printed, device and versions first
#   stress_cuda.json               qwenlab stress --json result (3 strategies x STRESS_ITERATIONS x 6 turns)
#   05_memory_fluctuation.json     notebook 05's metrics and verdict
#   memory_evidence.tar.gz         figures/, metrics/, the stress JSONs, the memory snapshot, the executed notebook
# Environment knobs: CKPT (/tmp/q4b), STRESS_ITERATIONS (10), STRESS_TOKENS (16), NB_TOKENS (32),
# FRESH_ITERATIONS (2; 0 skips the fresh-process + expandable_segments run; skipped too when fewer than 150 s of
# BUDGET_S=540 remain, so one 600 s device call finishes), QWENLAB_TOKENIZER_DIR (see below).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-$REPO/reports/memory-h100}
CKPT=${CKPT:-/tmp/q4b}
STRESS_ITERATIONS=${STRESS_ITERATIONS:-10}
STRESS_TOKENS=${STRESS_TOKENS:-16}
NB_TOKENS=${NB_TOKENS:-32}
FRESH_ITERATIONS=${FRESH_ITERATIONS:-2}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT" "$WORK/report"
exec > >(tee "$OUT/gpu_memory_evidence.log") 2>&1

bundle() {
  cp -f "$WORK"/report/metrics/05_memory_fluctuation.json "$OUT/" 2>/dev/null
  tar czf "$OUT/memory_evidence.tar.gz" -C "$WORK/report" . 2>/dev/null
  echo "== outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}
trap bundle EXIT
trap 'exit 143' TERM INT

print_env
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "CUDA not available: stop"; exit 1; }
echo "command: $0  (CKPT=$CKPT STRESS_ITERATIONS=$STRESS_ITERATIONS STRESS_TOKENS=$STRESS_TOKENS NB_TOKENS=$NB_TOKENS FRESH_ITERATIONS=$FRESH_ITERATIONS)"
tokenizer_shim || exit 2
make_checkpoint "$CKPT" qwen3-4b cuda || exit 1

step "notebook 05 on cuda bfloat16"
$PY scripts/run_notebook.py notebooks/05_memory_fluctuation.ipynb "$WORK/report/05_memory_fluctuation.ipynb" \
  model_dir="$CKPT" device=cuda dtype=bfloat16 out_dir="$WORK/report" max_new_tokens="$NB_TOKENS" iterations=3 \
  stress_max_new_tokens=8 kv_lengths='"256,1024,4096"' interval_s=0.05 history_path="$WORK/report/memory_snapshot.pickle" \
  || echo "notebook 05 FAILED (exit $?)"

step "stress matrix: cuda bfloat16, session/rebuild/replay x $STRESS_ITERATIONS iterations x 6 turns, same process"
$PY -m qwenlab.memory.stress --model "$CKPT" --device cuda --dtype bfloat16 --iterations "$STRESS_ITERATIONS" --turns 6 \
  --max-new-tokens "$STRESS_TOKENS" --out "$OUT/stress_cuda.json"
echo "stress exit code: $?"
cp -f "$OUT/stress_cuda.json" "$WORK/report/" 2>/dev/null

if [ "$FRESH_ITERATIONS" -gt 0 ] && [ $((SECONDS - START)) -gt $((BUDGET_S - 150)) ]; then
  step "skipping the fresh-process run: $((SECONDS - START)) s used of BUDGET_S=$BUDGET_S"
elif [ "$FRESH_ITERATIONS" -gt 0 ]; then
  step "stress matrix: fresh process per iteration, expandable_segments on, empty_cache on"
  $PY -m qwenlab.memory.stress --model "$CKPT" --device cuda --dtype bfloat16 --iterations "$FRESH_ITERATIONS" --turns 6 \
    --max-new-tokens "$STRESS_TOKENS" --strategies session,rebuild --fresh-process --expandable-segments on \
    --empty-cache on --out "$WORK/report/stress_cuda_fresh_expandable.json"
  echo "stress (fresh) exit code: $?"
fi
step "done"
