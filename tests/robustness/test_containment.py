"""Nothing outside the checkpoint folder is read: index entries are plain names, symlinks are followed only inside
the folder or into the HF cache blobs of the same repository, and outputs are never written into the checkpoint."""
import json
import os
import shutil

import pytest
from safetensors import safe_open

from qwenlab.errors import QwenlabError
from qwenlab.model import files
from qwenlab.model.files import refuse_inside
from qwenlab.model.loader import load_model

INDEX = "model.safetensors.index.json"


def index_to(folder, entry: str):
    """Every tensor of folder/model.safetensors mapped to `entry` by an index; the single file moved away."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {n: entry for n in names}}))
    moved = folder.parent / "moved.safetensors"
    (folder / "model.safetensors").rename(moved)
    return moved


@pytest.fixture
def opened(monkeypatch):
    """Every path the checkpoint file logic opens."""
    seen = []
    real_open, real_safe_open = open, files.safe_open
    monkeypatch.setattr(files, "safe_open", lambda path, *a, **k: seen.append(str(path)) or real_safe_open(path, *a, **k))
    monkeypatch.setattr(files, "open", lambda path, *a, **k: seen.append(str(path)) or real_open(path, *a, **k),
                        raising=False)
    return seen


@pytest.mark.parametrize("entry", ["../outside/x.safetensors", "../../../../etc/passwd", "/etc/passwd",
                                   "sub/model.safetensors", ".."])
def test_an_index_entry_leaving_the_folder_is_refused(ckpt, tmp_path, fails, opened, entry):
    moved = index_to(ckpt, entry)
    (tmp_path / "outside").mkdir()
    moved.rename(tmp_path / "outside" / "x.safetensors")
    fails("generate", "--model", ckpt, "--prompt", "hi",
          needles=(INDEX, repr(entry), "not a plain file name in the checkpoint folder"))
    assert opened == []


def test_a_weight_symlink_out_of_the_folder_is_refused(ckpt, tmp_path, fails, opened):
    outside = tmp_path / "elsewhere.safetensors"
    (ckpt / "model.safetensors").rename(outside)
    (ckpt / "model.safetensors").symlink_to(outside)
    fails("generate", "--model", ckpt, "--prompt", "hi",
          needles=("model.safetensors: links to", str(outside), "outside the checkpoint folder"))
    assert opened == []


def test_a_symlinked_index_out_of_the_folder_is_refused(ckpt, tmp_path, fails):
    moved = index_to(ckpt, "moved.safetensors")
    shutil.move(ckpt / INDEX, tmp_path / "index.json")
    (ckpt / INDEX).symlink_to(tmp_path / "index.json")
    moved.rename(ckpt / "moved.safetensors")
    fails("generate", "--model", ckpt, "--prompt", "hi", needles=(INDEX, "outside the checkpoint folder"))


def test_symlinks_inside_the_folder_are_followed(ckpt):
    (ckpt / "weights").mkdir()
    (ckpt / "model.safetensors").rename(ckpt / "weights" / "real.safetensors")
    (ckpt / "model.safetensors").symlink_to(os.path.join("weights", "real.safetensors"))
    assert load_model(ckpt, "float32", "cpu").config.num_hidden_layers == 4


def hf_cache(tiny_dir, root, repo="models--Qwen--Tiny"):
    """tiny_dir laid out as the HF hub cache does: blobs/<hash>, snapshots/<rev>/<name> -> ../../blobs/<hash>."""
    blobs, snapshot = root / repo / "blobs", root / repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(tiny_dir.iterdir())):
        shutil.copyfile(path, blobs / f"blob{i:02d}")
        (snapshot / path.name).symlink_to(os.path.join("..", "..", "blobs", f"blob{i:02d}"))
    return snapshot


def test_an_hf_cache_snapshot_loads_with_no_flag(tiny_dir, tmp_path, cli):
    snapshot = hf_cache(tiny_dir, tmp_path / "hub")
    code, out, err = cli("generate", "--model", snapshot, "--prompt", "hi", "--max-new-tokens", "2", "--json")
    assert code == 0, err
    assert len(json.loads(out)["ids"]) == 2


def test_a_snapshot_linking_into_another_repository_is_refused(tiny_dir, tmp_path, fails):
    hub = tmp_path / "hub"
    snapshot = hf_cache(tiny_dir, hub)
    other = hf_cache(tiny_dir, hub, "models--Other--Model")
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(os.path.relpath((other / "model.safetensors").resolve(), snapshot))
    fails("generate", "--model", snapshot, "--prompt", "hi", needles=("models--Other--Model", "outside"))


def test_outputs_inside_the_checkpoint_are_refused(ckpt, tmp_path):
    for out in (ckpt / "model.safetensors", ckpt / "tokenizer.json", ckpt / "sub" / "dump.safetensors", ckpt):
        with pytest.raises(QwenlabError, match="is inside the checkpoint folder"):
            refuse_inside(out, ckpt)
    (tmp_path / "link.safetensors").symlink_to(ckpt / "model.safetensors")
    with pytest.raises(QwenlabError, match="--out .*link.safetensors"):
        refuse_inside(tmp_path / "link.safetensors", ckpt)
    refuse_inside(tmp_path / "dump.safetensors", ckpt)  # beside it is fine


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_capture_never_overwrites_a_file_that_is_not_a_dump(ckpt, fails, name):
    before = (ckpt / name).read_bytes()
    fails("capture", "--model", ckpt, "--prompt", "hi", "--impl", "qwenlab", "--out", ckpt / name,
          needles=(f"--out {ckpt / name}: is inside the checkpoint folder {ckpt}", "nothing was written"))
    assert (ckpt / name).read_bytes() == before
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]


def test_capture_replaces_its_own_earlier_dump(tiny_dir, tmp_path, cli):
    out = tmp_path / "dump.safetensors"
    for _ in range(2):
        code, _, err = cli("capture", "--model", tiny_dir, "--prompt", "hi", "--impl", "qwenlab", "--out", out)
        assert code == 0, err
