"""`qwenlab report`: run every numbered notebook headlessly (papermill) into one run folder.

    reports/<UTC timestamp>_<model name>/   NN_name.ipynb, NN_name.html, metrics/, figures/, metrics.json, index.html
    reports/latest -> the newest complete run

Exit 0 when every notebook passes, 1 when one regressed or errored (after all of them ran), 2 for a usage
error found before anything ran (bad model dir, unknown parameter, unknown notebook).
"""
import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .errors import QwenlabError

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
REPORTS_DIR = REPO_ROOT / "reports"
KERNEL = "qwenlab"
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
STANDARD_PARAMS = ("model_dir", "device", "dtype", "out_dir", "thresholds_dir")
VERSION_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "papermill", "nbconvert", "qwenlab")
SCHEMA_VERSION = 1


# ---------------------------------------------------------------- notebooks and their parameters

def discover(notebooks_dir) -> list[Path]:
    folder = Path(notebooks_dir)
    found = sorted(folder.glob(NOTEBOOK_GLOB))
    if not found:
        raise QwenlabError(f"{folder}: no numbered notebooks ({NOTEBOOK_GLOB})")
    return found


def _matches(token: str, stem: str) -> bool:
    return token == stem or token == stem[:2]


def find_notebook(token: str, notebooks: list[Path]) -> Path:
    hits = [nb for nb in notebooks if _matches(token, nb.stem)]
    if len(hits) != 1:
        names = ", ".join(nb.stem for nb in notebooks)
        what = "matches several notebooks" if hits else "is not a notebook"
        raise QwenlabError(f"{token!r} {what} (have: {names})")
    return hits[0]


def select(notebooks: list[Path], only: str | None) -> list[Path]:
    if not only:
        return notebooks
    chosen = {find_notebook(t.strip(), notebooks) for t in only.split(",") if t.strip()}
    return [nb for nb in notebooks if nb in chosen]


def parse_value(text: str):
    """-p values: JSON when they parse (1, 0.5, true, [1,2], "x"), else the string as typed."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_param_args(pairs: list[str]) -> tuple[dict, dict]:
    """['limit=3', '03_layer_diffs.prompt=hi'] -> ({'limit': 3}, {'03_layer_diffs': {'prompt': 'hi'}})."""
    global_params, scoped = {}, {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise QwenlabError(f"-p {pair!r}: expected NAME=VALUE or NN_name.NAME=VALUE")
        target, dot, pname = name.rpartition(".")
        if not pname.isidentifier():
            raise QwenlabError(f"-p {pair!r}: {pname!r} is not a parameter name")
        if pname in STANDARD_PARAMS:
            raise QwenlabError(f"-p {pname}: set by the report itself (use --model, --device, --dtype, --out, "
                               "--thresholds-dir)")
        (scoped.setdefault(target, {}) if dot else global_params)[pname] = parse_value(value)
    return global_params, scoped


def declared_parameters(path: Path) -> dict:
    """name -> default (source text) of the notebook's first cell tagged `parameters`.

    Read with Python's ast: papermill's own inspect_notebook (the fallback, for cells that are not plain Python)
    skips any line holding a second '=', such as `x = ""  # empty = default`, and would call x unknown."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        return {}
    try:
        tree = ast.parse(cell.source)
    except SyntaxError:
        return _papermill_parameters(path)
    out = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Name):
                out[target.id] = ast.get_source_segment(cell.source, node.value) if node.value else "None"
    return out


def _papermill_parameters(path: Path) -> dict:
    import papermill

    try:
        params = papermill.inspect_notebook(str(path))
    except ValueError as e:
        raise QwenlabError(f"{path}: cannot read its parameters ({e})") from None
    return {name: p["default"] for name, p in params.items()}


