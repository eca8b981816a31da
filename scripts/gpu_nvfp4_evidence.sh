#!/usr/bin/env bash
# GPU evidence for issue 9 (NVFP4): a Qwen3-4B-shaped random bf16 checkpoint quantized with `qwenlab quantize`
# (compressed-tensors, then converted to ModelOpt); bytes on disk, weight bytes after load, CUDA allocated and peak
# memory, greedy decode tok/s for bf16 vs NVFP4 (the dequantize path: the H100 has no FP4 tensor cores; the log
# says which path ran), and notebook 06 on CUDA. Run from anywhere; qwenlab runs from this checkout (PYTHONPATH).
#
#   OUT=/some/dir scripts/gpu_nvfp4_evidence.sh        # on the lent H100: $OUT is set for you
#   PRESET=tiny-untied DEVICE=cpu DTYPE=float32 scripts/gpu_nvfp4_evidence.sh   # the same steps, small, on a CPU
#
# Writes to $OUT (default reports/nvfp4-h100), four files (the device tool returns at most 8):
#   gpu_nvfp4_evidence.log        everything printed, device, versions and the packages found first
#   nvfp4_bench.json              bench/nvfp4_bench.py: one row per load (bf16, quant=nvfp4, both NVFP4 layouts)
#   06_nvfp4_quantization.json    notebook 06's metrics and verdict
#   nvfp4_evidence.tar.gz         figures/, metrics/, the executed notebook, the quantized checkpoints' configs
# Without compressed-tensors notebook 06 runs against the unquantized reference only, and says so (wheels carried in
# ./.whl are installed into a temp folder first: compressed_tensors 0.20.0, loguru, pydantic, pydantic_core,
# annotated_types, typing_inspection); without papermill it runs notebooks/06_nvfp4_quantization.py as a script.
# Knobs: PRESET (qwen3-4b), CKPT (/tmp/q4b for qwen3-4b), DEVICE (cuda), DTYPE (bfloat16), DECODE_TOKENS (64),
# BUDGET_S (500: steps that would not fit are skipped or cut, so one 600 s device call finishes), RUN_VARIANTS
# (auto: notebook 06's high-precision variants when enough of the budget is left; 1 / 0), QWENLAB_TOKENIZER_DIR.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-$REPO/reports/nvfp4-h100}
PRESET=${PRESET:-qwen3-4b}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
CKPT=${CKPT:-/tmp/q4b}
[ "$PRESET" = qwen3-4b ] || CKPT=${CKPT%/q4b}/qwenlab-$PRESET
DECODE_TOKENS=${DECODE_TOKENS:-64}
BUDGET_S=${BUDGET_S:-500}
RUN_VARIANTS=${RUN_VARIANTS:-auto}
mkdir -p "$OUT" "$WORK/report"
export MPLBACKEND=Agg
exec > >(tee "$OUT/gpu_nvfp4_evidence.log") 2>&1

