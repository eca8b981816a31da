"""doc/dump-format.md's isolated dump, executed: the doc's NumPy forward run teacher-forced on a reference dump made
by transformers passes `qwenlab diff` layer by layer, and a mistake planted in one layer of it is named in that
layer only (the layers after it, fed the reference's inputs, stay clean)."""
import re
import sys

import pytest

from qwenlab.activations.diff import diff_dumps
from qwenlab.activations.dump import read_dump
from qwenlab.cli import main
from qwenlab.paths import REPO_ROOT

DOC = REPO_ROOT / "doc" / "dump-format.md"


def isolated_example() -> str:
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S) if "isolated" in b]
    return block


@pytest.fixture
def reference_dump(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO_ROOT / "doc"))
    assert main(["capture", "--model", str(tiny_dir), "--prompt", "The quick brown fox jumps over the lazy dog.",
                 "--impl", "reference", "--out", "ref.safetensors", "--device", "cpu"]) == 0
    return tmp_path / "ref.safetensors"


def run_example(tiny_dir):
    exec(compile(isolated_example(), str(DOC), "exec"), {"__name__": "isolated_doc", "model_dir": tiny_dir})


def test_the_documented_isolated_dump_passes_layer_by_layer(tiny_dir, reference_dump, capsys):
    run_example(tiny_dir)
    assert main(["diff", "isolated.safetensors", "ref.safetensors"]) == 0
    assert capsys.readouterr().out.startswith("isolated (each layer fed the reference's input), dtype float32")
    result = diff_dumps("isolated.safetensors", "ref.safetensors")
    assert result.isolated and result.compared == 4 * 17  # every layer point but the given inputs


def test_a_mistake_in_one_layer_is_named_there_and_nowhere_else(tiny_dir, reference_dump, monkeypatch):
    numpy_forward = __import__("numpy_forward")
    original = numpy_forward.rms_norm
    calls = {"n": 0}

    def wrong_in_layer_2(x, weight, eps):  # a layer's norms: input, q, k, post-attention; layer 2's k_norm as (1 + w)
        calls["n"] += 1
        if calls["n"] == 4 * 2 + 3:
            return original(x, 1 + weight, eps)
        return original(x, weight, eps)
    monkeypatch.setattr(numpy_forward, "rms_norm", wrong_in_layer_2)
    monkeypatch.setitem(sys.modules, "numpy_forward", numpy_forward)
    run_example(tiny_dir)
    result = diff_dumps("isolated.safetensors", "ref.safetensors")
    assert result.first_divergence == "layers.2.attn.k_norm"
    bad_layers = {r["layer"] for r in result.rows if r["exceeds"]}
    assert bad_layers == {2}
    assert read_dump("isolated.safetensors").metadata["isolated"] == "true"
