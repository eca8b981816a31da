#!/usr/bin/env bash
# GPU evidence for models larger than one GPU: a Qwen3-32B-shaped random bf16 checkpoint (65.5 GB: one copy fits
# an 80 GB card, two do not), notebook 03 split across every visible GPU (qwenlab by layer ranges, the reference
# through accelerate) and again sequentially on one GPU (one model at a time, diffed from dumps), with each run's
# plan, per-device peak memory, wall time and verdict. The planted bugs run under every placement (hooks and
# overrides for one capture; PLANT_BUGS=False turns them off). Then MORE (e.g. "04 06") on the same checkpoint with
# every GPU visible: notebook 04 (qwenlab on the first GPU, its float32 reference for the floors spread over all) and
# notebook 06 (NVFP4 at load; each reference loaded only where it fits, spread over all; doc/nvfp4.md).
#
#   OUT=/some/dir bash scripts/gpu_multigpu_evidence.sh      # on the lent 2-GPU machine; carry .tok
#
# Writes $OUT/gpu_multigpu_evidence.log and $OUT/03_split.json, $OUT/03_sequential.json (notebook 03's metrics),
# $OUT/04.json, $OUT/06.json, and metrics.tar.gz (every notebook's metrics and figures).
# One H200 (nvidia-h200: 64 GiB of disk, 62 GiB of checkpoint): RAMDISK=1 keeps the checkpoint and TMPDIR (notebook
# 06's exported quantized reference) in a tmpfs at /mnt/ram (128 GB of memory; references load straight onto the
# GPU, so the host needs little beside it), e.g.
#   OUT=$OUT RAMDISK=1 RUNS=sequential MORE="04 06" bash scripts/gpu_multigpu_evidence.sh
# Knobs: CKPT (data/models/q32b, or /mnt/ram/q32b with RAMDISK=1: kept by a warm machine between calls), PRESET
# (qwen3-32b), RUNS ("split sequential"; empty: none), MORE (""), NB04_ARGS and NB06_ARGS (name=value parameters;
# NB06_ARGS defaults to run_variants=False: each variant re-quantizes the whole model), BUDGET_S (560: a notebook
# that would start with under 60 s left is skipped and says so). Carry .whl too for notebook 06 (compressed-tensors).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-$REPO/reports/multigpu}
if [ "${RAMDISK:-0}" = 1 ]; then
  # 62 GiB of checkpoint plus notebook 06's quantized reference (about 20 GB, exported into TMPDIR); the disk has
  # too little room for the export beside the tools
  mkdir -p /mnt/ram && { mountpoint -q /mnt/ram && mount -o remount,size=88g /mnt/ram \
    || mount -t tmpfs -o size=88g tmpfs /mnt/ram; } || { echo "RAMDISK=1: could not mount a tmpfs at /mnt/ram"; exit 2; }
  CKPT=${CKPT:-/mnt/ram/q32b}
  mkdir -p /mnt/ram/tmp && export TMPDIR=/mnt/ram/tmp
fi
CKPT=${CKPT:-$REPO/data/models/q32b}
PRESET=${PRESET:-qwen3-32b}
RUNS=${RUNS-split sequential}
MORE=${MORE:-}
BUDGET_S=${BUDGET_S:-560}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_multigpu_evidence.log") 2>&1
left() { echo $((BUDGET_S - (SECONDS - START))); }
print_env
nvidia-smi -L || true
tokenizer_shim || exit 2
install_wheels
echo "command: $0 (CKPT=$CKPT PRESET=$PRESET RUNS=$RUNS MORE=$MORE)"
DEVICE=${DEVICE:-cuda}  # cpu: a dry run of the steps with a small PRESET
make_checkpoint "$CKPT" "$PRESET" "$DEVICE" || exit 1
for run in $RUNS; do
  case $run in
    split) visible=$(seq -s, 0 $(($(nvidia-smi -L | wc -l) - 1))) ;;
    *) visible=0 ;;
  esac
  if [ "$(left)" -lt 60 ]; then step "notebook 03 ($run) skipped: $(left) s left"; continue; fi
  step "notebook 03, placement=$run, CUDA_VISIBLE_DEVICES=$visible"
  t0=$SECONDS
  CUDA_VISIBLE_DEVICES=$visible $PY scripts/run_notebook.py notebooks/03_layer_diffs.ipynb "$WORK/$run/03_layer_diffs.ipynb" \
    model_dir="$CKPT" device="$DEVICE" dtype=bfloat16 out_dir="$WORK/$run" placement="$run" plant_bugs="${PLANT_BUGS:-True}" \
    || echo "notebook 03 ($run) FAILED (exit $?)"
  echo "wall time ($run): $((SECONDS - t0)) s"
  cp -f "$WORK/$run/metrics/03_layer_diffs.json" "$OUT/03_$run.json" 2>/dev/null
done
for nb in $MORE; do
  name=$(basename "$(ls notebooks/${nb}_*.ipynb)" .ipynb)
  if [ "$(left)" -lt 60 ]; then step "notebook $name skipped: $(left) s left"; continue; fi
  extra=()
  [ "$nb" = 04 ] && read -r -a extra <<< "${NB04_ARGS:-}"
  [ "$nb" = 06 ] && read -r -a extra <<< "${NB06_ARGS:-run_variants=False}"
  step "notebook $name on $CKPT ($DEVICE, bfloat16, every GPU visible) ${extra[*]}"
  t0=$SECONDS
  $PY scripts/run_notebook.py "notebooks/$name.ipynb" "$WORK/$nb/$name.ipynb" model_dir="$CKPT" device="$DEVICE" \
    dtype=bfloat16 out_dir="$WORK/$nb" "${extra[@]}" || echo "notebook $name FAILED (exit $?)"
  echo "wall time ($name): $((SECONDS - t0)) s"
  cp -f "$WORK/$nb/metrics/$name.json" "$OUT/$nb.json" 2>/dev/null
  verdict_line "$OUT/$nb.json" "$name"
done
(cd "$WORK" && tar czf "$OUT/metrics.tar.gz" --exclude='*.ipynb' --exclude='*.py' ./*/metrics ./*/figures ./*/*.cells.json 2>/dev/null)
step "summary"
$PY - "$OUT" $RUNS <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for run in sys.argv[2:]:
    path = out / f"03_{run}.json"
    if not path.is_file():
        print(f"{run}: no metrics")
        continue
    r = json.loads(path.read_text())
    m = r["metrics"]
    print(f"{run}: verdict {r['verdict']} {r['reasons']}; first divergence {m.get('first_divergence')}; "
          f"max rel_l2 {m.get('max_rel_l2'):.3g}; compared {m.get('compared_tensors')}; KL mean "
          f"{(m.get('logits') or {}).get('kl_mean')}; plan {m.get('placement', {}).get('placement')}; "
          f"peaks GiB {m.get('device_peak_gib')}; seconds {m.get('placement_seconds')}")
PYEOF
step "done"
