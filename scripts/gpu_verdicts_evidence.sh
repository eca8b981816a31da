#!/usr/bin/env bash
# GPU evidence for the measured verdicts on a checkpoint whose logits look trained: `qwenlab tiny --preset
# trained-24l` trained on CUDA (or reused), then on it, in bfloat16 on one GPU:
#   1. a bug confined to one deep layer (RoPE base x1.5, k_norm skipped, in layer 17 of 24) named by the isolated
#      errors, with its ratio to the floor (scripts/deep_bug_evidence.py);
#   2. notebooks 03, 04 and 06 on the bf16 checkpoint, then 03 and 04 with quant=nvfp4 (planted bugs on);
#   3. `qwenlab bench --quant nvfp4`: bf16 and NVFP4 rows, graph and eager, and where their greedy tokens part.
# Steps that would not fit BUDGET_S are skipped and say so. Carry .tok (tokenizer files) and .whl (compressed-tensors
# and its needs, for the quantized reference; ipython).
#
#   OUT=/some/dir BUDGET_S=560 bash scripts/gpu_verdicts_evidence.sh
#
# Writes $OUT/gpu_verdicts_evidence.log, training.json, deep_bug.json, bench_trained.json and metrics.tar.gz (each
# notebook's metrics JSON and figures). Knobs: CKPT (data/models/trained-24l: an ignored folder of the checkout, so a
# warm machine keeps it between calls), TRAIN_SECONDS (90) or TRAIN_STEPS (a step count: the same weights on any
# load of the machine; 776 is what 110 s gave on an idle H200), NOTEBOOKS ("03 04 06 03:nvfp4 04:nvfp4"), NB04_ARGS
# (extra name=value parameters of notebook 04), SKIP_DEEP=1, BENCH_FIRST=1 (the bench before the notebooks).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-$REPO/reports/verdicts-gpu}
CKPT=${CKPT:-$REPO/data/models/trained-24l}
BUDGET_S=${BUDGET_S:-560}
DEVICE=${DEVICE:-cuda}  # cpu: a dry run of the steps on a small checkpoint
NOTEBOOKS=${NOTEBOOKS-03 04 06 03:nvfp4 04:nvfp4}  # set and empty: none
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_verdicts_evidence.log") 2>&1
left() { echo $((BUDGET_S - (SECONDS - START))); }
bench() {
  if [ "$(left)" -gt 90 ]; then
    step "qwenlab bench --quant nvfp4 on the trained checkpoint (greedy partings with their margins)"
    $PY -m qwenlab bench --model "$CKPT" --device "$DEVICE" --dtype bfloat16 --quant nvfp4 --hf off --new-tokens 256 \
      --prefill-tokens 2048 --out "$OUT/bench_trained.json"
  else
    step "bench skipped ($(left) s left)"
  fi
}
print_env
tokenizer_shim || exit 2
install_wheels
echo "command: $0 (CKPT=$CKPT BUDGET_S=$BUDGET_S TRAIN_SECONDS=${TRAIN_SECONDS:-90} NOTEBOOKS=$NOTEBOOKS)"

if [ -f "$CKPT/training.json" ]; then
  step "trained checkpoint $CKPT exists, reused"
else
  if [ -n "${TRAIN_STEPS:-}" ]; then length=(--train-steps "$TRAIN_STEPS"); else length=(--train-seconds "${TRAIN_SECONDS:-90}"); fi
  step "qwenlab tiny $CKPT --preset trained-24l ${length[*]} --seed 0 --device $DEVICE"
  $PY -m qwenlab tiny "$CKPT" --preset trained-24l "${length[@]}" --seed 0 --device "$DEVICE"
  echo "train exit code: $? (0: realistic, 1: written but under the realism bar)"
fi
[ -f "$CKPT/training.json" ] || { echo "no checkpoint written"; exit 1; }
cp -f "$CKPT/training.json" "$OUT/training.json"
$PY - "$CKPT/training.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
m, c = r["realism"], r["loss_curve"]
print(f"steps {r['steps']}, {r['seconds']:.1f} s training, {r['device']}; loss every 10%:",
      " ".join(f"{c[min(len(c) - 1, i * len(c) // 10)]:.2f}" for i in range(11)))
print(f"held-out loss {r['heldout_loss']:.3f}; median entropy {m['median_entropy']:.2f} nats; near ties "
      f"{m['near_tie_steps']}/{m['greedy_steps']} = {m['near_tie_fraction']:.1%} (min margin {m['min_margin']:.4f}); "
      f"realistic: {m['realistic']} {m['reasons']}")
from pathlib import Path
from tokenizers import Tokenizer
tok = Tokenizer.from_file(str(Path(sys.argv[1]).parent / "tokenizer.json"))
print("greedy text:", repr(tok.decode(m["greedy_ids"]))[:400])
print("reproduce:", r["reproduce"])
PYEOF

if [ "${SKIP_DEEP:-0}" != 1 ]; then
  step "a bug in one deep layer (layer 17 of 24), bf16 on $DEVICE"
  $PY scripts/deep_bug_evidence.py "$CKPT" --device "$DEVICE" --dtype bfloat16 --layer 17 --out "$OUT/deep_bug.json"
fi
if [ "${BENCH_FIRST:-0}" = 1 ]; then bench; fi

for item in $NOTEBOOKS; do
  nb=${item%%:*}; quant=""; [ "$item" != "$nb" ] && quant=${item#*:}
  name=$(basename "$(ls notebooks/${nb}_*.ipynb)" .ipynb)
  tag=bf16${quant:+-$quant}
  if [ "$(left)" -lt 60 ]; then step "notebook $name ($tag) skipped: $(left) s left"; continue; fi
  step "notebook $name on $CKPT (cuda, bfloat16${quant:+, quant=$quant})"
  t0=$SECONDS
  extra=(); [ "$nb" = 04 ] && read -r -a extra <<< "${NB04_ARGS:-}"
  $PY scripts/run_notebook.py "notebooks/$name.ipynb" "$WORK/$tag/$name.ipynb" model_dir="$CKPT" device="$DEVICE" \
    dtype=bfloat16 quant="$quant" out_dir="$WORK/$tag" "${extra[@]}" || echo "notebook $name ($tag) FAILED (exit $?)"
  echo "wall time ($name, $tag): $((SECONDS - t0)) s"
  verdict_line "$WORK/$tag/metrics/$name.json" "$name ($tag)"
done
(cd "$WORK" && tar czf "$OUT/metrics.tar.gz" --exclude='*.ipynb' --exclude='*.py' bf16* 2>/dev/null)

if [ "${BENCH_FIRST:-0}" != 1 ]; then bench; fi
step "done"