def plan_parameters(notebooks: list[Path], declared: dict, standard: dict, candidate, global_params: dict,
                    scoped: dict, all_notebooks: list[Path]) -> dict:
    """The parameters each notebook gets; QwenlabError for any name a targeted notebook does not declare."""
    plan = {nb.stem: dict(standard) for nb in notebooks}
    for nb in notebooks:
        missing = [p for p in STANDARD_PARAMS if p not in declared[nb.stem]]
        if missing:
            raise QwenlabError(f"{nb.name}: its parameters cell does not declare {', '.join(missing)} "
                               f"(every numbered notebook must; declared: {sorted(declared[nb.stem]) or 'none'})")
    shared = dict(global_params)
    if candidate is not None:
        shared["candidate"] = candidate
    for name, value in shared.items():
        takers = [nb.stem for nb in notebooks if name in declared[nb.stem]]
        if not takers:
            flag = "--candidate" if name == "candidate" and name not in global_params else f"-p {name}"
            raise QwenlabError(f"{flag}: unknown parameter {name!r}: no notebook to run declares it "
                               f"({', '.join(nb.stem for nb in notebooks)})")
        for stem in takers:
            plan[stem][name] = value
    for token, params in scoped.items():
        nb = find_notebook(token, all_notebooks)
        if nb.stem not in plan:
            raise QwenlabError(f"-p {token}.*: notebook {nb.stem} is not among the notebooks to run")
        for name, value in params.items():
            if name not in declared[nb.stem]:
                raise QwenlabError(f"-p {token}.{name}: unknown parameter {name!r} for notebook {nb.stem} "
                                   f"(declared: {', '.join(sorted(declared[nb.stem]))})")
            plan[nb.stem][name] = value
    return plan


def _default_value(source: str):
    try:
        return ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return source


def seeds(declared: dict, plan: dict) -> dict:
    """Every seed-like parameter each notebook runs with (its default unless the report overrides it)."""
    out = {}
    for stem, params in plan.items():
        found = {name: params.get(name, _default_value(default)) for name, default in declared[stem].items()
                 if name == "seed" or name.endswith("_seed") or name.startswith("seed_")}
        if found:
            out[stem] = found
    return out


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
    from .versions import package_versions

    return package_versions(VERSION_PACKAGES, missing="not installed")


def resolve_model(model) -> tuple[Path, str]:
    """Absolute model dir and its config hash, or QwenlabError before anything is written."""
    from .config import read_config

    if model is None:
        from .tiny import ensure_tiny
        model = ensure_tiny()
    path = Path(model).expanduser().resolve()
    if not path.is_dir():
        raise QwenlabError(f"{model}: not a directory (--model expects a Qwen3 checkpoint directory)")
    return path, read_config(path).config_hash()


# ---------------------------------------------------------------- execution

def ensure_kernel(name: str = KERNEL):
    """Install the `qwenlab` kernel for this Python when missing, so a fresh machine needs no set-up."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(name)
        return
    except NoSuchKernel:
        pass
    print(f"installing Jupyter kernel {name!r} for {sys.executable}", file=sys.stderr)
    done = subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", name,
                           "--display-name", f"{name} (Python 3)"], capture_output=True, text=True)
    if done.returncode != 0:
        raise QwenlabError(f"could not install the {name!r} Jupyter kernel: {done.stderr.strip().splitlines()[-1:]}")


def _not_checked_twice(record) -> bool:
    """papermill re-inspects parameters with a parser that skips lines holding a second '=' and then warns about
    names it missed; the report has already checked them (declared_parameters), so those warnings are noise."""
    message = record.getMessage()
    return not message.startswith(("Passed unknown parameter", "Unable to parse line"))


@contextmanager
def kernel_environment():
    """The kernel inherits this process's environment: no MPLBACKEND, so figures land inline."""
    import logging

    saved = os.environ.pop("MPLBACKEND", None)
    logger = logging.getLogger("papermill")
    logger.addFilter(_not_checked_twice)
    try:
        yield
    finally:
        logger.removeFilter(_not_checked_twice)
        if saved is not None:
            os.environ["MPLBACKEND"] = saved


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


