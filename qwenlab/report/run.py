"""`qwenlab report`: run every numbered notebook headlessly (papermill) into one run folder.

    reports/<UTC timestamp>_<model name>/   NN_name.ipynb, NN_name.html, metrics/, figures/, metrics.json, index.html
    reports/latest -> the newest complete run

Exit 0 when every notebook passes, 1 when one regressed or errored (after all of them ran), 2 for a usage
error found before anything ran (bad model dir, unknown parameter, unknown notebook).
"""
import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from qwenlab.atomic import write_json_atomic, write_text_atomic
from qwenlab.errors import QwenlabError
from qwenlab.model.config import read_config
from qwenlab.model.loader import resolve_device
from qwenlab.model.nvfp4_load import parse_quant
from qwenlab.model.tiny import resolve_model_dir
from qwenlab.paths import NOTEBOOKS_DIR, REPO_ROOT, REPORTS_DIR
from qwenlab.report.candidate import check_candidate
from qwenlab.report.interrupt import stoppable, watch
from qwenlab.report.kernel import ensure_kernel, execute, kernel_environment
from qwenlab.report.pages import html_exporter, notebook_html, render_index
from qwenlab.report.params import (
    STANDARD_PARAMS,
    declared_parameters,
    discover,
    parse_param_args,
    plan_parameters,
    seeds,
    select,
)
from qwenlab.report.rundir import make_run_dir, update_latest
from qwenlab.versions import package_versions

VERSION_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "papermill", "nbconvert", "qwenlab")
SCHEMA_VERSION = 1


# ---------------------------------------------------------------- run header

def git_commit(repo=REPO_ROOT) -> tuple[str, bool | None]:
    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown", None
        status = git("status", "--porcelain", "--untracked-files=no")
        return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def versions() -> dict:
    return package_versions(VERSION_PACKAGES, missing="not installed")


def resolve_model(model) -> tuple[Path, str]:
    """Absolute model dir and its config hash, or QwenlabError before anything is written."""
    model = resolve_model_dir(model)
    path = model.expanduser().resolve()
    if not path.is_dir():
        raise QwenlabError(f"{model}: not a directory (--model expects a Qwen3 checkpoint directory)")
    return path, read_config(path).config_hash()


# ---------------------------------------------------------------- notebook results

def read_notebook_metrics(run_dir: Path, stem: str) -> dict | None:
    path = run_dir / "metrics" / f"{stem}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def notebook_entry(run_dir: Path, stem: str, params: dict, error: dict | None, seconds: float) -> dict:
    record = read_notebook_metrics(run_dir, stem)
    entry = {"verdict": "error", "reasons": [], "metrics": {}, "error": error, "duration_s": round(seconds, 2),
             "parameters": {k: v for k, v in params.items() if k not in STANDARD_PARAMS},
             "ipynb": f"{stem}.ipynb" if (run_dir / f"{stem}.ipynb").is_file() else None, "html": None,
             "figures": sorted(p.relative_to(run_dir).as_posix()
                               for p in (run_dir / "figures").glob(f"{stem}_*.png"))}
    if record is not None:
        entry["reasons"] = list(record.get("reasons") or [])
        entry["metrics"] = record.get("metrics") or {}
    if error is None:
        if record is None:
            entry["error"] = {"ename": "MissingMetrics", "evalue": f"the notebook ran but wrote no metrics/{stem}.json",
                              "cell_index": None, "exec_count": None}
        elif record.get("verdict") not in ("pass", "regressed"):
            entry["error"] = {"ename": "BadVerdict", "evalue": f"verdict {record.get('verdict')!r}",
                              "cell_index": None, "exec_count": None}
        else:
            entry["verdict"] = record["verdict"]
    return entry


def overall_verdict(entries: dict) -> str:
    verdicts = {e["verdict"] for e in entries.values()}
    return "error" if "error" in verdicts else "regressed" if "regressed" in verdicts else "pass"


# ---------------------------------------------------------------- the command

def command_line(args) -> str:
    """The request as a command line (with paths resolved), for the run header."""
    import shlex

    parts = ["qwenlab", "report"]
    for flag, value in (("--model", args.model), ("--device", args.device), ("--dtype", args.dtype),
                        ("--quant", args.quant), ("--device-map", args.device_map), ("--out", args.out),
                        ("--only", args.only),
                        ("--thresholds-dir", args.thresholds_dir),
                        ("--candidate", args.candidate), ("--notebooks-dir", args.notebooks_dir),
                        ("--timeout", args.timeout)):
        if value is not None:
            parts += [flag, str(value)]
    for pair in args.param:
        parts += ["-p", pair]
    return shlex.join(parts)


def existing(path, flag: str, check) -> str | None:
    """An optional path argument made absolute (the kernels run in the repo root, not in the caller's folder)."""
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    if not check(resolved):
        raise QwenlabError(f"{flag} {path}: no such {'folder' if check is Path.is_dir else 'file'}")
    return str(resolved)


def progress(text: str, end: str = "\n"):
    print(text, end=end, file=sys.stderr, flush=True)


