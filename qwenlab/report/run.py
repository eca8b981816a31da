"""`qwenlab report`: run every numbered notebook headlessly (papermill) into one run folder.

    reports/<UTC timestamp>_<model name>/   NN_name.ipynb, NN_name.html, metrics/, figures/, metrics.json, index.html
    reports/latest -> the newest complete run of every notebook (by start time)

Exit 0 when every notebook passes, 1 when one regressed or errored (after all of them ran), 2 for a usage
error found before anything ran (bad model dir, unknown parameter, unknown notebook, a kernel that cannot start).
`--status` lists the runs in the reports folder instead.
"""
import argparse
import json
import queue
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from qwenlab.arguments import SECONDS
from qwenlab.atomic import write_text_atomic
from qwenlab.errors import QwenlabError
from qwenlab.model.config import read_config
from qwenlab.model.dtypes import dtype_name, resolve_dtype
from qwenlab.model.loader import resolve_device
from qwenlab.model.nvfp4_load import parse_quant
from qwenlab.model.spec import add_load_arguments
from qwenlab.model.tiny import resolve_model_dir
from qwenlab.paths import NOTEBOOKS_DIR, REPO_ROOT, REPORTS_DIR
from qwenlab.report.candidate import check_candidate
from qwenlab.report.checkpoint import check_checkpoint
from qwenlab.report.interrupt import counts, put_entry, stoppable, watch
from qwenlab.report.kernel import (
    NextKernel,
    ensure_kernel,
    environment_mismatch,
    execute,
    kernel_environment,
    quiet_abandoned_tasks,
    stop_kernels,
    thread_limits,
)
from qwenlab.report.liveness import RunFile, process_identity, utc_text
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
from qwenlab.report.rundir import check_out, make_run_dir, update_latest
from qwenlab.report.schedule import order, previous_durations, resolve_jobs, runs_alone
from qwenlab.report.status import mark_dead_runs, print_status
from qwenlab.versions import environment, package_versions

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


def resolve_model(model, quant: str | None) -> tuple[Path, str]:
    """Absolute model dir and its config hash, or QwenlabError before anything is written."""
    model = resolve_model_dir(model)
    path = model.expanduser().resolve()
    if not path.is_dir():
        raise QwenlabError(f"{model}: not a directory (--model expects a Qwen3 checkpoint directory)")
    return path, check_checkpoint(path, quant)


# ---------------------------------------------------------------- notebook results

