#!/usr/bin/env bash
# GPU evidence for fast decode: the graph engine's CUDA parity tests, then `qwenlab bench` on the Qwen3-4B shape
# (random bf16 weights: the same cost as the real model), qwenlab beside HF transformers in one process.
#
#   OUT=/some/dir scripts/gpu_decode_bench.sh        # on the lent H100 ($OUT is set there); carry .tok
#
# Writes $OUT/gpu_decode_bench.log and $OUT/bench.json. Knobs: CKPT (/tmp/q4b), BENCH_ARGS (extra qwenlab bench
# arguments), SKIP_TESTS=1, PROFILE=1 (also bench/decode_profile.py).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-$REPO/reports/decode-gpu}
CKPT=${CKPT:-/tmp/q4b}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_decode_bench.log") 2>&1
print_env
tokenizer_shim || exit 2
echo "command: $0 (CKPT=$CKPT BENCH_ARGS=${BENCH_ARGS:-})"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step "graph vs eager on CUDA (tests/generation/test_graph_engine.py)"
  $PY -m pytest -q -p no:cacheprovider tests/generation/test_graph_engine.py 2>&1 | tail -5
fi
make_checkpoint "$CKPT" qwen3-4b cuda || exit 1
if [ "${PROFILE:-0}" = 1 ]; then
  step "profile: graph replay compiled vs not, kernels (bench/decode_profile.py)"
  $PY bench/decode_profile.py --model "$CKPT" --device cuda --dtype bfloat16
fi
step "qwenlab bench --model $CKPT --device cuda --dtype bfloat16 ${BENCH_ARGS:-}"
# shellcheck disable=SC2086
$PY -m qwenlab bench --model "$CKPT" --device cuda --dtype bfloat16 --out "$OUT/bench.json" ${BENCH_ARGS:-}
echo "bench exit code: $?"
step "done"