def run_report(args) -> int:
    started = time.time()
    now = datetime.now(timezone.utc)
    # Everything that can be wrong with the request is found before a folder is made or a kernel started.
    model_dir, config_hash = resolve_model(args.model)

    device = str(resolve_device(args.device))
    quant = parse_quant(args.quant) or ""
    all_notebooks = discover(args.notebooks_dir or NOTEBOOKS_DIR)
    notebooks = select(all_notebooks, args.only)
    thresholds_dir = existing(args.thresholds_dir, "--thresholds-dir", Path.is_dir) or ""
    candidate = existing(args.candidate, "--candidate", Path.is_file)
    global_params, scoped = parse_param_args(args.param)
    declared = {nb.stem: declared_parameters(nb) for nb in notebooks}
    out = Path(args.out).expanduser().resolve() if args.out else REPORTS_DIR
    standard = {"model_dir": str(model_dir), "device": device, "dtype": args.dtype, "out_dir": None,
                "thresholds_dir": thresholds_dir, "quant": quant, "device_map": args.device_map or ""}
    plan = plan_parameters(notebooks, declared, standard, candidate, global_params, scoped, all_notebooks)
    check_candidate(candidate)
    ensure_kernel()

    run_dir = make_run_dir(out, model_dir.name, now)
    for params in plan.values():
        params["out_dir"] = str(run_dir)
    commit, dirty = git_commit()
    header = {"run": run_dir.name, "run_dir": str(run_dir), "started_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
              "finished_utc": None, "duration_s": None, "status": "running", "git_commit": commit, "git_dirty": dirty,
              "versions": versions(), "device": device, "dtype": args.dtype, "quant": quant or None,
              "device_map": args.device_map,
              "model_path": str(model_dir),
              "model_name": model_dir.name, "config_hash": config_hash, "thresholds_dir": thresholds_dir or None,
              "candidate": candidate, "parameters": {"global": global_params, "scoped": scoped},
              "seeds": seeds(declared, plan), "notebooks_dir": str(Path(args.notebooks_dir or NOTEBOOKS_DIR).resolve()),
              "command": command_line(args)}
    record = {"schema": SCHEMA_VERSION, "header": header, "verdict": None, "counts": {}, "notebooks": {}}
    write_json_atomic(run_dir / "metrics.json", record)
    watch(record, run_dir, [nb.stem for nb in notebooks], started)  # Ctrl-C / SIGTERM from here marks this run

    exporter = html_exporter()
    total = len(notebooks)
    with kernel_environment():
        for i, nb in enumerate(notebooks, 1):
            progress(f"[{i}/{total}] {nb.stem} ... ", end="")
            t0 = time.perf_counter()
            output = run_dir / nb.name
            error = execute(nb, output, plan[nb.stem], args.timeout, run_dir / "logs" / f"{nb.stem}.log")
            seconds = time.perf_counter() - t0
            entry = notebook_entry(run_dir, nb.stem, plan[nb.stem], error, seconds)
            if output.is_file():
                try:
                    write_text_atomic(run_dir / f"{nb.stem}.html", notebook_html(exporter, output))
                    entry["html"] = f"{nb.stem}.html"
                except Exception as e:  # a notebook nbconvert cannot render is still reported, as an error
                    entry["verdict"] = "error"
                    entry["error"] = entry["error"] or {"ename": "HTMLExportError", "evalue": str(e), "cell_index": None,
                                                        "exec_count": None}
            record["notebooks"][nb.stem] = entry
            write_json_atomic(run_dir / "metrics.json", record)
            progress(f"{entry['verdict']} ({seconds:.1f} s)")
            if entry["error"]:
                progress(f"      {entry['error']['ename']}: {entry['error']['evalue']}")
            for reason in entry["reasons"] if entry["verdict"] == "regressed" else ():
                progress(f"      - {reason}")

    verdict = overall_verdict(record["notebooks"])
    counts = {v: sum(e["verdict"] == v for e in record["notebooks"].values()) for v in ("pass", "regressed", "error")}
    header.update(status="complete", finished_utc=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  duration_s=round(time.time() - started, 2))
    record.update(verdict=verdict, counts=counts)
    # metrics.json says "complete" only once index.html is there too; then (and only then) latest moves.
    write_text_atomic(run_dir / "index.html", render_index(record, run_dir))
    write_json_atomic(run_dir / "metrics.json", record)
    update_latest(out, run_dir)
    print(f"{run_dir} {verdict.upper()} ({counts['pass']} pass, {counts['regressed']} regressed, "
          f"{counts['error']} error)")
    return 0 if verdict == "pass" else 1


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--model", type=Path, default=None,
                   help="Qwen3 checkpoint directory in HF layout (default: the embedded tiny fixture)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="default float32")
    p.add_argument("--quant", default=None, help="nvfp4 | nvfp4-w4a4: every notebook loads the model quantized "
                                                 "(notebooks 02-04 and 07 against the quantized reference, "
                                                 "doc/nvfp4.md); default: as the checkpoint is")
    p.add_argument("--device-map", default=None,
                   help="qwenlab's layers split across devices in every notebook that loads the model: balanced | "
                        "0:0-31,1:32-63 (doc/placement.md); notebook 03 also plans where its reference goes")
    p.add_argument("--out", type=Path, default=None, help="reports folder (default: <repo>/reports)")
    p.add_argument("--only", default=None, help="comma-separated notebooks to run: 01,03 or 03_layer_diffs")
    p.add_argument("--thresholds-dir", default=None, help="folder of <notebook>.json thresholds "
                                                          "(default: data/thresholds)")
    p.add_argument("--candidate", default=None,
                   help="activation dump (.safetensors) for the notebooks that declare a `candidate` parameter")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="notebook parameter (VALUE as JSON if it parses, else a string); NN_name.NAME=VALUE "
                        "for one notebook only; repeatable")
    p.add_argument("--notebooks-dir", default=None, help="where the numbered notebooks are (default: notebooks/)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one cell may run (default 600)")


def register(subparsers):
    p = subparsers.add_parser("report", help="run every numbered notebook (papermill) into reports/<run>/",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=stoppable(run_report))

