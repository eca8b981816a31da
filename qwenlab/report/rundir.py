"""The run folder of `qwenlab report`: a fresh timestamped folder per run, files written atomically, and the
`latest` symlink swapped in atomically."""
import os
import re
from datetime import datetime
from pathlib import Path

from qwenlab.errors import QwenlabError


def make_run_dir(out: Path, model_name: str, now: datetime) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-") or "model"
    for n in range(1, 1000):
        path = out / (f"{stamp}_{safe}" if n == 1 else f"{stamp}_{safe}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        for sub in ("metrics", "figures", "logs"):
            (path / sub).mkdir()
        return path
    raise QwenlabError(f"{out}: cannot create a run folder for {stamp}_{safe}")


def update_latest(out: Path, run_dir: Path) -> Path:
    """out/latest -> run_dir (relative), swapped in atomically."""
    link = out / "latest"
    tmp = out / f".latest.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(run_dir, out), tmp)
    try:
        os.replace(tmp, link)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise QwenlabError(f"{link}: cannot point it at {run_dir.name} ({e})") from None
    return link
