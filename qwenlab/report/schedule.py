"""How many notebooks `qwenlab report` runs at once, and in what order.

Every notebook loads the model itself and writes only its own files, so notebooks can run side by side, each in its
own kernel. A notebook whose figures would change with other work on the same machine says so in its metadata
(`"qwenlab": {"runs_alone": "<why>"}`: 04 times decode steps, 05 records the device's memory in use) and runs with
no other notebook beside it. Those run first, one by one; the others then share `jobs` lanes, the longest first
by the last complete run of the same model in the same reports folder (else in notebook order).

`--jobs auto` is 1 on a CPU (the notebooks would share the cores their own timings and the model use) and on a model
split across devices; on one CUDA device it is the smallest of MAX_AUTO_JOBS, a quarter of the CPU cores and what
the device's memory holds at MEMORY_PER_JOB times the checkpoint's bytes per notebook (a model, its transformers
reference, a float32 copy of it for the noise floors)."""
import json
import os
import subprocess
from pathlib import Path

from qwenlab.errors import QwenlabError
from qwenlab.model.files import weight_files

MAX_AUTO_JOBS = 3
MEMORY_PER_JOB = 5  # x the checkpoint's bytes: what one notebook may hold on the device at its peak
CORES_PER_JOB = 4


def runs_alone(notebook: Path) -> str | None:
    """Why `notebook` must run with nothing beside it (its metadata's qwenlab.runs_alone), or None."""
    try:
        meta = json.loads(notebook.read_text()).get("metadata") or {}
    except (OSError, ValueError) as e:
        raise QwenlabError(f"{notebook}: not a readable notebook ({e})") from None
    reason = (meta.get("qwenlab") or {}).get("runs_alone")
    return str(reason) if reason else None


def checkpoint_bytes(model_dir: Path) -> int:
    """The bytes of the weight files a load reads (qwenlab.model.files.weight_files: the shards of the index, or
    model.safetensors)."""
    return sum(p.stat().st_size for p in set(weight_files(model_dir).values()))


def device_memory(device: str) -> int | None:
    """The CUDA device's total memory as nvidia-smi reports it (asked outside this process, which makes no CUDA
    context: one would hold device memory for the whole report); None when nvidia-smi cannot say."""
    index = device.partition(":")[2] or os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i",
                              index], capture_output=True, text=True, timeout=20)
        return int(float(out.stdout.strip().splitlines()[0]) * 2**20) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def resolve_jobs(jobs: str, device: str, model_dir: Path, device_map: str | None) -> tuple[int, str]:
    """`--jobs` (a number or auto) -> (notebooks at once, why that many)."""
    if jobs != "auto":
        try:
            n = int(jobs)
        except ValueError:
            n = 0
        if n < 1:
            raise QwenlabError(f"--jobs {jobs}: expected a positive number or auto")
        return n, "--jobs"
    if not device.startswith("cuda"):
        return 1, f"auto: {device} (the notebooks would share the cores they time)"
    if device_map:
        return 1, "auto: a model split across devices"
    cores = os.cpu_count() or 1
    total = device_memory(device)
    if total is None:
        return 1, "auto: nvidia-smi did not report the device's memory"
    need = MEMORY_PER_JOB * max(checkpoint_bytes(model_dir), 1)
    n = max(1, min(MAX_AUTO_JOBS, cores // CORES_PER_JOB, total // need))
    return n, (f"auto: {cores} CPU cores, {total / 2**30:.0f} GiB on {device} for {need / 2**30:.1f} GiB a notebook "
               f"({MEMORY_PER_JOB}x the checkpoint)")


def previous_durations(out: Path, model_dir: Path) -> dict[str, float]:
    """Seconds each notebook took in the reports folder's latest complete run of the same model; {} without one."""
    try:
        record = json.loads((out / "latest" / "metrics.json").read_text())
        if record["header"].get("model_path") != str(model_dir):
            return {}
        return {stem: float(e["duration_s"]) for stem, e in record["notebooks"].items()
                if isinstance(e.get("duration_s"), (int, float))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def order(notebooks: list[Path], alone: dict[str, str], jobs: int, durations: dict[str, float]) -> list[Path]:
    """The order notebooks start in: in notebook order with one lane; else those that run alone first, then the
    rest longest first (by `durations`; an unknown one counts as the longest, ties in notebook order)."""
    if jobs == 1:
        return list(notebooks)
    first = [nb for nb in notebooks if nb.stem in alone]
    rest = [nb for nb in notebooks if nb.stem not in alone]
    rest.sort(key=lambda nb: -durations.get(nb.stem, float("inf")))
    return first + rest