bundle() {
  cp -f "$WORK"/report/metrics/06_nvfp4_quantization.json "$OUT/" 2>/dev/null
  for fmt in compressed-tensors modelopt; do
    mkdir -p "$WORK/report/checkpoints/$fmt"
    cp -f "$WORK/$fmt"/*.json "$WORK/report/checkpoints/$fmt/" 2>/dev/null
  done
  tar czf "$OUT/nvfp4_evidence.tar.gz" -C "$WORK/report" . 2>/dev/null
  echo "== outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
  rm -rf "$WORK/compressed-tensors" "$WORK/modelopt"
}
trap bundle EXIT
trap 'exit 143' TERM INT
has() { $PY -c "import $1" >/dev/null 2>&1; }  # importable, not merely present

print_env
$PY - "$DEVICE" <<'EOF'
import platform, sys
import torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| python", platform.python_version())
if sys.argv[1].startswith("cuda"):
    print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA",
          "| capability", torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None)
for pkg in ("transformers", "safetensors", "tokenizers", "compressed_tensors", "torchao", "papermill"):
    try:
        print(f"{pkg} {__import__(pkg).__version__}")
    except ImportError:
        print(f"{pkg}: not installed")
from qwenlab.quant import fp4_gemm
print("native FP4 GEMM (torch._scaled_mm on float4_e2m1fn_x2, sm_100+):", fp4_gemm.available(sys.argv[1]))
EOF
tokenizer_shim || exit 2
echo "command: $0  (PRESET=$PRESET CKPT=$CKPT DEVICE=$DEVICE DTYPE=$DTYPE DECODE_TOKENS=$DECODE_TOKENS BUDGET_S=$BUDGET_S)"

# Optional: wheels carried in ./.whl (git-ignored) make the quantized reference possible on a machine without
# compressed-tensors: installed into a private folder, never into the machine's python.
has compressed_tensors || install_wheels

make_checkpoint "$CKPT" "$PRESET" "$DEVICE" || exit 1
du -sb "$CKPT"/*.safetensors | awk '{s += $1} END {printf "bf16 checkpoint: %.1f MiB of safetensors\n", s / 2^20}'

step "qwenlab quantize -> compressed-tensors (calibrated input scales)"
$PY -m qwenlab quantize "$CKPT" "$WORK/compressed-tensors" --device "$DEVICE" --dtype "$DTYPE" || { echo "quantize failed"; exit 1; }
step "qwenlab quantize compressed-tensors -> ModelOpt (the same numbers, the other layout)"
$PY -m qwenlab quantize "$WORK/compressed-tensors" "$WORK/modelopt" --format modelopt --device "$DEVICE" \
  || echo "ModelOpt conversion FAILED (exit $?)"
for d in "$CKPT" "$WORK/compressed-tensors" "$WORK/modelopt"; do
  [ -d "$d" ] && du -sb "$d"/*.safetensors | awk -v d="$d" '{s += $1} END {printf "%-60s %10.1f MiB on disk\n", d, s / 2^20}'
done

step "bench: bytes after load, CUDA allocated and peak, greedy decode of $DECODE_TOKENS tokens"
RUNS=(--run "bf16=$CKPT" --run "nvfp4-at-load=$CKPT:nvfp4" --run "compressed-tensors=$WORK/compressed-tensors")
[ -d "$WORK/modelopt" ] && RUNS+=(--run "modelopt=$WORK/modelopt")
$PY bench/nvfp4_bench.py --device "$DEVICE" --dtype "$DTYPE" --new-tokens "$DECODE_TOKENS" "${RUNS[@]}" \
  --json "$OUT/nvfp4_bench.json" || echo "bench FAILED (exit $?)"

step "notebook 06 on $DEVICE $DTYPE"
REFERENCE=both
if ! has compressed_tensors; then
  REFERENCE=unquantized
  echo "compressed-tensors is not installed: the quantized reference (transformers on the same NVFP4 numbers) is"
  echo "SKIPPED; notebook 06 runs against the unquantized reference only (pip install compressed-tensors==0.20.0)"
fi
LEFT=$((BUDGET_S - (SECONDS - START)))
VARIANTS=$RUN_VARIANTS
if [ "$VARIANTS" = auto ]; then VARIANTS=$([ "$LEFT" -gt 300 ] && echo 1 || echo 0); fi
[ "$VARIANTS" = 1 ] || echo "high-precision variants skipped ($LEFT s of the budget left; RUN_VARIANTS=1 forces them)"
echo "notebook limit: $((LEFT > 60 ? LEFT : 60)) s"
NB_PARAMS=(model_dir "$CKPT" device "$DEVICE" dtype "$DTYPE" out_dir "$WORK/report" quant_reference "$REFERENCE"
           run_variants "$([ "$VARIANTS" = 1 ] && echo True || echo False)")
args=(); for ((i = 0; i < ${#NB_PARAMS[@]}; i += 2)); do args+=("${NB_PARAMS[i]}=${NB_PARAMS[i+1]}"); done
timeout "$((LEFT > 60 ? LEFT : 60))" $PY scripts/run_notebook.py notebooks/06_nvfp4_quantization.ipynb \
  "$WORK/report/06_nvfp4_quantization.ipynb" "${args[@]}" || echo "notebook 06 FAILED or cut (exit $?)"
$PY - "$WORK/report/metrics/06_nvfp4_quantization.json" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("notebook 06 wrote no metrics")
m = r["metrics"]
print(f"VERDICT 06_nvfp4_quantization: {r['verdict'].upper()} {r['reasons']}")
print(m.get("summary"))
for key in ("weights", "quantized_reference", "unquantized_reference", "corpus", "planted_min_times_honest", "memory"):
    if key in m:
        value = {k: v for k, v in m[key].items() if k != "logits"} if isinstance(m[key], dict) else m[key]
        print(f"{key}: {json.dumps(value)[:600]}")
EOF
step "done"
