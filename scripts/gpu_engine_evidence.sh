#!/usr/bin/env bash
# GPU evidence of the engine redesign and the NVFP4 kernels in one device call (a session's device time is short):
#   1. the CUDA tests of the redesign: graph engine, playground on the graph engine, planted bugs after a graph
#      generate on a fused model, deep copy / .to(), split placement, the Triton kernels against float64;
#   2. `qwenlab bench` on the Qwen3-4B shape, bf16 and NVFP4 in one run (graph and eager engines);
#   3. the same bench of the code before the redesign (`.old/qwenlab`, carried) on the same weights;
#   4. if time is left, `qwenlab tiny --preset trained-24l --train-seconds S` (realistic logits).
# Every step is timed; steps that would not fit BUDGET_S are skipped and say so. Needs carried: .whl (ipywidgets and
# its needs, for the playground test), .tok (tokenizer files), .old (the old package, for step 3).
#
#   OUT=/some/dir BUDGET_S=470 bash scripts/gpu_engine_evidence.sh
#
# BENCH_ARGS (default "--hf off --new-tokens 128 --prefill-tokens 2048"): the decode bars of doc/performance.md are
# measured with "--hf auto --new-tokens 256 --prefill-tokens 2048" (transformers' compiled static cache in the same
# run). SKIP_TESTS=1 skips step 1; TESTS="pytest targets" runs those instead (TESTS_K: their -k); KERNEL_BENCH=1 also runs
# bench/nvfp4_kernels.py (each NVFP4 kernel against cuBLAS per Qwen3-4B projection shape) before the checkpoint;
# GEMV_SWEEP=1 runs bench/nvfp4_gemv_sweep.py (every GEMV tile on those shapes); PROFILE="modes" runs
# bench/decode_profile.py on the checkpoint with those modes (e.g. fused,layer,step) for bf16, and for NVFP4
# too with PROFILE_NVFP4=1; LOAD_MEMORY=1 runs bench/load_memory.py (what an NVFP4 load leaves allocated); GEMV_TILES=1
# runs bench/gemv_tiles.py (the bf16 GEMV's tiles one by one, and its cold autotune); LOAD_SPEED=1 runs
# bench/load_speed.py on the checkpoint (each part of a load, and transformers', first and repeated); BENCH=0 stops before the bench (and
# after those); TRAIN=0 skips step 4.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-$REPO/reports/gpu-engine}
BUDGET_S=${BUDGET_S:-470}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_engine_evidence.log") 2>&1

left() { echo $((BUDGET_S - (SECONDS - START))); }
print_env
tokenizer_shim || exit 1
install_wheels

if [ "${SKIP_TESTS:-0}" != 1 ]; then
step "CUDA tests"
if [ -n "${TESTS:-}" ]; then
  # shellcheck disable=SC2086
  $PY -m pytest -q -p no:cacheprovider $TESTS ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tail -25
else
  $PY -m pytest -q -p no:cacheprovider -x \
    tests/generation/test_graph_engine.py tests/model/test_placement.py \
    "tests/playground/test_playground.py::test_the_playground_runs_the_graph_engine_on_cuda" \
    tests/quant/test_triton_nvfp4.py -k "cuda or gemv or split or deep_copy or planted or graph or triton" 2>&1 \
    | tail -25
fi
fi

if [ "${KERNEL_BENCH:-0}" = 1 ]; then
  step "NVFP4 kernels against bf16 cuBLAS, per projection shape"
  $PY bench/nvfp4_kernels.py --small-m "" --out "$OUT/nvfp4_kernels.json" > "$OUT/nvfp4_kernels.log" 2>&1
  tail -28 "$OUT/nvfp4_kernels.log"
fi
if [ "${GEMV_SWEEP:-0}" = 1 ]; then
  step "NVFP4 GEMV tiles, one by one (bench/nvfp4_gemv_sweep.py)"
  $PY bench/nvfp4_gemv_sweep.py --out "$OUT/nvfp4_gemv_sweep.json" 2>&1 | tee "$OUT/nvfp4_gemv_sweep.log" | grep -v "^ "
fi

if [ "${GEMV_TILES:-0}" = 1 ]; then
  step "bf16 GEMV tiles, one by one (bench/gemv_tiles.py)"
  $PY bench/gemv_tiles.py --out "$OUT/gemv_tiles.json" 2>&1 | tee "$OUT/gemv_tiles.log"
fi

if [ "${BENCH:-1}" = 0 ] && [ -z "${PROFILE:-}" ] && [ "${LOAD_MEMORY:-0}" != 1 ] && [ "${LOAD_SPEED:-0}" != 1 ]; then step "done (BENCH=0: no checkpoint, bench or training)"; exit 0; fi

step "Qwen3-4B-shaped checkpoint"
make_checkpoint /tmp/q4b qwen3-4b cuda || exit 1

if [ "${LOAD_MEMORY:-0}" = 1 ]; then
  step "what an NVFP4 load leaves allocated (bench/load_memory.py)"
  $PY bench/load_memory.py --model /tmp/q4b --quant nvfp4 2>&1 | tee "$OUT/load_memory.log"
fi
if [ "${LOAD_SPEED:-0}" = 1 ]; then
  step "load speed, piece by piece (bench/load_speed.py)"
  $PY bench/load_speed.py --model /tmp/q4b --hf --json "$OUT/load_speed.json" 2>&1 | grep -v "Loading weights" \
    | tee "$OUT/load_speed.log"
fi
if [ -n "${PROFILE:-}" ]; then
  step "decode step profile, bf16, modes $PROFILE (bench/decode_profile.py)"
  $PY bench/decode_profile.py --model /tmp/q4b --modes "$PROFILE" 2>&1 | tee "$OUT/decode_profile_bf16.log"
  if [ "${PROFILE_NVFP4:-0}" = 1 ]; then
    step "decode step profile, NVFP4, modes $PROFILE"
    $PY bench/decode_profile.py --model /tmp/q4b --quant nvfp4 --modes "$PROFILE" 2>&1 \
      | tee "$OUT/decode_profile_nvfp4.log"
  fi
fi
if [ "${BENCH:-1}" = 0 ]; then step "done (BENCH=0: no bench or training)"; exit 0; fi

step "qwenlab bench: bf16 and NVFP4 in one run (this code)"
# shellcheck disable=SC2086
$PY -m qwenlab bench --model /tmp/q4b --device cuda --dtype bfloat16 --quant nvfp4 \
  ${BENCH_ARGS:---hf off --new-tokens 128 --prefill-tokens 2048} --out "$OUT/bench_new.json"

if [ -d "$REPO/.old/qwenlab" ] && [ "$(left)" -gt 90 ]; then
  step "qwenlab bench of the code before the redesign (same weights, bf16 graph)"
  PYTHONPATH="$REPO/.old:$PYTHONPATH" $PY -m qwenlab bench --model /tmp/q4b --device cuda --dtype bfloat16 \
    --hf off --engines graph --new-tokens 128 --prefill-tokens 2048 --out "$OUT/bench_old.json"
else
  step "old bench skipped ($(left) s left)"
fi

if [ "${TRAIN:-1}" = 1 ] && [ "$(left)" -gt 100 ]; then
  secs=$(( $(left) - 70 )); [ "$secs" -gt 100 ] && secs=100
  step "trained-24l for ${secs} s"
  $PY -m qwenlab tiny /tmp/t24 --preset trained-24l --train-seconds "$secs" --device cuda
  cp -f /tmp/t24/training.json "$OUT/" 2>/dev/null
else
  step "training skipped ($(left) s left)"
fi
step "done"
