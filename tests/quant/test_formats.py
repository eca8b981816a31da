"""The two checkpoint layouts `qwenlab quantize` writes, read back by independent code: torchao (the numbers),
compressed-tensors (its config model, its NVFP4 decompressor, its ModelOpt -> compressed-tensors converter) and
transformers (which loads compressed-tensors NVFP4 checkpoints)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("compressed_tensors")
nvfp4_tensor = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")

from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.entrypoints.convert import ModelOptNvfp4Converter, convert_checkpoint  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

PROJ = "model.layers.1.mlp.down_proj"


def tensors(folder) -> dict:
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out |= load_file(str(path))
    return out


def source_weights(tiny_dir) -> dict:
    return load_file(str(Path(tiny_dir) / "model.safetensors"))


def torchao_of(weight: torch.Tensor):
    scale = nvfp4_tensor.per_tensor_amax_to_scale(weight.float().abs().amax())
    return nvfp4_tensor.NVFP4Tensor.to_nvfp4(weight, per_tensor_scale=scale)


def quantized_modules(files: dict, packed_name: str) -> list[str]:
    return sorted(name[: -len(packed_name) - 1] for name in files if name.endswith("." + packed_name))


def test_modelopt_tensors_are_torchao_bit_for_bit(nvfp4_dirs, tiny_dir):
    files, source = tensors(nvfp4_dirs["modelopt"]), source_weights(tiny_dir)
    modules = quantized_modules(files, "weight_scale_2")
    assert len(modules) == 28 and "lm_head.weight" not in files
    for module in modules:
        ref = torchao_of(source[f"{module}.weight"])
        assert files[f"{module}.weight"].dtype == torch.uint8
        assert torch.equal(files[f"{module}.weight"], ref.qdata), module
        assert torch.equal(files[f"{module}.weight_scale"].view(torch.uint8), ref.scale.view(torch.uint8)), module
        assert files[f"{module}.weight_scale_2"].shape == () and files[f"{module}.input_scale"].shape == ()
        assert torch.equal(files[f"{module}.weight_scale_2"], ref.per_tensor_scale), module
    assert torch.equal(files["model.embed_tokens.weight"], source["model.embed_tokens.weight"])
    hf = json.loads((Path(nvfp4_dirs["modelopt"]) / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "NVFP4" and hf["group_size"] == 16 and hf["exclude_modules"] == ["lm_head"]


def test_compressed_tensors_config_and_decompression_by_compressed_tensors(nvfp4_dirs, tiny_dir):
    folder = Path(nvfp4_dirs["compressed-tensors"])
    config = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    scheme = next(iter(config.config_groups.values()))
    assert config.format == "nvfp4-pack-quantized" and config.ignore == ["lm_head"]
    assert scheme.weights.num_bits == 4 and scheme.weights.group_size == 16 and scheme.input_activations is not None
    files, source = tensors(folder), source_weights(tiny_dir)
    modules = quantized_modules(files, "weight_packed")
    assert len(modules) == 28
    for module in modules:
        state = {k: files[f"{module}.{k}"] for k in ("weight_packed", "weight_scale", "weight_global_scale")}
        decompressed = NVFP4PackedCompressor.decompress(state, scheme)["weight"]
        expected = torchao_of(source[f"{module}.weight"]).dequantize(torch.float32)
        # compressed-tensors dequantizes in bfloat16 and divides by the global scale: one bfloat16 ulp at most
        assert torch.allclose(decompressed.float(), expected, rtol=2 ** -8, atol=0), module
        assert files[f"{module}.weight_global_scale"].shape == (1,)
        assert files[f"{module}.input_global_scale"].shape == (1,)


def test_compressed_tensors_packs_the_same_nibbles(nvfp4_dirs, tiny_dir):
    """compressed-tensors' own quantize-and-pack, given the same scales, writes (nearly) the same bytes: the nibble
    order and the code table agree. It divides where torchao multiplies by a reciprocal, so a value within an ulp of
    a rounding boundary may land one code apart."""
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4

    files, source = tensors(nvfp4_dirs["compressed-tensors"]), source_weights(tiny_dir)
    total = differ = 0
    for module in quantized_modules(files, "weight_packed"):
        ours = files[f"{module}.weight_packed"]
        theirs = quantize_and_pack_fp4(source[f"{module}.weight"], files[f"{module}.weight_scale"].float(),
                                       global_scale=files[f"{module}.weight_global_scale"])
        total += ours.numel() * 2
        differ += int(((ours & 0xF) != (theirs & 0xF)).sum() + ((ours >> 4) != (theirs >> 4)).sum())
    assert differ / total < 1e-3, f"{differ} of {total} codes differ"


def test_modelopt_converted_by_compressed_tensors_equals_our_compressed_tensors(nvfp4_dirs, tmp_path):
    converted = tmp_path / "converted"
    convert_checkpoint(str(nvfp4_dirs["modelopt"]), str(converted),
                       ModelOptNvfp4Converter(ignore=["lm_head"], targets=["Linear"]), max_workers=1, device="cpu")
    theirs, ours = tensors(converted), tensors(nvfp4_dirs["compressed-tensors"])
    assert set(theirs) == set(ours)

    def bits(t):
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    for name, t in ours.items():  # the converter keeps ModelOpt's scalar shape where llm-compressor writes [1]
        assert torch.equal(bits(theirs[name]).reshape(t.shape), bits(t)), name


def test_qwenlab_reloads_both_layouts_to_the_same_numbers(nvfp4_dirs, tiny_nvfp4):
    from qwenlab.model.loader import load

    at_load = dict(tiny_nvfp4.model.named_modules())
    for fmt, folder in nvfp4_dirs.items():
        ckpt = load(folder, "float32", "cpu")
        info = ckpt.model.quantization
        assert info.source == "checkpoint" and info.layout == fmt and info.kept == ["lm_head"]
        for name in info.quantized:
            ours, again = at_load[name], ckpt.model.get_submodule(name)
            assert torch.equal(ours.packed, again.packed) and torch.equal(ours.block_scale.view(torch.uint8),
                                                                          again.block_scale.view(torch.uint8))
            if fmt == "modelopt":
                assert torch.equal(ours.tensor_scale, again.tensor_scale)
                assert torch.equal(ours.weight, again.weight)
            else:  # the file holds 1/s in float32: s comes back within one float32 ulp
                assert torch.allclose(ours.tensor_scale, again.tensor_scale, rtol=2 ** -23, atol=0)
                assert torch.allclose(ours.weight, again.weight, rtol=2 ** -22, atol=0)


def test_transformers_loads_our_compressed_tensors_checkpoint(nvfp4_dirs, tiny_dir, tiny_nvfp4):
    from qwenlab.activations.reference import load_reference

    ref = load_reference(nvfp4_dirs["compressed-tensors"], torch.float32, "cpu")
    source = source_weights(tiny_dir)
    weight = ref.model.layers[1].mlp.down_proj.weight.detach()
    expected = torchao_of(source[f"{PROJ}.weight"]).dequantize(torch.float32)
    assert torch.allclose(weight, expected, rtol=2 ** -8, atol=0)
    ids = tiny_nvfp4.tokenizer.encode("The lighthouse on the northern point had been dark for eleven years.")
    ours = tiny_nvfp4.model(torch.tensor(ids))[0]
    theirs = ref(torch.tensor([ids])).logits[0]
    assert ((ours - theirs).norm() / theirs.norm()).item() < 0.02
