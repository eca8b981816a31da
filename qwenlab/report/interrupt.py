"""Ctrl-C (SIGINT) or SIGTERM during `qwenlab report`: the running notebook's kernel is stopped (report/kernel.py),
the run folder is marked `"status": "interrupted"` (metrics.json and index.html, with the notebook that was running),
`latest` stays where it was, one line on stderr says where the partial run is, and the report exits 130."""
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from qwenlab.atomic import write_text_atomic
from qwenlab.report.liveness import RunFile
from qwenlab.report.pages import render_index

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODE = 130


class ReportInterrupted(KeyboardInterrupt):
    """Raised in the main thread by the report's SIGINT/SIGTERM handler (a KeyboardInterrupt: `except Exception`
    blocks in papermill and nbclient let it through, their `finally` blocks shut the kernel down)."""


@dataclass
class Interruption:
    """What the handler needs to mark the run: set by watch() once the run folder has its metrics.json."""
    signal_name: str | None = None
    run_file: RunFile | None = None
    stems: list[str] = field(default_factory=list)
    started: float = 0.0


_current = Interruption()


def watch(run_file: RunFile, stems: list[str], started: float):
    """Called by the report once metrics.json exists: an interruption from now on marks this run."""
    _current.run_file, _current.stems, _current.started = run_file, stems, started


def running_notebooks(record: dict, run_dir: Path, stems: list[str]) -> list[str]:
    """The notebooks that were running: those without an entry whose execution began (their log exists); one,
    unless the report ran several at once (--jobs)."""
    return [stem for stem in stems if stem not in record["notebooks"] and (run_dir / "logs" / f"{stem}.log").exists()]


def unfinished_entry(run_dir: Path, stem: str, verdict: str, reason: str) -> dict:
    """The entry of the notebook that was running when the run was interrupted or died."""
    return {"verdict": verdict, "reasons": [reason], "metrics": {},
            "error": None, "duration_s": None, "parameters": {},
            "ipynb": f"{stem}.ipynb" if (run_dir / f"{stem}.ipynb").is_file() else None, "html": None,
            "figures": sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / "figures").glob(f"{stem}_*.png"))}


def mark_interrupted(run_file: RunFile, stems: list[str], started: float, signal_name: str) -> str:
    """Writes the interrupted run's index.html and metrics.json; -> the one line for stderr."""
    run_file.stop_heartbeat()
    record, run_dir = run_file.record, run_file.run_dir
    with run_file.lock:
        running = running_notebooks(record, run_dir, stems)
        done = list(record["notebooks"])
        for stem in running:
            put_entry(record, stem,
                      unfinished_entry(run_dir, stem, "interrupted", f"stopped by {signal_name} while it ran"))
        if running:
            print(f"interrupted ({signal_name})", file=sys.stderr, flush=True)  # ends the pending progress line
        record["header"].update(
            status="interrupted", interrupted_notebook=running[0] if running else None,
            interrupted_notebooks=running, signal=signal_name,
            not_run=[stem for stem in stems if stem not in record["notebooks"]],
            finished_utc=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            duration_s=round(time.time() - started, 2))
        record.update(verdict="interrupted", counts=counts(record["notebooks"]))
        write_text_atomic(run_dir / "index.html", render_index(record, run_dir))
        run_file.save()
    where = (f"during {', '.join(running)}" if running else f"after {done[-1]}" if done
             else "before the first notebook")
    return f"qwenlab report: interrupted {where}; partial run in {run_dir}"


def put_entry(record: dict, stem: str, entry: dict):
    """record["notebooks"][stem] = entry, the entries kept in notebook order (with --jobs they end in any order)."""
    entries = record["notebooks"]
    entries[stem] = entry
    stems = record["header"].get("notebooks") or []
    record["notebooks"] = {s: entries[s] for s in [*stems, *entries] if s in entries}


def counts(entries: dict) -> dict:
    verdicts = [e["verdict"] for e in entries.values()]
    return {v: verdicts.count(v) for v in ("pass", "regressed", "error")}


def finish(state: Interruption) -> str:
    if state.run_file is None:
        return "qwenlab report: interrupted before any notebook ran"
    return mark_interrupted(state.run_file, state.stems, state.started, state.signal_name)


@contextmanager
def signals_raise(state: Interruption):
    """The first SIGINT/SIGTERM raises ReportInterrupted; later ones are ignored (the kernel is being stopped and
    the run marked). Only the main thread can take signals: elsewhere this does nothing."""
    def handler(signum, frame):
        if state.signal_name is None:
            state.signal_name = signal.Signals(signum).name
            raise ReportInterrupted(state.signal_name)

    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS} if main else {}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stoppable(command):
    """`qwenlab report`'s function, interruptible: on SIGINT/SIGTERM the kernel stops (report/kernel.py), the run is
    marked interrupted, one line goes to stderr and the exit code is 130; no traceback."""
    def run(args) -> int:
        global _current
        _current = state = Interruption()
        with signals_raise(state):
            try:
                return command(args)
            except ReportInterrupted:
                print(finish(state), file=sys.stderr, flush=True)
                return EXIT_CODE

    return run
