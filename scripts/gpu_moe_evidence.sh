#!/usr/bin/env bash
# GPU evidence for Qwen3-MoE: the CUDA test of tests/model/test_moe.py (tiny MoE in bf16 inside its measured floors),
# then a Qwen3-30B-A3B-shaped random bf16 checkpoint (61 GB, every expert resident) through notebook 03 (layer
# diffs with routing agreement and the planted MoE bugs) and notebook 04 (decode parity) on one GPU, and
# `qwenlab bench` beside transformers (its default grouped_mm experts). The graph engine declines MoE (the expert
# loop picks experts on the host): bench's graph row says so and decoding is eager.
#
#   OUT=/some/dir bash scripts/gpu_moe_evidence.sh      # on one H200 (141 GB); carry .tok
#
# Writes $OUT/gpu_moe_evidence.log, $OUT/03_layer_diffs.json, $OUT/04_decode_kv_parity.json, $OUT/bench.json.
# Knobs: CKPT (data/models/q30b-a3b: an ignored folder of the checkout, which a warm machine keeps between calls),
# NOTEBOOKS ("03 04"), NB04_ARGS (extra name=value parameters of notebook 04, e.g. shorter latency plots),
# SKIP_TESTS=1, SKIP_BENCH=1, BENCH_ARGS, BUDGET_S (560: a notebook or the bench that would start with under 60 s
# left is skipped and says so).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-$REPO/reports/moe-gpu}
CKPT=${CKPT:-$REPO/data/models/q30b-a3b}
BUDGET_S=${BUDGET_S:-560}
NOTEBOOKS=${NOTEBOOKS:-03 04}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_moe_evidence.log") 2>&1
left() { echo $((BUDGET_S - (SECONDS - START))); }
print_env
tokenizer_shim || exit 2
echo "command: $0 (CKPT=$CKPT NOTEBOOKS=$NOTEBOOKS)"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step "tiny MoE in bf16 on CUDA (tests/model/test_moe.py -k cuda)"
  $PY -m pytest -q -p no:cacheprovider tests/model/test_moe.py -k cuda 2>&1 | tail -5
fi
make_checkpoint "$CKPT" qwen3-30b-a3b cuda || exit 1
for nb in $NOTEBOOKS; do
  name=$(basename "$(ls notebooks/${nb}_*.ipynb)" .ipynb)
  if [ "$(left)" -lt 60 ]; then step "notebook $name skipped: $(left) s left"; continue; fi
  extra=(); [ "$nb" = 04 ] && read -r -a extra <<< "${NB04_ARGS:-}"
  step "notebook $name on $CKPT (cuda, bfloat16)"
  t0=$SECONDS
  $PY scripts/run_notebook.py "notebooks/$name.ipynb" "$WORK/report/$name.ipynb" model_dir="$CKPT" device=cuda \
    dtype=bfloat16 out_dir="$WORK/report" "${extra[@]}" || echo "notebook $name FAILED (exit $?)"
  echo "wall time ($name): $((SECONDS - t0)) s"
  cp -f "$WORK/report/metrics/$name.json" "$OUT/$name.json" 2>/dev/null
  cp -f "$WORK/report/$name.cells.json" "$OUT/$name.cells.json" 2>/dev/null  # seconds per cell
done
if [ "${SKIP_BENCH:-0}" != 1 ] && [ "$(left)" -lt 60 ]; then
  step "bench skipped: $(left) s left"
elif [ "${SKIP_BENCH:-0}" != 1 ]; then
  step "qwenlab bench --model $CKPT --device cuda --dtype bfloat16 ${BENCH_ARGS:-}"
  # shellcheck disable=SC2086
  $PY -m qwenlab bench --model "$CKPT" --device cuda --dtype bfloat16 --out "$OUT/bench.json" ${BENCH_ARGS:-}
  echo "bench exit code: $?"
fi
step "summary"
$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for path in sorted(out.glob("0*.json")):
    if path.name.endswith(".cells.json"):  # seconds per cell, not metrics
        continue
    r = json.loads(path.read_text())
    m = r["metrics"]
    print(f"{path.stem}: verdict {r['verdict']} {r['reasons']}")
    if isinstance(m.get("routing"), dict):
        print(f"  first divergence {m.get('first_divergence')}; isolated {m.get('isolated_first_divergence')}; "
              f"max ratio to floor {m.get('max_ratio_to_floor'):.3g}; planted {m.get('planted_localised')}/"
              f"{m.get('planted_total')}; routing agreement min {m['routing']['agreement_min']:.4f}, flips "
              f"{m['routing']['flips']} ({m['routing']['clear_margin_flips']} at a clear margin); plan "
              f"{m.get('placement', {}).get('placement')}; peaks GiB {m.get('device_peak_gib')}; seconds "
              f"{m.get('placement_seconds')}")
    if "step_limits" in m:
        print(f"  token mismatches {m['token_mismatches']} ({m['unexplained_token_mismatches']} not at a near-tie); "
              f"step logits max rel_l2 {m['step_logits_max_rel_l2']:.3g}, worst mean KL "
              f"{m['step_logits_worst_mean_kl']:.3g}; limits {m['step_limits']}; judged {m['judged_steps']} of "
              f"{m['compared_steps']} steps; routing near-tie steps {m.get('routing_near_tie_steps')}")
PYEOF
step "done"
