"""The runs in a reports folder: `qwenlab report --status` lists them, and each new report marks the ones that died
while running (report/liveness.py) as `"status": "dead"` in their metrics.json and index.html."""
import json
from pathlib import Path

from qwenlab.atomic import write_json_atomic, write_text_atomic
from qwenlab.report.interrupt import counts, put_entry, running_notebooks, unfinished_entry
from qwenlab.report.liveness import death, utc_text
from qwenlab.report.pages import render_index
from qwenlab.report.rundir import started_at

SHOWN = 20


def runs(out: Path) -> list[tuple[Path, dict]]:
    """(run folder, its metrics.json record) for every run in `out`, oldest start first."""
    found = []
    for path in out.iterdir() if out.is_dir() else ():
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            record = json.loads((path / "metrics.json").read_text())
            record["header"]["status"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append((started_at(path) or 0.0, path.name, path, record))
    return [(path, record) for _, _, path, record in sorted(found, key=lambda f: f[:2])]


def state(record: dict) -> str:
    """complete | interrupted | running | dead, as metrics.json says, with a dead process seen as dead."""
    header = record["header"]
    return "dead" if death(header) else str(header.get("status"))


def mark_dead(run_dir: Path, record: dict, reason: str, by: str):
    header = record["header"]
    stems = header.get("notebooks") or list(record["notebooks"])
    running = running_notebooks(record, run_dir, stems)
    for stem in running:
        put_entry(record, stem, unfinished_entry(run_dir, stem, "dead", f"the report died while it ran ({reason})"))
    header.update(status="dead", died=reason, dead_notebook=running[0] if running else None,
                  dead_notebooks=running, marked_dead_by=by, marked_dead_utc=utc_text(),
                  not_run=[stem for stem in stems if stem not in record["notebooks"]])
    record.update(verdict="dead", counts=counts(record["notebooks"]))
    write_text_atomic(run_dir / "index.html", render_index(record, run_dir))
    write_json_atomic(run_dir / "metrics.json", record)


def mark_dead_runs(out: Path, by: str) -> list[tuple[str, str]]:
    """Marks every run in `out` that says "running" but is dead; -> (run, why) for each."""
    marked = []
    for run_dir, record in runs(out):
        reason = death(record["header"])
        if reason is None:
            continue
        try:
            mark_dead(run_dir, record, reason, by)
        except OSError:  # someone else's read-only run: --status still shows it dead
            continue
        marked.append((run_dir.name, reason))
    return marked


def status_lines(out: Path, shown: int = SHOWN) -> list[str]:
    found = runs(out)
    if not found:
        return [f"no report runs in {out}"]
    link = out / "latest"
    latest = link.resolve() if link.is_symlink() else None
    lines = [f"{'run':<44} {'status':<12} {'verdict':<12} {'notebooks':<16} started (UTC)"]
    if len(found) > shown:
        lines.append(f"({len(found) - shown} older runs not shown)")
    for run_dir, record in found[-shown:]:
        header = record["header"]
        done = sum(e.get("verdict") in ("pass", "regressed", "error") for e in record.get("notebooks", {}).values())
        total = len(header.get("notebooks") or record.get("notebooks") or ())
        notebooks = f"{done}/{total}" + (" (--only)" if header.get("subset") else "")
        now = state(record)
        note = f"  {death(header)}" if now == "dead" and header.get("status") == "running" else ""
        note += "  <- latest" if run_dir == latest else ""
        lines.append(f"{run_dir.name:<44} {now:<12} {record.get('verdict') or '-':<12} {notebooks:<16} "
                     f"{header.get('started_utc', '?')}{note}")
    return lines


def print_status(out: Path) -> int:
    print("\n".join(status_lines(out)))
    return 0

