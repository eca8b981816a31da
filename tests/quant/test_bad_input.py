"""Bad NVFP4 input: one line `qwenlab CMD: error: ...` naming the file or tensor at fault, exit 2, nothing written."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenlab.activations.dump import read_metadata
from qwenlab.cli import main
from qwenlab.model import tiny

Q = "model.layers.0.self_attn.q_proj"


def copy_of(folder, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def rewrite(folder: Path, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_json(path: Path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def run(capsys, tmp_path, *argv) -> str:
    """`qwenlab capture --impl qwenlab --prompt hi --out <tmp>/dump.safetensors` (or argv as given for the other
    commands and for `capture --impl ...`): the one-line error, nothing written."""
    out = tmp_path / "dump.safetensors"
    if argv[0] == "capture" and "--impl" not in argv:
        argv = (*argv, "--impl", "qwenlab", "--prompt", "hi", "--out", str(out))
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"qwenlab {argv[0]}: error:"), err
    assert not out.exists()
    return err


@pytest.fixture
def modelopt(nvfp4_dirs, tmp_path):
    return copy_of(nvfp4_dirs["modelopt"], tmp_path / "modelopt")


@pytest.fixture
def compressed(nvfp4_dirs, tmp_path):
    return copy_of(nvfp4_dirs["compressed-tensors"], tmp_path / "ct")


def test_block_scale_shape(modelopt, capsys, tmp_path):
    rewrite(modelopt, lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"].repeat(1, 2)}))
    err = run(capsys, tmp_path, "capture", "--model", str(modelopt))
    assert f"{Q}.weight_scale has shape [128, 8], expected [N, K/16] = [128, 4]" in err


def test_block_scale_dtype(compressed, capsys, tmp_path):
    rewrite(compressed, lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"].float()}))
    err = run(capsys, tmp_path, "capture", "--model", str(compressed))
    assert f"{Q}.weight_scale has dtype float32" in err and "float8_e4m3fn" in err


@pytest.mark.parametrize("layout, name", [("modelopt", "weight_scale_2"), ("ct", "weight_global_scale")])
def test_missing_tensor_scale(nvfp4_dirs, tmp_path, capsys, layout, name):
    folder = copy_of(nvfp4_dirs["modelopt" if layout == "modelopt" else "compressed-tensors"], tmp_path / layout)
    rewrite(folder, lambda t: t.pop(f"{Q}.{name}"))
    err = run(capsys, tmp_path, "capture", "--model", str(folder))
    assert f"{Q}.{name} (the per-tensor scale) is missing" in err


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["quantization"].update(quant_algo="FP8"), "quant_algo 'FP8' is not NVFP4"),
    (lambda d: d["quantization"].update(group_size=32), "group_size 32 is not NVFP4's 16"),
])
def test_hf_quant_config_naming_another_algorithm(modelopt, tmp_path, capsys, edit, needle):
    (modelopt / "config.json").write_text(json.dumps({k: v for k, v in json.loads(
        (modelopt / "config.json").read_text()).items() if k != "quantization_config"}))
    edit_json(modelopt / "hf_quant_config.json", edit)
    err = run(capsys, tmp_path, "capture", "--model", str(modelopt))
    assert needle in err and "hf_quant_config.json" in err


@pytest.mark.parametrize("edit, needle", [
    (lambda q: q.update(quant_method="gptq"), "quant_method 'gptq' is not NVFP4"),
    (lambda q: q.update(format="float-quantized") or q["config_groups"]["config_group_0"].update(
        format="float-quantized"), "is not NVFP4 ('nvfp4-pack-quantized'"),
])
def test_config_json_naming_another_algorithm(compressed, tmp_path, capsys, edit, needle):
    edit_json(compressed / "config.json", lambda d: edit(d["quantization_config"]))
    err = run(capsys, tmp_path, "generate", "--model", str(compressed), "--prompt", "hi")
    assert needle in err and "config.json" in err


def test_a_layout_mixing_both_conventions(modelopt, compressed, tmp_path, capsys):
    rewrite(modelopt, lambda t: t.update({f"{Q}.weight_global_scale": 1 / t.pop(f"{Q}.weight_scale_2")}))
    err = run(capsys, tmp_path, "capture", "--model", str(modelopt))
    assert "mixes both conventions" in err and f"{Q}.weight_global_scale" in err
    shutil.copyfile(modelopt / "hf_quant_config.json", compressed / "hf_quant_config.json")
    err = run(capsys, tmp_path, "capture", "--model", str(compressed))
    assert "mixes both conventions" in err and "compressed-tensors" in err and "modelopt" in err


@pytest.fixture
def k40(tmp_path, monkeypatch):
    """A Qwen3 whose hidden size (the K of q/k/v/gate/up) is 40: not a multiple of 16."""
    monkeypatch.setitem(tiny.PRESETS, "k40", {**tiny.PRESETS["tiny"], "hidden_size": 40, "num_hidden_layers": 1})
    return tiny.write_checkpoint(tmp_path / "k40", "k40")


def test_k_not_a_multiple_of_16_stays_in_high_precision(k40, tmp_path, capsys):
    """A valid checkpoint never errors: the linears NVFP4 cannot hold (K = 40) stay dense and the summary says so."""
    dump = tmp_path / "k40.safetensors"
    assert main(["capture", "--model", str(k40), "--quant", "nvfp4", "--prompt", "The quick brown fox jumps",
                 "--impl", "qwenlab", "--out", str(dump)]) == 0
    summary = read_metadata(dump)["quantization"]
    assert "2 linears quantized" in summary and "(5 of them because K is not a multiple of 16)" in summary
    dst = tmp_path / "k40-nvfp4"
    assert main(["quantize", str(k40), str(dst), "--device", "cpu"]) == 0
    ignored = json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]
    assert Q in ignored and "model.layers.0.self_attn.o_proj" not in ignored


def test_bad_quant_and_reference_flags(tiny_dir, tmp_path, capsys):
    err = run(capsys, tmp_path, "generate", "--model", str(tiny_dir), "--prompt", "hi", "--quant", "fp4")
    assert "--quant: invalid choice: 'fp4'" in err
    assert main(["capture", "--model", str(tiny_dir), "--prompt", "hi", "--impl", "reference", "--reference", "bf16",
                 "--out", str(tmp_path / "x.safetensors")]) == 2  # a usage error: one line, exit 2
    assert not (tmp_path / "x.safetensors").exists()
    err = capsys.readouterr().err.strip()
    assert "--reference: invalid choice: 'bf16'" in err and "\n" not in err


def test_unquantized_reference_of_an_nvfp4_checkpoint_needs_the_source(nvfp4_dirs, tmp_path, capsys):
    err = run(capsys, tmp_path, "capture", "--model", str(nvfp4_dirs["modelopt"]), "--impl", "reference",
              "--reference", "unquantized", "--prompt", "hi", "--out", str(tmp_path / "dump.safetensors"))
    assert "--unquantized-model" in err


def test_nonfinite_weight_is_refused_at_load(tiny_dir, tmp_path, capsys):
    folder = copy_of(tiny_dir, tmp_path / "nan")
    rewrite(folder, lambda t: t[f"{Q}.weight"].__setitem__((0, 0), float("nan")))
    err = run(capsys, tmp_path, "capture", "--model", str(folder), "--quant", "nvfp4")
    assert f"{Q}.weight: holds NaN or infinite values" in err
    assert torch.isnan(load_file(str(folder / "model.safetensors"))[f"{Q}.weight"]).any()


def test_a_disk_without_room_is_said_before_writing(tiny_dir, tmp_path, capsys, monkeypatch):
    """notebook 06 on the Qwen3-32B shape exported its quantized reference into a temp folder on a full disk and
    stopped on safetensors' 'No space left on device' traceback: now one line naming the folder, nothing left."""
    from collections import namedtuple

    from qwenlab.quant import writer

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    dst = tmp_path / "new" / "q"  # its folder is not created to ask
    err = run(capsys, tmp_path, "quantize", str(tiny_dir), str(dst), "--device", "cpu")
    assert f"{dst}: not enough disk space to write this checkpoint" in err
    assert "0.0 GB free in" in err and "TMPDIR" in err
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_disk_that_fills_up_while_writing_is_said_in_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    from qwenlab.quant import writer

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(writer, "save_file", full)
    dst = tmp_path / "q"
    err = run(capsys, tmp_path, "quantize", str(tiny_dir), str(dst), "--device", "cpu")
    assert f"{dst}: not enough disk space to write this checkpoint" in err
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
