#!/usr/bin/env bash
# Two evidence commands at once on the lent two-GPU machine, one GPU and half the host's cores each (taskset), with
# torch.compile's and OpenMP's threads capped to match: device time counts the machine, not its GPUs, so two lanes
# give twice the evidence per call. Left free to use every core, host-bound work in one lane (a MoE model's expert
# loop, compiles) ran 4-6x slower beside the other. Do not put two ~60 GB checkpoints in the two lanes: they thrash
# the host's page cache.
#
#   bash scripts/gpu_lanes.sh 'OUT=$OUT/a bash scripts/gpu_moe_evidence.sh' 'OUT=$OUT/b bash scripts/gpu_engine_evidence.sh'
#
# Each command runs under bash -c with CUDA_VISIBLE_DEVICES set to its lane's GPU; its output goes to lane0.out /
# lane1.out in $LANES_OUT (default: the current folder). Exit status: 0 when both lanes exit 0.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
[ $# -eq 2 ] || { echo "usage: $0 'lane 0 command' 'lane 1 command'"; exit 2; }
out=${LANES_OUT:-.}
mkdir -p "$out"
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS
half=$(( cores / 2 )); half=$(( half > 0 ? half : 1 ))
cap=$(( half > 8 ? 8 : half ))
pin() { if command -v taskset >/dev/null && [ "$cores" -gt 1 ]; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }
CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_COMPILE_THREADS=$cap OMP_NUM_THREADS=$cap \
  pin "0-$((half - 1))" bash -c "$1" > "$out/lane0.out" 2>&1 &
lane0=$!
CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_COMPILE_THREADS=$cap OMP_NUM_THREADS=$cap \
  pin "$half-$((2 * half - 1))" bash -c "$2" > "$out/lane1.out" 2>&1 &
lane1=$!
wait $lane0; rc0=$?
wait $lane1; rc1=$?
echo "lane 0 exit $rc0, lane 1 exit $rc1"
[ $rc0 -eq 0 ] && [ $rc1 -eq 0 ]