@contextmanager
def kernel_stderr_to(log: Path):
    """The kernel process writes its own chatter (ZMQ warnings, shutdown notices) to the inherited fd 2: keep it
    in the run's logs/ so the progress lines stay readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def execute(notebook: Path, output: Path, params: dict, timeout: float | None, log: Path) -> dict | None:
    """Run one notebook; None when it ran through, else {ename, evalue, cell_index, exec_count} of what stopped it."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        with kernel_stderr_to(log):
            papermill.execute_notebook(str(notebook), str(output), parameters=params, kernel_name=KERNEL,
                                       cwd=str(REPO_ROOT), progress_bar=False, request_save_on_cell_execute=True,
                                       execution_timeout=timeout)
    except PapermillExecutionError as e:
        return {"ename": e.ename, "evalue": e.evalue, "cell_index": e.cell_index, "exec_count": e.exec_count}
    except Exception as e:  # kernel died, cell timeout, kernel failed to start: the notebook errored
        text = str(e).strip()
        return {"ename": type(e).__name__, "evalue": text.splitlines()[0] if text else "", "cell_index": None,
                "exec_count": None}
    return None


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


# ---------------------------------------------------------------- atomic files

def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict):
    from .nbutil import json_safe

    write_text_atomic(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


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


# ---------------------------------------------------------------- the command

def command_line(args) -> str:
    """The request as a command line (with paths resolved), for the run header."""
    import shlex

    parts = ["qwenlab", "report"]
    for flag, value in (("--model", args.model), ("--device", args.device), ("--dtype", args.dtype),
                        ("--out", args.out), ("--only", args.only), ("--thresholds-dir", args.thresholds_dir),
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
    from .loader import resolve_device

    device = str(resolve_device(args.device))
    all_notebooks = discover(args.notebooks_dir or NOTEBOOKS_DIR)
    notebooks = select(all_notebooks, args.only)
    thresholds_dir = existing(args.thresholds_dir, "--thresholds-dir", Path.is_dir) or ""
    candidate = existing(args.candidate, "--candidate", Path.is_file)
    global_params, scoped = parse_param_args(args.param)
    declared = {nb.stem: declared_parameters(nb) for nb in notebooks}
    out = Path(args.out).expanduser().resolve() if args.out else REPORTS_DIR
    standard = {"model_dir": str(model_dir), "device": device, "dtype": args.dtype, "out_dir": None,
                "thresholds_dir": thresholds_dir}
    plan = plan_parameters(notebooks, declared, standard, candidate, global_params, scoped, all_notebooks)
    ensure_kernel()

    run_dir = make_run_dir(out, model_dir.name, now)
    for params in plan.values():
        params["out_dir"] = str(run_dir)
    commit, dirty = git_commit()
    header = {"run": run_dir.name, "run_dir": str(run_dir), "started_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
              "finished_utc": None, "duration_s": None, "status": "running", "git_commit": commit, "git_dirty": dirty,
              "versions": versions(), "device": device, "dtype": args.dtype, "model_path": str(model_dir),
              "model_name": model_dir.name, "config_hash": config_hash, "thresholds_dir": thresholds_dir or None,
              "candidate": candidate, "parameters": {"global": global_params, "scoped": scoped},
              "seeds": seeds(declared, plan), "notebooks_dir": str(Path(args.notebooks_dir or NOTEBOOKS_DIR).resolve()),
              "command": command_line(args)}
    record = {"schema": SCHEMA_VERSION, "header": header, "verdict": None, "counts": {}, "notebooks": {}}
    write_json_atomic(run_dir / "metrics.json", record)

    from .report_html import html_exporter, notebook_html, render_index

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
    p.set_defaults(func=run_report)


def main(argv=None) -> int:
    """`python -m qwenlab.report ...` (the same as `qwenlab report ...`)."""
    parser = argparse.ArgumentParser(prog="qwenlab report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_report(args)
    except QwenlabError as e:
        print(f"qwenlab report: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qwenlab report: interrupted (reports/latest not moved)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