def read_notebook_metrics(run_dir: Path, stem: str) -> dict | None:
    path = run_dir / "metrics" / f"{stem}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def notebook_entry(run_dir: Path, stem: str, params: dict, error: dict | None, seconds: float, own: dict) -> dict:
    """The notebook's entry in metrics.json: its verdict, unless it errored, wrote no metrics, or ran in another
    environment than the report's own (own = qwenlab.versions.environment() of this process)."""
    record = read_notebook_metrics(run_dir, stem)
    entry = {"verdict": "error", "reasons": [], "metrics": {}, "error": error, "duration_s": round(seconds, 2),
             "parameters": {k: v for k, v in params.items() if k not in STANDARD_PARAMS},
             "ipynb": f"{stem}.ipynb" if (run_dir / f"{stem}.ipynb").is_file() else None, "html": None,
             "figures": sorted(p.relative_to(run_dir).as_posix()
                               for p in (run_dir / "figures").glob(f"{stem}_*.png"))}
    if record is not None:
        entry["reasons"] = list(record.get("reasons") or [])
        entry["metrics"] = record.get("metrics") or {}
        entry["environment"] = record.get("environment")
    if error is None:
        mismatch = environment_mismatch(record.get("environment"), own) if record is not None else None
        if record is None:
            entry["error"] = {"ename": "MissingMetrics", "evalue": f"the notebook ran but wrote no metrics/{stem}.json",
                              "cell_index": None, "exec_count": None}
        elif record.get("verdict") not in ("pass", "regressed"):
            entry["error"] = {"ename": "BadVerdict", "evalue": f"verdict {record.get('verdict')!r}",
                              "cell_index": None, "exec_count": None}
        elif mismatch is not None:
            entry["error"] = {"ename": "EnvironmentMismatch", "evalue": mismatch, "cell_index": None,
                              "exec_count": None}
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
                        ("--timeout", args.timeout), ("--jobs", None if args.jobs == "auto" else args.jobs)):
        if value is not None:
            parts += [flag, str(value)]
    if args.force:
        parts.append("--force")
    if args.no_kernel_ahead:
        parts.append("--no-kernel-ahead")
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
    out = Path(args.out).expanduser().resolve() if args.out else REPORTS_DIR
    if args.status:
        return print_status(out)
    started = time.time()
    now = datetime.fromtimestamp(started, timezone.utc)
    # Everything that can be wrong with the request is found before a folder is made or a kernel started.
    device = str(resolve_device(args.device))
    quant = parse_quant(args.quant) or ""
    model_dir, config_hash = resolve_model(args.model, quant)
    check_out(out, model_dir, args.force)
    all_notebooks = discover(args.notebooks_dir or NOTEBOOKS_DIR)
    notebooks = select(all_notebooks, args.only)
    thresholds_dir = existing(args.thresholds_dir, "--thresholds-dir", Path.is_dir) or ""
    candidate = existing(args.candidate, "--candidate", Path.is_file)
    global_params, scoped = parse_param_args(args.param)
    declared = {nb.stem: declared_parameters(nb) for nb in notebooks}
    dtype = dtype_name(resolve_dtype(args.dtype, torch.device(device), read_config(model_dir)))  # `auto`, resolved
    standard = {"model_dir": str(model_dir), "device": device, "dtype": dtype, "out_dir": None,
                "thresholds_dir": thresholds_dir, "quant": quant, "device_map": args.device_map or ""}
    plan = plan_parameters(notebooks, declared, standard, candidate, global_params, scoped, all_notebooks)
    check_candidate(candidate)
    kernel = ensure_kernel()
    jobs, jobs_reason = resolve_jobs(args.jobs, device, model_dir, args.device_map)
    alone = {nb.stem: reason for nb in notebooks if (reason := runs_alone(nb))}
    starts = order(notebooks, alone, jobs, previous_durations(out, model_dir))

    run_dir = make_run_dir(out, model_dir.name, now)
    for name, reason in mark_dead_runs(out, run_dir.name):
        progress(f"marked {name} dead: {reason}")
    for params in plan.values():
        params["out_dir"] = str(run_dir)
    stems = [nb.stem for nb in notebooks]
    subset = stems != [nb.stem for nb in all_notebooks]
    commit, dirty = git_commit()
    own = environment()
    header = {"run": run_dir.name, "run_dir": str(run_dir), "started_utc": utc_text(started), "started_at": started,
              "finished_utc": None, "duration_s": None, "status": "running", **process_identity(),
              "heartbeat_utc": None, "notebooks": stems, "subset": subset,
              "git_commit": commit, "git_dirty": dirty, "versions": versions(), "environment": own, "kernel": kernel,
              "device": device, "dtype": dtype, "quant": quant or None,
              "device_map": args.device_map, "kernels_ahead": not args.no_kernel_ahead,
              "jobs": jobs, "jobs_reason": jobs_reason, "runs_alone": alone, "start_order": [nb.stem for nb in starts],
              "kernel_threads": thread_limits(jobs),
              "model_path": str(model_dir),
              "model_name": model_dir.name, "config_hash": config_hash, "thresholds_dir": thresholds_dir or None,
              "candidate": candidate, "parameters": {"global": global_params, "scoped": scoped},
              "seeds": seeds(declared, plan), "notebooks_dir": str(Path(args.notebooks_dir or NOTEBOOKS_DIR).resolve()),
              "command": command_line(args)}
    record = {"schema": SCHEMA_VERSION, "header": header, "verdict": None, "counts": {}, "notebooks": {}}
    run_file = RunFile(run_dir, record)
    run_file.save()
    watch(run_file, stems, started)  # Ctrl-C / SIGTERM from here marks this run
    run_file.start_heartbeat()
    if jobs > 1:
        progress(f"{jobs} notebooks at a time ({jobs_reason})" + "".join(
            f"; {stem} alone: {reason}" for stem, reason in alone.items()))
    try:
        run_notebooks(run_file, notebooks, plan, args.timeout, own, jobs=jobs, alone=alone,
                      kernels_ahead=not args.no_kernel_ahead, order=starts)
        verdict = finish_run(run_file, started)
    except Exception as e:  # the report itself crashed: the run says so instead of "running" forever
        mark_crashed(run_file, e)
        raise
    finally:
        run_file.stop_heartbeat()

    kept = None if subset else update_latest(out, run_dir, started)
    if subset:
        progress(f"{out / 'latest'} not moved: this run has {len(stems)} of the {len(all_notebooks)} notebooks")
    elif kept is not None:
        progress(f"{out / 'latest'} not moved: it points at {kept}, which started later")
    c = record["counts"]
    print(f"{run_dir} {verdict.upper()} ({c['pass']} pass, {c['regressed']} regressed, {c['error']} error)")
    return 0 if verdict == "pass" else 1


