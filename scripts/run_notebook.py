"""Run one numbered notebook with parameters, with papermill when it is installed, else as its jupytext percent
script with the parameters injected after its parameters cell (the lent GPU machine has no Jupyter stack).

    python scripts/run_notebook.py notebooks/03_layer_diffs.ipynb OUT.ipynb model_dir=/tmp/m plant_bugs=False

VALUE is a Python literal when it parses as one (numbers, True/False, lists, quoted strings), else a string.
Exit status: the notebook's (a cell that raises fails the run).
"""
import ast
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MARKER = '# %% tags=["parameters"]'


def parse(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        try:
            params[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            params[name] = text
    return params


def cells(source: str) -> list[tuple[int, str, str]]:
    """(first line, section, code) of each code cell of a jupytext percent script; section: the last markdown
    heading above it."""
    out, section, lines = [], "setup", source.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("# %%")] + [len(lines)]
    for a, b in zip(starts, starts[1:]):
        body = "".join(lines[a + 1:b])
        if "[markdown]" in lines[a]:
            heading = next((ln.lstrip("# ").strip() for ln in lines[a + 1:b] if ln.startswith("# #")), None)
            section = heading or section
        else:
            out.append((a + 1, section, body))
    return out


def as_script(notebook: Path, out: Path, params: dict) -> int:
    """The notebook's percent script with the parameters injected, run cell by cell in one namespace; each code
    cell's wall time is printed at the end and written to OUT.cells.json (where a notebook spends its time)."""
    source = notebook.with_suffix(".py").read_text()
    start = source.index(MARKER)
    end = source.index("\n# %%", start + len(MARKER))
    inject = "\n# injected by scripts/run_notebook.py\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
    script = out.with_suffix(".py")
    script.parent.mkdir(parents=True, exist_ok=True)
    source = source[:end] + inject + source[end:]
    if importlib.util.find_spec("IPython") is None:  # tables are displayed with IPython's display: print them
        source = source.replace("from IPython.display import display\n", "display = print\n")
    script.write_text(source)
    os.environ.setdefault("MPLBACKEND", "Agg")
    namespace, times = {"__name__": "__main__", "__file__": str(script)}, []
    try:
        for line, section, code in cells(source):
            t0 = time.perf_counter()
            exec(compile("\n" * line + code, str(script), "exec"), namespace)  # noqa: S102 - the notebook itself
            times.append({"line": line + 1, "section": section, "seconds": round(time.perf_counter() - t0, 3)})
    finally:
        out.with_suffix(".cells.json").write_text(json.dumps(times, indent=1) + "\n")
        slow = sorted(times, key=lambda t: -t["seconds"])[:8]
        print(f"cell times ({sum(t['seconds'] for t in times):.1f} s in {len(times)} code cells), slowest: " +
              "; ".join(f"line {t['line']} [{t['section'][:40]}] {t['seconds']:.1f} s" for t in slow), flush=True)
    return 0


def main() -> int:
    notebook, out, *pairs = sys.argv[1:]
    notebook, out, params = Path(notebook), Path(out), parse(pairs)
    out.parent.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("papermill") and importlib.util.find_spec("ipykernel"):
        kernels = subprocess.run([sys.executable, "-m", "jupyter", "kernelspec", "list"], capture_output=True, text=True)
        kernel = "qwenlab" if "qwenlab" in kernels.stdout.split() else "python3"
        import papermill

        papermill.execute_notebook(str(notebook), str(out), parameters=params, kernel_name=kernel, cwd=os.getcwd(),
                                   progress_bar=False)
        return 0
    print(f"papermill/ipykernel not importable: running {notebook.with_suffix('.py')} as a script", flush=True)
    return as_script(notebook, out, params)


if __name__ == "__main__":
    sys.exit(main())
