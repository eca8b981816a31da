#!/usr/bin/env bash
# GPU evidence for models larger than one GPU: a Qwen3-32B-shaped random bf16 checkpoint (65.5 GB: one copy fits
# an 80 GB card, two do not), notebook 03 split across every visible GPU (qwenlab by layer ranges, the reference
# through accelerate) and again sequentially on one GPU (one model at a time, diffed from dumps), with each run's
# plan, per-device peak memory, wall time and verdict. The planted bugs run under every placement (hooks and
# overrides for one capture; PLANT_BUGS=False turns them off).
#
#   OUT=/some/dir bash scripts/gpu_multigpu_evidence.sh      # on the lent 2-GPU machine; carry .tok
#
# Writes $OUT/gpu_multigpu_evidence.log and $OUT/03_split.json, $OUT/03_sequential.json (notebook 03's metrics).
# Knobs: CKPT (/tmp/q32b), PRESET (qwen3-32b), RUNS ("split sequential").
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-$REPO/reports/multigpu}
CKPT=${CKPT:-/tmp/q32b}
PRESET=${PRESET:-qwen3-32b}
RUNS=${RUNS:-split sequential}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_multigpu_evidence.log") 2>&1
print_env
nvidia-smi -L || true
tokenizer_shim || exit 2
echo "command: $0 (CKPT=$CKPT PRESET=$PRESET RUNS=$RUNS)"
make_checkpoint "$CKPT" "$PRESET" cuda || exit 1
for run in $RUNS; do
  case $run in
    split) visible=$(seq -s, 0 $(($(nvidia-smi -L | wc -l) - 1))) ;;
    *) visible=0 ;;
  esac
  step "notebook 03, placement=$run, CUDA_VISIBLE_DEVICES=$visible"
  t0=$SECONDS
  CUDA_VISIBLE_DEVICES=$visible $PY scripts/run_notebook.py notebooks/03_layer_diffs.ipynb "$WORK/$run/03_layer_diffs.ipynb" \
    model_dir="$CKPT" device=cuda dtype=bfloat16 out_dir="$WORK/$run" placement="$run" plant_bugs="${PLANT_BUGS:-True}" \
    || echo "notebook 03 ($run) FAILED (exit $?)"
  echo "wall time ($run): $((SECONDS - t0)) s"
  cp -f "$WORK/$run/metrics/03_layer_diffs.json" "$OUT/03_$run.json" 2>/dev/null
done
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
