"""One weight source per folder, and an index that agrees with its shards: otherwise qwenlab and transformers could
read different weights and a diff would report a false divergence."""
import json
import shutil

from safetensors.torch import load_file, save_file

from qwenlab.model.loader import load_model

INDEX = "model.safetensors.index.json"


def shard(folder, parts: dict[str, list[str]]):
    """folder/model.safetensors split into the named shards (file -> tensor names) with an index."""
    tensors = load_file(str(folder / "model.safetensors"))
    for name, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
    weight_map = {k: name for name, keys in parts.items() for k in keys}
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def halves(names):
    return {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}


def test_a_single_file_and_an_index_together_are_refused(ckpt, fails):
    shard(ckpt, halves(sorted(load_file(str(ckpt / "model.safetensors")))))
    fails("generate", "--model", ckpt, "--prompt", "hi",
          needles=("model.safetensors and model.safetensors.index.json", "two weight sources", "remove"))
    (ckpt / "model.safetensors").unlink()  # one source left: it loads
    assert load_model(ckpt, "float32", "cpu").config.num_hidden_layers == 4


def test_an_index_naming_the_wrong_shard_is_refused(ckpt, fails):
    names = sorted(load_file(str(ckpt / "model.safetensors")))
    parts = halves(names)
    shard(ckpt, parts)
    (ckpt / "model.safetensors").unlink()
    index = json.loads((ckpt / INDEX).read_text())
    moved = parts["model-00001-of-00002.safetensors"][0]
    index["weight_map"][moved] = "model-00002-of-00002.safetensors"
    (ckpt / INDEX).write_text(json.dumps(index))
    fails("generate", "--model", ckpt, "--prompt", "hi", needles=(f"tensor {moved}", "model-0000"))


def test_a_shard_listed_in_the_index_but_absent(ckpt, fails):
    shard(ckpt, halves(sorted(load_file(str(ckpt / "model.safetensors")))))
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    fails("generate", "--model", ckpt, "--prompt", "hi",
          needles=("model-00002-of-00002.safetensors", "missing"))


def test_an_index_that_is_not_an_index(ckpt, fails):
    shutil.move(ckpt / "model.safetensors", ckpt / "model-00001-of-00001.safetensors")
    for text in ("[1, 2]", '{"weight_map": [1]}', '{"weight_map": {"a": 5}}', "{not json"):
        (ckpt / INDEX).write_text(text)
        fails("generate", "--model", ckpt, "--prompt", "hi", needles=(INDEX,))
