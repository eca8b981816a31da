"""`qwenlab quantize SRC DST`: a complete checkpoint (config, tokenizer, generation config, quant config, shards) that
qwenlab and transformers load again; exclusions; conversion between layouts; atomic writes."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenlab.activations.reference import load_reference
from qwenlab.cli import main
from qwenlab.model.loader import load, load_model
from qwenlab.quant import writer

pytest.importorskip("compressed_tensors")
IDS = [785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13]


def files(folder) -> dict:
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out |= load_file(str(path))
    return out


def rel_l2(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_complete_checkpoint(tiny_dir, tmp_path, capsys):
    dst = tmp_path / "q"
    assert main(["quantize", str(tiny_dir), str(dst), "--device", "cpu"]) == 0
    assert "wrote compressed-tensors NVFP4 checkpoint" in capsys.readouterr().out
    names = {p.name for p in dst.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
            "merges.txt", "model.safetensors"} <= names
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors" and config["model_type"] == "qwen3"
    assert (dst / "generation_config.json").read_text() == (Path(tiny_dir) / "generation_config.json").read_text()
    scales = [t for n, t in files(dst).items() if n.endswith("input_global_scale")]
    assert len(scales) == 28 and all(torch.isfinite(s).all() and (s > 0).all() for s in scales)


def test_refuses_a_non_empty_destination(tiny_dir, tmp_path, capsys):
    dst = tmp_path / "full"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["quantize", str(tiny_dir), str(dst), "--device", "cpu"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_a_failed_write_leaves_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(writer, "save_file", failing_save)
    dst = tmp_path / "out" / "q"
    assert main(["quantize", str(tiny_dir), str(dst), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert "OSError: disk full" in err and "\n" not in err  # one line, no traceback
    assert calls and not dst.exists() and list((tmp_path / "out").iterdir()) == []


def test_sharded_when_large(tiny_dir, tmp_path, tiny_nvfp4):
    dst = tmp_path / "sharded"
    assert main(["quantize", str(tiny_dir), str(dst), "--device", "cpu", "--format", "modelopt",
                 "--max-shard-size", "20MB"]) == 0
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2 and len(list(dst.glob("model-*.safetensors"))) == 2
    model = load_model(dst, "float32", "cpu")
    for name in model.quantization.quantized:
        assert torch.equal(model.get_submodule(name).weight, tiny_nvfp4.model.get_submodule(name).weight)


def test_layouts_convert_into_each_other(nvfp4_dirs, tmp_path):
    dst = tmp_path / "converted"
    assert main(["quantize", nvfp4_dirs["modelopt"], str(dst), "--format", "compressed-tensors",
                 "--device", "cpu"]) == 0
    ours, direct = files(dst), files(nvfp4_dirs["compressed-tensors"])
    assert set(ours) == set(direct)
    for name, t in direct.items():
        assert torch.equal(ours[name].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else ours[name],
                           t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t), name


def test_exclusions_are_written_and_honoured_by_transformers(untied_dir, tmp_path):
    dst = tmp_path / "excluded"
    assert main(["quantize", str(untied_dir), str(dst), "--device", "cpu", "--exclude", "lm_head",
                 "model.layers.0.*", "re:.*down_proj$"]) == 0
    ignore = json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]
    assert "lm_head" in ignore and "model.layers.0.self_attn.q_proj" in ignore
    assert "model.layers.2.mlp.down_proj" in ignore and len(ignore) == 1 + 7 + 2
    ckpt = load(dst, "float32", "cpu")
    assert sorted(ckpt.model.quantization.kept) == sorted(ignore)
    assert type(ckpt.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    ref = load_reference(dst, torch.float32, "cpu")
    source = load_file(str(next(Path(untied_dir).glob("model-*.safetensors"))))
    name = next(n for n in source if n.startswith("model.layers.0.") and n.endswith("proj.weight"))
    module = ref.get_submodule(name.removesuffix(".weight"))
    assert torch.equal(module.weight.detach(), source[name])  # excluded: the source's values, not quantized
    assert rel_l2(ckpt.model(torch.tensor(IDS))[0], ref(torch.tensor([IDS])).logits[0]) < 0.02


def test_quantized_head_of_a_tied_model(tiny_dir, tmp_path):
    dst = tmp_path / "head"
    assert main(["quantize", str(tiny_dir), str(dst), "--device", "cpu", "--exclude"]) == 0
    config = json.loads((dst / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["ignore"] == []
    ckpt = load(dst, "float32", "cpu")
    assert "lm_head" in ckpt.model.quantization.quantized
    ref = load_reference(dst, torch.float32, "cpu")
    assert rel_l2(ckpt.model(torch.tensor(IDS))[0], ref(torch.tensor([IDS])).logits[0]) < 0.02


def test_modelopt_without_calibration_is_refused(tiny_dir, tmp_path, capsys):
    dst = tmp_path / "nocal"
    assert main(["quantize", str(tiny_dir), str(dst), "--format", "modelopt", "--calibrate", "0",
                 "--device", "cpu"]) == 2
    assert "input_scale" in capsys.readouterr().err and not dst.exists()
    assert main(["quantize", str(tiny_dir), str(dst), "--calibrate", "0", "--device", "cpu"]) == 0
    group = json.loads((dst / "config.json").read_text())["quantization_config"]["config_groups"]["config_group_0"]
    assert group["input_activations"] is None  # weights only: the NVFP4A16 scheme
