"""doc/dump-format.md cannot drift: its name table and shapes are names.py's, its 1-layer list is canonical_names(1),
its config_hash recipe gives qwenlab's hash, and its writer examples (run here) write dumps `qwenlab diff` passes."""
import json
import os
import re

import pytest
import torch

from qwenlab.activations.dump import read_dump
from qwenlab.activations.names import canonical_names, point_dims
from qwenlab.cli import main
from qwenlab.model.config import read_config
from qwenlab.paths import DATA_DIR, REPO_ROOT

DOC = (REPO_ROOT / "doc" / "dump-format.md").read_text()
DENSE_DOC, MOE_DOC = DOC.split("### MoE layers")
GOLDEN = DATA_DIR / "golden" / "tiny-qwen3_reference.safetensors"
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", DOC, flags=re.S)
# the isolated (teacher-forced) writer has its own test: tests/activations/test_isolated_dump.py
WRITERS = [block for block in PYTHON_BLOCKS if "save_file(" in block and "isolated" not in block]


def table_rows(text: str = DENSE_DOC) -> dict[str, tuple[str, ...]]:
    rows = re.findall(r"^\| `([a-z_.{}0-9]+)` \| \[([^\]]+)\] \|", text, flags=re.M)
    return {name: tuple(dim.strip() for dim in shape.split(",")) for name, shape in rows}


def test_name_table_is_the_canonical_list_with_its_shapes():
    rows = table_rows()
    names = list(rows)
    first, last = names.index("layers.{i}.input"), names.index("layers.{i}.output")
    per_layer = names[first:last + 1]
    expanded = names[:first] + [n.replace("{i}", str(i)) for i in range(3) for n in per_layer] + names[last + 1:]
    assert expanded == canonical_names(3)
    for name, dims in rows.items():
        assert dims == point_dims(name.replace("{i}", "0")), name


def test_moe_table_is_a_moe_layer_s_mlp_points(moe_dir):
    rows = table_rows(MOE_DOC)
    points = [n for n in canonical_names(read_config(moe_dir)) if n.startswith("layers.1.mlp.")]
    assert [n.replace("{i}", "1") for n in rows] == points
    for name, dims in rows.items():
        assert dims == point_dims(name.replace("{i}", "1")), name


def test_one_layer_list_is_complete():
    block = re.search(r"```text\n(.*?)```", DOC, flags=re.S).group(1)
    assert block.split() == canonical_names(1)


def test_config_hash_recipe_gives_qwenlabs_hash(tiny_dir, untied_dir, moe_dir):
    (recipe,) = [block for block in PYTHON_BLOCKS if "def config_hash" in block]
    namespace = {}
    exec(recipe, namespace)
    for folder in (tiny_dir, untied_dir, moe_dir):  # the transformers 5.x and 4.x spellings of config.json, MoE
        raw = json.loads((folder / "config.json").read_text())
        assert namespace["config_hash"](raw) == read_config(folder).config_hash()


@pytest.mark.parametrize("block", WRITERS, ids=lambda b: "torch" if "import torch" in b else "numpy")
def test_writer_example_writes_a_dump_the_diff_passes(block, tmp_path, monkeypatch, capsys):
    assert len(WRITERS) == 2
    golden = read_dump(GOLDEN)
    numpy = "import torch" not in block
    activations = {name: t.numpy() if numpy else t.clone() for name, t in golden.tensors.items()}
    monkeypatch.chdir(tmp_path)
    exec(block, {"activations": activations, "prompt_ids": list(golden.prompt_ids)})

    written = read_dump(tmp_path / "mine.safetensors")
    assert written.prompt_ids == golden.prompt_ids
    code = main(["diff", "mine.safetensors", os.fspath(GOLDEN), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["verdict"] == "pass" and result["coverage"]["complete"]
    assert result["coverage"]["missing"] == []
    if numpy:
        assert {t.dtype for t in written.tensors.values()} == {torch.float64} and result["dtype"] == "float32"
        assert result["coverage"]["not_produced"] == [n for n in canonical_names(4) if n.endswith("_rope")]
    else:
        assert {t.dtype for t in written.tensors.values()} == {torch.bfloat16} and result["dtype"] == "bfloat16"
        assert result["coverage"]["compared"] == len(canonical_names(4))
