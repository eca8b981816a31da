"""Notebooks stay reviewable: every .ipynb is paired with a jupytext percent script and carries no outputs."""
import json

import jupytext
import pytest

from qwenlab.paths import NOTEBOOKS_DIR

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def test_there_are_numbered_notebooks():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_no_outputs_and_a_parameters_cell(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert "parameters" in code[0].get("metadata", {}).get("tags", [])
    assert nb["metadata"]["kernelspec"]["name"] == "qwenlab"
    assert "py:percent" in nb["metadata"]["jupytext"]["formats"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_its_percent_script(path):
    script = path.with_suffix(".py")
    assert script.is_file(), f"{script.name} (jupytext pair) is missing"
    from_script = jupytext.read(script)
    from_ipynb = jupytext.read(path)
    assert [(c.cell_type, c.source) for c in from_script.cells] == [(c.cell_type, c.source) for c in from_ipynb.cells]
