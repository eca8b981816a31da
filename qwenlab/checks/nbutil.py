"""What every numbered notebook shares: where its outputs go, how it records metrics, figures and its verdict.

Contract with `qwenlab report`: a notebook run with parameter `out_dir` writes
`<out_dir>/metrics/<notebook>.json` = {"notebook", "verdict": "pass"|"regressed", "reasons": [...],
"key_figure": "figures/<notebook>_<name>.png" | null, "metrics": {...}, "environment": {...}} (the kernel's
interpreter and package versions, qwenlab.versions.environment, which the report compares with its own) and figures
under `<out_dir>/figures/<notebook>_<name>.png`; the key figure (saved with key=True) is the one the report's index
shows. A notebook never raises for a regression (the report decides the exit code from the verdict); a raised
exception means the notebook errored.
"""
import json
import os
import sys
from pathlib import Path

from qwenlab.atomic import json_safe, write_text_atomic
from qwenlab.errors import QwenlabError
from qwenlab.paths import DATA_DIR, resolve_out_dir
from qwenlab.versions import environment

VERDICTS = ("pass", "regressed")
_key_figures: dict[tuple[str, str], str] = {}  # (run folder, notebook) -> the first figure saved with key=True


def check_checkout(cwd: str | os.PathLike | None = None) -> None:
    """A notebook opened in JupyterLab runs in its own folder; when that folder (or its parent) is a qwenlab checkout,
    the kernel must import that checkout's qwenlab. Outside a virtual environment a per-user `qwenlab` kernelspec of
    another environment wins over this one's, and the notebook would run another copy's code without a word."""
    here = Path(cwd or Path.cwd()).resolve()
    mine = Path(__file__).resolve().parents[1]  # this kernel's qwenlab package
    for folder in (here, here.parent):
        theirs = folder / "qwenlab"
        if (theirs / "__init__.py").is_file() and (folder / "notebooks").is_dir():
            if theirs.resolve() != mine:
                raise QwenlabError(
                    f"this kernel runs {sys.executable}, whose qwenlab is {mine}, not this checkout's {theirs}: a "
                    "`qwenlab` kernelspec of another environment shadows this one's (`jupyter kernelspec list`); in "
                    "this environment run `python -m ipykernel install --sys-prefix --name qwenlab`, then start "
                    "JupyterLab with JUPYTER_PREFER_ENV_PATH=1 or remove the other kernelspec")
            return


def load_thresholds(thresholds_dir: str | os.PathLike | None, notebook: str) -> dict:
    """data/thresholds/<notebook>.json (or the same file name under another folder given by the report). Every
    notebook calls it first, so it first checks that the kernel runs the checkout the notebook is in
    (check_checkout)."""
    check_checkout()
    path = Path(thresholds_dir or DATA_DIR / "thresholds") / f"{notebook}.json"
    if not path.is_file():
        raise QwenlabError(f"{path}: thresholds file not found")
    return json.loads(path.read_text())


def write_metrics(out_dir, notebook: str, metrics: dict, reasons: list[str]) -> dict:
    """reasons = the thresholds that were exceeded (empty list -> verdict 'pass'). Written atomically, with the
    environment this notebook ran in."""
    root = resolve_out_dir(out_dir)
    record = {"notebook": notebook, "verdict": "regressed" if reasons else "pass", "reasons": list(reasons),
              "key_figure": _key_figures.get((str(root), notebook)), "metrics": json_safe(metrics),
              "environment": environment()}
    folder = root / "metrics"
    folder.mkdir(exist_ok=True)
    write_text_atomic(folder / f"{notebook}.json", json.dumps(record, indent=2, allow_nan=False))
    return record


def save_figure(fig, out_dir, notebook: str, name: str, key: bool = False) -> Path:
    """key=True marks the notebook's main figure, the one the report's index shows; the first figure saved with
    key=True wins (a notebook whose main figure depends on what ran marks each candidate in order of preference)."""
    root = resolve_out_dir(out_dir)
    folder = root / "figures"
    folder.mkdir(exist_ok=True)
    path = folder / f"{notebook}_{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    if key:
        _key_figures.setdefault((str(root), notebook), f"figures/{path.name}")
    return path


def check_max(reasons: list[str], label: str, value: float, limit: float):
    """Appends a reason when value > limit (or is not a number: said so). Returns value for chaining in notebooks."""
    if value != value:
        reasons.append(f"{label} could not be computed (NaN): nothing to compare it with, limit {limit:.4g}")
    elif not (value <= limit):
        reasons.append(f"{label} = {value:.4g} exceeds {limit:.4g}")
    return value


def check_min(reasons: list[str], label: str, value: float, limit: float):
    if value != value:
        reasons.append(f"{label} could not be computed (NaN): nothing to compare it with, limit {limit:.4g}")
    elif not (value >= limit):
        reasons.append(f"{label} = {value:.4g} is below {limit:.4g}")
    return value


def verdict_line(record: dict) -> str:
    head = f"VERDICT {record['notebook']}: {record['verdict'].upper()}"
    return head if not record["reasons"] else head + "\n  - " + "\n  - ".join(record["reasons"])
