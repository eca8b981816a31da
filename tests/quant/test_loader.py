"""load(..., quant=...): which linears become NVFP4, with the same module names and probe points, the numbers torchao
gives, exclusions honoured, an NVFP4 checkpoint recognised from its config, W4A4 emulation, the memory estimate."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from qwenlab.activations.capture import capture_qwenlab
from qwenlab.errors import QwenlabError
from qwenlab.memory.predict import measured_weight_bytes, quantized_weight_bytes, weight_bytes
from qwenlab.model.loader import load, load_model
from qwenlab.quant.linear import NVFP4Linear, nvfp4_modules

nvfp4_tensor = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")

IDS = [785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13]


def torchao_dequantized(weight: torch.Tensor) -> torch.Tensor:
    scale = nvfp4_tensor.per_tensor_amax_to_scale(weight.float().abs().amax())
    return nvfp4_tensor.NVFP4Tensor.to_nvfp4(weight, per_tensor_scale=scale).dequantize(torch.float32)


def test_quantized_at_load_keeps_names_and_probe_points(tiny, tiny_nvfp4, tiny_dir):
    model, info = tiny_nvfp4.model, tiny_nvfp4.model.quantization
    assert info.source == "quantized at load" and info.kept == ["lm_head"] and len(info.quantized) == 28
    assert info.activations == "w4a16" and info.kernel == "dequantize"
    assert isinstance(model.model.layers[0].self_attn.q_proj, NVFP4Linear)
    assert isinstance(model.model.layers[3].mlp.down_proj, NVFP4Linear)
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    dense, quantized = capture_qwenlab(tiny.model, IDS), capture_qwenlab(model, IDS)
    assert list(dense) == list(quantized)
    assert torch.equal(dense["layers.0.input_layernorm"], quantized["layers.0.input_layernorm"])
    assert not torch.equal(dense["layers.0.attn.q_proj"], quantized["layers.0.attn.q_proj"])
    source = load_file(str(Path(tiny_dir) / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.2.mlp.gate_proj"):
        assert torch.equal(model.get_submodule(name).weight, torchao_dequantized(source[f"{name}.weight"]))


def test_forward_is_a_dense_forward_on_the_dequantized_weights(tiny_dir, tiny_nvfp4):
    dense = load_model(tiny_dir, "float32", "cpu")
    with torch.no_grad():
        for name, module in nvfp4_modules(tiny_nvfp4.model).items():
            dense.get_submodule(name).weight.copy_(module.weight)
    ids = torch.tensor(IDS)
    assert torch.allclose(dense(ids), tiny_nvfp4.model(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("exclude, kept", [
    (["lm_head", "model.layers.0.*"], 8),
    (["re:.*mlp\\.down_proj$", "lm_head"], 5),
    (["lm_head", "model.layers.3.self_attn.q_proj"], 2),
    ([], 0),
])
def test_exclusions(tiny_dir, exclude, kept):
    model = load_model(tiny_dir, "float32", "cpu", quant="nvfp4", exclude=exclude)
    assert len(model.quantization.kept) == kept
    for name in model.quantization.kept:
        assert type(model.get_submodule(name)) is torch.nn.Linear
    if not exclude:  # the tied head gets its own quantized copy of the embedding
        assert isinstance(model.lm_head, NVFP4Linear) and model.lm_head.out_features == 151936


def test_untied_sharded_checkpoint(untied_dir):
    model = load_model(untied_dir, "float32", "cpu", quant="nvfp4")
    assert len(model.quantization.quantized) == 21 and model.quantization.kept == ["lm_head"]
    assert torch.isfinite(model(torch.tensor(IDS))).all()


def test_nvfp4_checkpoint_is_recognised_and_none_dequantizes_it(nvfp4_dirs, tiny_nvfp4):
    for folder in nvfp4_dirs.values():
        ckpt = load(folder, "float32", "cpu")  # no flag: the config says NVFP4
        assert ckpt.model.quantization.source == "checkpoint"
        dense = load_model(folder, "float32", "cpu", quant="none")
        assert getattr(dense, "quantization", None) is None
        assert type(dense.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        assert torch.allclose(dense.model.layers[0].self_attn.q_proj.weight,
                              tiny_nvfp4.model.model.layers[0].self_attn.q_proj.weight, rtol=2 ** -22, atol=0)


def test_w4a4_emulation_quantizes_activations_as_torchao(tiny_dir):
    model = load_model(tiny_dir, "float32", "cpu", quant="nvfp4-w4a4")
    assert model.quantization.activations == "w4a4" and model.quantization.kernel == "emulate-w4a4"
    q_proj = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 64)
    flat = x.reshape(-1, 64)
    scale = nvfp4_tensor.per_tensor_amax_to_scale(flat.abs().amax())
    x_fq = nvfp4_tensor.NVFP4Tensor.to_nvfp4(flat, per_tensor_scale=scale).dequantize(torch.float32)
    expected = F.linear(x_fq, q_proj.weight).reshape(3, 5, -1)
    assert torch.equal(q_proj(x), expected)
    w4a16 = load_model(tiny_dir, "float32", "cpu", quant="nvfp4")
    ids = torch.tensor(IDS)
    assert not torch.equal(model(ids), w4a16(ids))


def test_memory_estimate_matches_the_load(tiny_nvfp4, tiny_dir, nvfp4_dirs):
    model = tiny_nvfp4.model
    assert measured_weight_bytes(model) == quantized_weight_bytes(model)
    assert quantized_weight_bytes(model) == weight_bytes(model.config, "nvfp4", base_dtype="float32")["total"]
    calibrated = load_model(nvfp4_dirs["modelopt"], "float32", "cpu")  # + one fp32 input scale per linear
    assert measured_weight_bytes(calibrated) == quantized_weight_bytes(calibrated)
    head = load_model(tiny_dir, "float32", "cpu", quant="nvfp4", exclude=[])
    assert measured_weight_bytes(head) == quantized_weight_bytes(head)
    dense = load_model(tiny_dir, "float32", "cpu")
    linears = sum(m.weight.numel() * 4 for m in dense.modules() if type(m) is torch.nn.Linear) - 151936 * 64 * 4
    saved = measured_weight_bytes(dense) - measured_weight_bytes(model)
    assert saved / linears == pytest.approx(1 - 4.5 / 32, abs=0.01)  # 32-bit weights -> 4.5 bits


def test_bad_quant_value(tiny_dir):
    with pytest.raises(QwenlabError, match="--quant 'int4'"):
        load_model(tiny_dir, "float32", "cpu", quant="int4")
