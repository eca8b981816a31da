"""scripts/run_notebook.py's script mode (the GPU machine has no Jupyter stack): the parameters injected after the
parameters cell, the cells run in order in one namespace, each code cell's wall time kept with its section, and a
failing cell still leaves the times of the cells before it."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("run_notebook", ROOT / "scripts" / "run_notebook.py")
run_notebook = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_notebook)

NOTEBOOK = '''# %% [markdown]
# # A notebook

# %% tags=["parameters"]
n = 1

# %%
total = n * 10

# %% [markdown]
# ## 1. Second section

# %%
total += 1
if fail:
    raise ValueError(f"stopped at {total}")
'''


def test_script_mode_times_each_cell_under_its_section(tmp_path):
    (tmp_path / "nb.py").write_text(NOTEBOOK)
    run_notebook.as_script(tmp_path / "nb.ipynb", tmp_path / "out" / "nb.ipynb", {"n": 4, "fail": False})
    times = json.loads((tmp_path / "out" / "nb.cells.json").read_text())
    assert [t["section"] for t in times] == ["A notebook", "A notebook", "1. Second section"]
    script = (tmp_path / "out" / "nb.py").read_text().splitlines()
    assert [script[t["line"] - 1] for t in times] == ["n = 1", "total = n * 10", "total += 1"]  # each cell's first line
    assert all(t["seconds"] >= 0 for t in times)


def test_a_failing_cell_raises_with_its_line_and_keeps_the_earlier_times(tmp_path):
    (tmp_path / "nb.py").write_text(NOTEBOOK)
    with pytest.raises(ValueError, match="stopped at 41") as info:
        run_notebook.as_script(tmp_path / "nb.ipynb", tmp_path / "out" / "nb.ipynb", {"n": 4, "fail": True})
    script = (tmp_path / "out" / "nb.py").read_text().splitlines()
    assert script[info.traceback[-1].lineno].strip().startswith("raise ValueError")  # the line as written
    assert len(json.loads((tmp_path / "out" / "nb.cells.json").read_text())) == 2
