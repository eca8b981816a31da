"""doc/numpy_forward.md's forward is complete and right: its code block (the file doc/numpy_forward.py, verbatim),
executed on the tiny fixture with the golden run's prompt_ids, gives every canonical tensor of transformers' float32
run (data/golden/) to float32 rounding, and its dump passes `qwenlab diff` against that run."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from qwenlab.activations.dump import read_dump
from qwenlab.activations.names import canonical_names
from qwenlab.cli import main
from qwenlab.paths import DATA_DIR, REPO_ROOT

DOC = REPO_ROOT / "doc" / "numpy_forward.md"
SCRIPT = REPO_ROOT / "doc" / "numpy_forward.py"
GOLDEN = DATA_DIR / "golden" / "tiny-qwen3_reference.safetensors"


def doc_code() -> str:
    (block,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return block


@pytest.fixture(scope="module")
def doc_forward():
    namespace = {"__name__": "numpy_forward_doc"}
    exec(compile(doc_code(), str(DOC), "exec"), namespace)
    return namespace["forward"]


def rel_l2(cand: np.ndarray, ref: np.ndarray) -> float:
    c, r = cand.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    return float(np.linalg.norm(c - r) / np.linalg.norm(r))


def test_the_doc_shows_the_file_verbatim():
    assert doc_code() == SCRIPT.read_text()


def test_every_canonical_tensor_matches_the_golden_run(doc_forward, tiny_dir):
    golden = read_dump(GOLDEN)
    out = doc_forward(tiny_dir, golden.prompt_ids)
    assert list(out) == canonical_names(4)
    for name, ref in golden.tensors.items():
        assert out[name].dtype == np.float32, name
        assert tuple(out[name].shape) == tuple(ref.shape), name
        assert rel_l2(out[name], ref.numpy()) < 1e-5, name


def test_its_dump_passes_qwenlab_diff(tiny_dir, tmp_path, capsys):
    golden = read_dump(GOLDEN)
    (tmp_path / "ids.json").write_text(json.dumps({"ids": golden.prompt_ids, "tokens": []}))  # tokenize --json's form
    dump = tmp_path / "numpy.safetensors"
    done = subprocess.run([sys.executable, os.fspath(SCRIPT), os.fspath(tiny_dir), "ids.json", os.fspath(dump)],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert read_dump(dump).prompt_ids == golden.prompt_ids
    code = main(["diff", os.fspath(dump), os.fspath(GOLDEN), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["verdict"] == "pass" and result["dtype"] == "float32"
    assert result["coverage"]["complete"] and result["coverage"]["compared"] == len(canonical_names(4))
    assert max(row["rel_l2"] for row in result["rows"]) < 1e-5