class NotebookRun(threading.Thread):
    """One notebook of the run in a thread of its own (papermill's asyncio loop is per thread): its kernel starts
    when the thread does (WARM_UP sent when it starts ahead of its turn), the notebook runs once the scheduler
    sets `go`. A report that is stopping sets `go` too: the kernel is then stopped unused."""

    def __init__(self, run: "Run", number: int, notebook: Path, ahead: bool):
        super().__init__(name=f"report-{notebook.stem}", daemon=True)
        self.owner, self.number, self.notebook, self.ahead = run, number, notebook, ahead
        self.go = threading.Event()

    def run(self):
        run = self.owner
        try:
            kernel = NextKernel()
            kernel.start(run.run_file.run_dir / "logs" / f"{self.notebook.stem}.kernel.log", warm_up=self.ahead,
                         env=run.kernel_env)
            self.go.wait()
            if run.stopping.is_set():
                kernel.discard()
            else:
                error = kernel.error
                run.notebook(self.number, self.notebook, kernel.take(), error)
        except BaseException as e:  # not the notebook's failure (execute reports those): the report's own
            run.crashed = run.crashed or e
        finally:
            run.finished.put(self)


class Run:
    """The notebooks of one report, `jobs` at a time: those whose metadata says they run alone with nothing beside
    them (report/schedule.py), the next ones' kernels started ahead (kernels_ahead: the next `jobs` in order)."""

    def __init__(self, run_file: RunFile, notebooks: list[Path], plan: dict, timeout: float, own: dict,
                 jobs: int = 1, alone: dict | None = None, kernels_ahead: bool = True, order: list[Path] | None = None):
        self.run_file, self.plan, self.timeout, self.own = run_file, plan, timeout, own
        self.jobs, self.alone, self.kernels_ahead = jobs, alone or {}, kernels_ahead
        self.kernel_env = thread_limits(jobs)
        self.numbers = {nb.stem: i for i, nb in enumerate(notebooks, 1)}  # progress lines count in notebook order
        self.total = len(notebooks)
        self.pending = list(order or notebooks)
        self.exporter, self.export_lock = html_exporter(), threading.Lock()
        self.stopping = threading.Event()
        self.finished: queue.Queue = queue.Queue()
        self.crashed: BaseException | None = None

    def may_start(self, nb: Path, running: set) -> bool:
        if nb.stem in self.alone:
            return not running
        return len(running) < self.jobs and not any(t.notebook.stem in self.alone for t in running)

    def run(self):
        started: dict[str, NotebookRun] = {}  # threads made, by notebook (those started ahead wait for `go`)
        running: set = set()
        with kernel_environment(quiet=self.stopping):
            try:
                while self.pending or running:
                    while self.pending and self.may_start(self.pending[0], running):
                        nb = self.pending.pop(0)
                        thread = started.get(nb.stem) or self.start(nb, ahead=False, into=started)
                        running.add(thread)
                        thread.go.set()
                    for nb in self.pending[:self.jobs] if self.kernels_ahead else ():
                        if nb.stem not in started:
                            self.start(nb, ahead=True, into=started)
                    thread = self.finished.get()  # a signal raises ReportInterrupted here
                    thread.join()
                    running.discard(thread)
                    if self.crashed is not None:
                        raise self.crashed
            except BaseException:
                self.stop(started.values())
                raise

    def start(self, nb: Path, ahead: bool, into: dict) -> NotebookRun:
        thread = into[nb.stem] = NotebookRun(self, self.numbers[nb.stem], nb, ahead)
        thread.start()
        return thread

    def stop(self, threads, wait: float = 30.0):
        """An interrupt or a crash: no entry is written from here on, every kernel is killed (a running notebook's
        papermill then ends on its dead kernel), the threads are given `wait` seconds to end."""
        self.stopping.set()
        stop_kernels()
        deadline = time.monotonic() + wait
        for thread in threads:
            thread.go.set()
            thread.join(max(0.0, deadline - time.monotonic()))
        stop_kernels()  # one a thread was starting while the first pass ran

    def notebook(self, i: int, nb: Path, km, start_error: dict | None = None):
        """Notebook i (1-based, in notebook order) on the kernel km, its entry written into metrics.json; km None:
        its kernel did not start (start_error says why) and the notebook is an error without running."""
        run_file, plan = self.run_file, self.plan
        run_dir, record = run_file.run_dir, run_file.record
        run_file.save()  # a heartbeat at each notebook boundary
        if self.jobs == 1:
            progress(f"[{i}/{self.total}] {nb.stem} ... ", end="")
        t0 = time.perf_counter()
        output = run_dir / nb.name
        log = run_dir / "logs" / f"{nb.stem}.log"
        if km is None:
            log.touch()
            error = start_error or {"ename": "KernelStartError", "evalue": "no kernel was started for it",
                                    "cell_index": None, "exec_count": None}
        else:
            error = execute(nb, output, plan[nb.stem], self.timeout, log, km)
        seconds = time.perf_counter() - t0
        if self.stopping.is_set():
            quiet_abandoned_tasks(log)
            return
        entry = notebook_entry(run_dir, nb.stem, plan[nb.stem], error, seconds, self.own)
        if output.is_file():
            try:
                with self.export_lock:
                    html = notebook_html(self.exporter, output)
                write_text_atomic(run_dir / f"{nb.stem}.html", html)
                entry["html"] = f"{nb.stem}.html"
            except Exception as e:  # a notebook nbconvert cannot render is still reported, as an error
                entry["verdict"] = "error"
                entry["error"] = entry["error"] or {"ename": "HTMLExportError", "evalue": str(e),
                                                    "cell_index": None, "exec_count": None}
        with run_file.lock:
            if self.stopping.is_set():
                return
            put_entry(record, nb.stem, entry)
            run_file.save()
            lines = [f"{entry['verdict']} ({seconds:.1f} s)" if self.jobs == 1
                     else f"[{i}/{self.total}] {nb.stem} ... {entry['verdict']} ({seconds:.1f} s)"]
            if entry["error"]:
                lines.append(f"      {entry['error']['ename']}: {entry['error']['evalue']}")
            lines += [f"      - {reason}" for reason in (entry["reasons"] if entry["verdict"] == "regressed" else ())]
            progress("\n".join(lines))


