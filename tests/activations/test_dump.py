import json
from datetime import datetime

import pytest
import safetensors.torch
import torch

from qwenlab.activations.dump import Dump, read_dump, write_dump
from qwenlab.errors import QwenlabError

META = {"producer": "test", "model": "tiny-qwen3", "config_hash": "abc123", "dtype": "bfloat16",
        "device": "cpu", "prompt_ids": [151644, 872, 198], "versions": {"transformers": "5.23.0"},
        "seed": 7, "note": "hello"}


def sample_tensors():
    torch.manual_seed(0)
    return {"embed": torch.randn(3, 8, dtype=torch.bfloat16),
            "layers.0.attn.q_norm": torch.randn(3, 2, 4),
            "logits": torch.randn(8, 3).t()}


def test_round_trip_keeps_dtypes_values_and_metadata(tmp_path):
    tensors = sample_tensors()
    path = write_dump(tmp_path / "run.safetensors", tensors, META)
    dump = read_dump(path)
    assert isinstance(dump, Dump) and dump.path == path
    assert set(dump.tensors) == set(tensors)
    for name, tensor in tensors.items():
        assert dump.tensors[name].dtype == tensor.dtype
        assert torch.equal(dump.tensors[name], tensor)
    meta = dump.metadata
    assert meta["prompt_ids"] == [151644, 872, 198] and dump.prompt_ids == meta["prompt_ids"]
    assert meta["versions"]["transformers"] == "5.23.0" and "torch" in meta["versions"]
    assert meta["seed"] == 7 and meta["note"] == "hello"
    assert meta["model"] == "tiny-qwen3" and meta["dtype"] == "bfloat16" and meta["device"] == "cpu"
    assert datetime.fromisoformat(meta["created"]).tzinfo is not None


def test_header_metadata_is_all_strings(tmp_path):
    path = write_dump(tmp_path / "run.safetensors", sample_tensors(), META)
    with safetensors.safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata()
    assert all(isinstance(v, str) for v in raw.values())
    assert json.loads(raw["prompt_ids"]) == META["prompt_ids"]


def test_foreign_dump_with_partial_metadata(tmp_path):
    path = tmp_path / "fsharp.safetensors"
    safetensors.torch.save_file({"embed": torch.ones(2, 4)}, str(path),
                                metadata={"producer": "torchsharp", "prompt_ids": "[1, 2]"})
    dump = read_dump(path)
    assert dump.metadata == {"producer": "torchsharp", "prompt_ids": [1, 2]}
    bare = tmp_path / "bare.safetensors"
    safetensors.torch.save_file({"embed": torch.ones(2, 4)}, str(bare))
    assert read_dump(bare).metadata == {}


def test_failed_write_leaves_existing_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "run.safetensors"
    write_dump(path, sample_tensors(), META)
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        write_dump(path, {"embed": torch.zeros(2, 2)}, META)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.safetensors"]


def test_a_full_disk_is_named_in_one_line_and_the_old_dump_stays(tmp_path, monkeypatch):
    """safetensors wraps ENOSPC in its own error class, which an `except OSError` let through as a traceback."""
    path = tmp_path / "run.safetensors"
    write_dump(path, sample_tensors(), META)
    before = path.read_bytes()

    def full(tensors, filename, metadata=None):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(QwenlabError, match=r"run.safetensors: cannot be written \(.*No space left on device"):
        write_dump(path, {"embed": torch.zeros(2, 2)}, META)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.safetensors"]


def test_truncated_file_names_the_file(tmp_path):
    path = write_dump(tmp_path / "run.safetensors", sample_tensors(), META)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(QwenlabError, match="run.safetensors") as info:
        read_dump(path)
    assert "\n" not in str(info.value)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("just some text, not a header")
    with pytest.raises(QwenlabError, match="notes.safetensors"):
        read_dump(path)


def test_missing_file(tmp_path):
    with pytest.raises(QwenlabError, match="nope.safetensors"):
        read_dump(tmp_path / "nope.safetensors")
