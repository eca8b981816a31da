"""The run folder of `qwenlab report`: a fresh timestamped folder per run, files written atomically, and the
`latest` symlink, moved only to a newer run (by start time) under a lock on the reports folder."""
import fcntl
import json
import os
import re
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from qwenlab.errors import QwenlabError


def check_out(out: Path, model_dir: Path, force: bool):
    """--out, before anything is written: not inside the checkpoint (unless --force), and somewhere a folder can be."""
    if (out == model_dir or model_dir in out.parents) and not force:
        raise QwenlabError(f"--out {out}: inside the model folder {model_dir}; the report would write its runs into "
                           "the checkpoint (--force to do it anyway)")
    base = next(p for p in (out, *out.parents) if p.exists())
    if not base.is_dir():
        raise QwenlabError(f"--out {out}: {base} is not a folder")


def make_run_dir(out: Path, model_name: str, now: datetime) -> Path:
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-") or "model"
    try:
        out.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            path = out / (f"{stamp}_{safe}" if n == 1 else f"{stamp}_{safe}-{n}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            for sub in ("metrics", "figures", "logs"):
                (path / sub).mkdir()
            return path
    except OSError as e:
        raise QwenlabError(f"--out {out}: cannot create a run folder there ({e.strerror or e})") from None
    raise QwenlabError(f"{out}: cannot create a run folder for {stamp}_{safe}")


def started_at(run_dir: Path) -> float | None:
    """When a run started (its metrics.json header), or None when that cannot be read."""
    try:
        header = json.loads((run_dir / "metrics.json").read_text())["header"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(header.get("started_at"), (int, float)):
        return float(header["started_at"])
    try:
        return datetime.strptime(header["started_utc"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


@contextmanager
def locked(folder: Path):
    """An exclusive lock on the folder itself (no lock file left behind), for the read-compare-swap of latest."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def update_latest(out: Path, run_dir: Path, started: float) -> str | None:
    """out/latest -> run_dir (relative), swapped in atomically, unless latest points at a run that started later
    (concurrent runs: the one that started last wins). -> None when moved, else the name of the run it keeps."""
    link = out / "latest"
    tmp = out / f".latest.{os.getpid()}.tmp"
    with locked(out):
        current = link.resolve() if link.is_symlink() else None
        current_start = started_at(current) if current is not None else None
        if current_start is not None and current_start > started and current != run_dir:
            return current.name
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(run_dir, out), tmp)
        try:
            os.replace(tmp, link)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise QwenlabError(f"{link}: cannot point it at {run_dir.name} ({e})") from None
    return None