def run_notebooks(run_file: RunFile, notebooks: list[Path], plan: dict, timeout: float, own: dict, **options):
    Run(run_file, notebooks, plan, timeout, own, **options).run()


def finish_run(run_file: RunFile, started: float) -> str:
    """metrics.json says "complete" only once index.html is there too. -> the overall verdict."""
    record = run_file.record
    with run_file.lock:
        verdict = overall_verdict(record["notebooks"])
        record["header"].update(status="complete", finished_utc=utc_text(), duration_s=round(time.time() - started, 2))
        record.update(verdict=verdict, counts=counts(record["notebooks"]))
        write_text_atomic(run_file.run_dir / "index.html", render_index(record, run_file.run_dir))
        run_file.save()
    return verdict


def mark_crashed(run_file: RunFile, error: Exception):
    run_file.stop_heartbeat()
    with run_file.lock:
        run_file.record["header"].update(status="dead", died=f"the report crashed: {type(error).__name__}: {error}",
                                         finished_utc=utc_text())
        run_file.record["verdict"] = "dead"
        try:
            run_file.save()
        except Exception:  # the crash may be this very write (a full disk): the run stays "running", then dead
            pass


def add_arguments(p: argparse.ArgumentParser):
    add_load_arguments(p)  # every notebook loads the model with these (its standard parameters)
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
    p.add_argument("--timeout", type=SECONDS, default=600.0, help="seconds one cell may run (default 600)")
    p.add_argument("--force", action="store_true", help="write the run even when --out is inside the model folder")
    p.add_argument("--jobs", default="auto", metavar="N",
                   help="notebooks run at once, each in its own kernel (default auto: 1 on a CPU, up to 3 on one "
                        "CUDA device by its memory and the CPU cores); a notebook whose metadata says so runs alone")
    p.add_argument("--no-kernel-ahead", action="store_true",
                   help="start each notebook's kernel when it runs (default: while the notebook before it runs, "
                        "its imports made there)")
    p.add_argument("--status", action="store_true",
                   help="list the runs in the reports folder (--out): complete, interrupted, running or dead, with "
                        "their verdicts; runs nothing")


def register(subparsers):
    p = subparsers.add_parser("report", help="run every numbered notebook (papermill) into reports/<run>/",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=stoppable(run_report))

