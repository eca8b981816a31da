"""--quant on the commands that load a model, and capture's two references for an NVFP4 model."""
import json
import tempfile
from pathlib import Path

import pytest

from qwenlab.activations.dump import read_dump
from qwenlab.cli import main

pytest.importorskip("compressed_tensors")


def test_generate_with_quant(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "Hello", "--max-new-tokens", "4", "--quant",
                 "nvfp4", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "kernel dequantize" in captured.err and "28 linears quantized" in captured.err
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "Hello", "--max-new-tokens", "4", "--quant",
                 "nvfp4-w4a4", "--json", "--device", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out)["ids"]) == 4


def test_capture_against_both_references(tiny_dir, nvfp4_dirs, tmp_path, capsys):
    paths = {}
    for impl, reference in (("qwenlab", "quantized"), ("reference", "quantized"), ("reference", "unquantized")):
        paths[impl, reference] = out = tmp_path / f"{impl}-{reference}.safetensors"
        assert main(["capture", "--model", str(tiny_dir), "--quant", "nvfp4", "--prompt", "Hello there, friend",
                     "--impl", impl, "--reference", reference, "--out", str(out), "--device", "cpu"]) == 0
    meta = read_dump(paths["reference", "quantized"]).metadata
    assert meta["reference"] == "quantized" and meta["quantization"].startswith("nvfp4")
    cand = str(paths["qwenlab", "quantized"])
    capsys.readouterr()
    # against the same NVFP4 numbers: within the bfloat16 floors (transformers dequantizes through bfloat16); the
    # dumps say they are NVFP4 (metadata `quantized`), so no --dtype flag is needed
    assert read_dump(cand).metadata["quantized"] == "nvfp4"
    assert main(["diff", cand, str(paths["reference", "quantized"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dtype"] == "bfloat16"
    # against the unquantized model: NVFP4 noise is over the bfloat16 floors
    assert main(["diff", cand, str(paths["reference", "unquantized"]), "--json"]) == 1
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["first_divergence"] is not None
    # an NVFP4 checkpoint: its unquantized reference is the checkpoint it came from
    out = tmp_path / "modelopt-unquantized.safetensors"
    assert main(["capture", "--model", nvfp4_dirs["modelopt"], "--prompt", "Hello there, friend", "--impl",
                 "reference", "--reference", "unquantized", "--unquantized-model", str(tiny_dir), "--out", str(out),
                 "--device", "cpu"]) == 0
    same = read_dump(out).tensors["logits"]
    assert same.equal(read_dump(paths["reference", "unquantized"]).tensors["logits"])


def test_modelopt_checkpoint_quantized_reference_goes_through_the_converter(nvfp4_dirs, tmp_path):
    temp_folders = set(Path(tempfile.gettempdir()).glob("qwenlab-nvfp4-reference-*"))
    outs = {}
    for fmt, folder in nvfp4_dirs.items():
        outs[fmt] = tmp_path / f"{fmt}.safetensors"
        assert main(["capture", "--model", folder, "--prompt", "Hello there", "--impl", "reference", "--out",
                     str(outs[fmt]), "--device", "cpu"]) == 0
    a, b = (read_dump(p).tensors["logits"] for p in outs.values())
    # the converter keeps ModelOpt's 0-d global scales, with which compressed-tensors divides in bfloat16 (a [1]
    # tensor promotes to float32): the two references differ by bfloat16 rounding, not more
    assert 0 < ((a - b).norm() / b.norm()).item() < 0.02
    # the converted copy went to a temp folder (never the model's), removed once transformers had loaded it
    assert set(Path(tempfile.gettempdir()).glob("qwenlab-nvfp4-reference-*")) == temp_folders
    assert sorted(p.name for p in Path(nvfp4_dirs["modelopt"]).iterdir()) == sorted(
        ["config.json", "generation_config.json", "hf_quant_config.json", "merges.txt", "model.safetensors",
         "tokenizer.json", "tokenizer_config.json", "vocab.json"])


def test_stress_with_quant(tiny_dir, capsys):
    assert main(["stress", "--model", str(tiny_dir), "--quant", "nvfp4", "--iterations", "1", "--turns", "1",
                 "--strategies", "session", "--max-new-tokens", "2", "--warmup", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["spec"]["quant"] == "nvfp4"
