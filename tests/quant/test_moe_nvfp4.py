"""NVFP4 on a MoE model: every expert linear quantized (torchao's numbers), the routers kept in high precision, the
checkpoint round trip in both layouts, and why transformers cannot be the quantized reference of NVFP4 experts."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenlab.activations.capture import capture_qwenlab
from qwenlab.activations.diff import diff_dumps
from qwenlab.activations.nvfp4_reference import load_reference_for, quantized_checkpoint, quantized_reference_gap
from qwenlab.activations.reference import capture_reference, load_reference
from qwenlab.memory.predict import measured_weight_bytes, quantized_weight_bytes
from qwenlab.model.loader import load
from qwenlab.model.quantize import quantize_checkpoint
from qwenlab.quant import codec
from qwenlab.quant.linear import NVFP4Linear, nvfp4_modules

nvfp4_tensor = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")


@pytest.fixture(scope="module")
def moe_nvfp4(moe_dir):
    return load(moe_dir, "float32", "cpu", quant="nvfp4")


def test_experts_quantized_routers_kept(moe_nvfp4, moe_dir):
    model, info = moe_nvfp4.model, moe_nvfp4.model.quantization
    assert info.kept == ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate", "lm_head"]
    assert len(info.quantized) == 3 * 4 + 3 + 2 * 8 * 3  # q/k/v/o everywhere, layer 0's MLP, every expert
    assert type(model.model.layers[1].mlp.gate) is torch.nn.Linear
    assert isinstance(model.model.layers[2].mlp.experts[7].down_proj, NVFP4Linear)
    source = load_file(str(Path(moe_dir) / "model.safetensors"))
    name = "model.layers.2.mlp.experts.5.up_proj"
    scale = nvfp4_tensor.per_tensor_amax_to_scale(source[f"{name}.weight"].abs().amax())
    torchao = nvfp4_tensor.NVFP4Tensor.to_nvfp4(source[f"{name}.weight"], per_tensor_scale=scale)
    assert torch.equal(model.get_submodule(name).weight, torchao.dequantize(torch.float32))
    assert measured_weight_bytes(model) == quantized_weight_bytes(model)


def test_routers_quantized_only_when_asked(moe_dir):
    model = load(moe_dir, "float32", "cpu", quant="nvfp4", exclude=["lm_head"]).model
    assert isinstance(model.model.layers[1].mlp.gate, NVFP4Linear)


def test_quantized_reference_is_transformers_on_the_dequantized_numbers(moe_nvfp4):
    """transformers cannot decode NVFP4 experts (below), so the quantized reference is its MoE forward (its own
    routing and expert loop) on qwenlab's dequantized numbers in bf16, as compressed-tensors would give them: every
    canonical tensor within bf16 rounding of the weights, so each NVFP4 expert is wired to its own weights."""
    assert "without their per-tensor global scale" in quantized_reference_gap(moe_nvfp4)
    ref = load_reference_for(moe_nvfp4, "quantized")
    expert = moe_nvfp4.model.model.layers[2].mlp.experts[6].down_proj
    assert torch.equal(ref.model.layers[2].mlp.experts.down_proj[6], expert.dequantize_weight(torch.bfloat16).float())
    ids = moe_nvfp4.tokenizer.encode("Experts in four bits, routers in thirty-two.")
    result = diff_dumps(capture_qwenlab(moe_nvfp4.model, ids), capture_reference(ref, ids), dtype="bfloat16")
    assert result.passed and result.logits["top1_agreement"] == 1.0, result.first_divergence_row


@pytest.mark.parametrize("layout", ["compressed-tensors", "modelopt"])
def test_checkpoint_round_trip(moe_nvfp4, moe_dir, tmp_path, layout):
    dst = tmp_path / layout
    summary = quantize_checkpoint(moe_dir, dst, layout, calibration_texts_n=2 if layout == "modelopt" else 0,
                                  device="cpu", dtype="float32")
    assert "model.layers.1.mlp.gate" in summary["kept"]
    reloaded = load(dst, "float32", "cpu").model
    assert reloaded.quantization.source == "checkpoint" and type(reloaded.model.layers[2].mlp.gate) is torch.nn.Linear
    for name, module in nvfp4_modules(moe_nvfp4.model).items():  # same codes and block scales; compressed-tensors
        again = reloaded.get_submodule(name)                         # stores 1 / tensor scale (one rounding)
        assert torch.equal(again.packed, module.packed) and torch.equal(again.block_scale, module.block_scale), name
        assert torch.allclose(again.weight, module.weight, rtol=2 ** -22, atol=0), name
    config = json.loads((dst / "config.json").read_text())
    if layout == "compressed-tensors":
        assert "model.layers.2.mlp.gate" in config["quantization_config"]["ignore"]


def test_transformers_drops_the_experts_global_scale(moe_nvfp4, moe_dir):
    """Pins the reason above (transformers 5.23, compressed-tensors 0.20): decompressed by transformers, a
    compressed-tensors NVFP4 expert is its codes x block scales without the per-tensor scale, while an attention
    linear is right. When this fails, transformers decompresses experts correctly: drop EXPERTS_GAP and its export."""
    from qwenlab.activations import nvfp4_reference

    with pytest.MonkeyPatch.context() as mp:  # let the export through to look at what transformers makes of it
        mp.setattr(nvfp4_reference, "quantized_reference_gap", lambda ckpt: None)
        with quantized_checkpoint(moe_nvfp4) as folder:
            ref = load_reference(folder, torch.float32)
    ours = moe_nvfp4.model.model.layers[1]
    expert = ours.mlp.experts[3].gate_proj
    theirs = ref.model.layers[1].mlp.experts.gate_up_proj[3, : expert.out_features].float()
    unscaled = codec.dequantize(expert.nvfp4(), torch.float32) / expert.tensor_scale
    assert torch.allclose(theirs, unscaled, rtol=1e-2), "the expert lacks exactly its tensor scale"
    assert torch.allclose(ref.model.layers[1].self_attn.q_proj.weight, ours.self_attn.q_proj.weight, atol=2e-3)
