#!/usr/bin/env bash
# GPU evidence for the trained checkpoint: `qwenlab tiny --preset trained-24l` trained on CUDA for a time or step
# budget (qwenlab.model.training), its loss curve summary and realism numbers (held-out next-token entropy, greedy
# top-2 margins), then qwenlab against HF transformers on it (bf16 capture + diff), so the diff's logit statistics
# meet real near-ties.
#
#   OUT=/some/dir scripts/gpu_train_evidence.sh        # on the lent H200 ($OUT is set there); carry .tok
#
# Writes $OUT/gpu_train_evidence.log, $OUT/training.json and $OUT/diff.json. Knobs: CKPT (a new folder; default: in a
# temp dir), TRAIN_SECONDS (100; the steps that fit are fixed after 8 timed steps), TRAIN_STEPS (instead of
# TRAIN_SECONDS), SEED (0), REPEAT=1 (train again with the same step count, compare weights and loss curves),
# SKIP_DIFF=1.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-$REPO/reports/train-gpu}
CKPT=${CKPT:-$WORK/trained-24l}
SEED=${SEED:-0}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_train_evidence.log") 2>&1
print_env
tokenizer_shim || exit 2
echo "command: $0 (CKPT=$CKPT TRAIN_SECONDS=${TRAIN_SECONDS:-} TRAIN_STEPS=${TRAIN_STEPS:-} SEED=$SEED)"
$PY -c "import sysconfig; print('training text: .py files under', sysconfig.get_paths()['stdlib'])"

if [ -n "${TRAIN_STEPS:-}" ]; then budget=(--train-steps "$TRAIN_STEPS"); else budget=(--train-seconds "${TRAIN_SECONDS:-100}"); fi
step "qwenlab tiny $CKPT --preset trained-24l ${budget[*]} --seed $SEED --device cuda"
$PY -m qwenlab tiny "$CKPT" --preset trained-24l "${budget[@]}" --seed "$SEED" --device cuda
echo "train exit code: $? (0: realistic, 1: written but under the realism bar)"
[ -f "$CKPT/training.json" ] || { echo "no checkpoint written"; exit 1; }
cp "$CKPT/training.json" "$OUT/training.json"
du -sh "$CKPT"

step "the record (training.json)"
$PY - "$CKPT/training.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
m = r["realism"]
print(f"steps {r['steps']}, tokens seen {r['tokens_seen']:,}, {r['seconds']:.1f} s training, {r['wall_seconds']:.1f} s "
      f"in all, {r['device']}; corpus {r['corpus']['train_tokens']:,} train / {r['corpus']['heldout_tokens']:,} "
      f"held-out tokens (python {r['corpus']['python']})")
c = r["loss_curve"]
print("loss every 10%:", " ".join(f"{c[min(len(c) - 1, i * len(c) // 10)]:.2f}" for i in range(11)))
print(f"final train loss {r['final_train_loss']:.3f}, held-out loss {r['heldout_loss']:.3f}")
print(f"median entropy {m['median_entropy']:.2f} nats (mean {m['mean_entropy']:.2f}); near ties "
      f"{m['near_tie_steps']}/{m['greedy_steps']} = {m['near_tie_fraction']:.1%}, min margin {m['min_margin']:.4f}, "
      f"median margin {m['median_margin']:.2f}; realistic: {m['realistic']} {m['reasons']}")
print("reproduce:", r["reproduce"])
PYEOF

if [ "${REPEAT:-0}" = 1 ]; then
  steps_done=$($PY -c "import json; print(json.load(open('$CKPT/training.json'))['steps'])")
  step "determinism: the same $steps_done steps again"
  $PY -m qwenlab tiny "$WORK/again" --preset trained-24l --train-steps "$steps_done" --seed "$SEED" --device cuda | tail -2
  $PY - "$CKPT" "$WORK/again" <<'PYEOF'
import json, sys
from pathlib import Path
a, b = (Path(p) for p in sys.argv[1:])
same = (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
curves = [json.loads((p / "training.json").read_text())["loss_curve"] for p in (a, b)]
first = next((i for i, (x, y) in enumerate(zip(*curves)) if x != y), None)
print(f"weights identical: {same}; loss curves identical: {curves[0] == curves[1]}"
      + ("" if first is None else f" (first differ at step {first + 1})"))
PYEOF
  rm -rf "$WORK/again"
fi

if [ "${SKIP_DIFF:-0}" != 1 ]; then
  PROMPT="Return the list of names in the directory, sorted."
  step "qwenlab vs transformers on the trained checkpoint (bf16, cuda): capture both, diff"
  $PY -m qwenlab capture --model "$CKPT" --device cuda --dtype bfloat16 --prompt "$PROMPT" --chat --impl qwenlab \
    --out "$WORK/cand.safetensors" && \
  $PY -m qwenlab capture --model "$CKPT" --device cuda --dtype bfloat16 --prompt "$PROMPT" --chat --impl reference \
    --out "$WORK/ref.safetensors" && \
  $PY -m qwenlab diff "$WORK/cand.safetensors" "$WORK/ref.safetensors" --json > "$OUT/diff.json"
  echo "diff exit code: $?"
  $PY -c "import json; d = json.load(open('$OUT/diff.json')); print('verdict', d['verdict'], '| logits',
{k: v for k, v in d['logits'].items() if not k.endswith('per_position')})"
fi
step "done"
