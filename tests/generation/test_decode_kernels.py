"""The decode engine's kernel routing on the CPU (qwenlab.generation.kernels): which linears of a one-token step
go to one NVFP4 GEMV launch together, and that their outputs come back split in order; the step's RoPE table and
where its final norm stays the module. The Triton kernels themselves are tested against float64 in
tests/quant/test_triton_nvfp4.py and tests/generation/test_fused_layer.py; here stand-ins record the calls."""
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from qwenlab.generation.kernels import DecodeKernels
from qwenlab.model.projection import project_parts
from qwenlab.quant import codec
from qwenlab.quant.linear import NVFP4Linear, plain_w4a16


def nvfp4_linear(n: int, k: int, seed: int, kernel: str = "triton") -> NVFP4Linear:
    gen = torch.Generator().manual_seed(seed)
    return NVFP4Linear.from_weight(codec.quantize(torch.randn(n, k, generator=gen) * 0.02), kernel=kernel)


class Recorder:
    """Stands in for nvfp4_gemv_parts: x times each dequantized weight, concatenated; remembers each call's rows."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, packed, block_scale, tensor_scale):
        self.calls.append([p.shape[0] for p in packed])
        weights = [codec.dequantize(codec.NVFP4Weight(p, s, t), x.dtype)
                   for p, s, t in zip(packed, block_scale, tensor_scale)]
        return torch.cat([F.linear(x, w) for w in weights], dim=-1)


def kernels_with(recorder) -> DecodeKernels:
    return DecodeKernels(attend=None, nvfp4_parts=recorder)


def test_q_k_v_go_to_one_launch_and_come_back_split_in_order():
    q, k, v = nvfp4_linear(64, 32, 0), nvfp4_linear(16, 32, 1), nvfp4_linear(16, 32, 2)
    x = torch.randn(1, 1, 32)
    recorder = Recorder()
    outs = project_parts((q, k, v), x, kernels_with(recorder))
    assert recorder.calls == [[64, 16, 16]]
    for out, module in zip(outs, (q, k, v)):
        assert out.shape == (1, 1, module.out_features)
        torch.testing.assert_close(out, F.linear(x, module.dequantize_weight(x.dtype)))


@dataclass(frozen=True)
class OneByOne(DecodeKernels):
    """Records the modules `linear` gets one by one (instead of running them: a Triton-kernel NVFP4Linear needs
    CUDA)."""
    alone: list = field(default_factory=list)

    def linear(self, module, x):
        self.alone.append(module)
        return torch.zeros(*x.shape[:-1], module.out_features)


def test_anything_else_goes_one_by_one():
    """More than one row (prefill), a dense linear among them, a bias, the torch kernel, or a forward hook (a planted
    bug reads the weight its own way) -> each module on its own, through `linear`, as its forward would."""
    x1, x3 = torch.randn(1, 1, 32), torch.randn(1, 3, 32)
    hooked = nvfp4_linear(16, 32, 3)
    hooked.register_forward_hook(lambda module, args, out: out * 0)
    with_bias = NVFP4Linear.from_weight(codec.quantize(torch.randn(16, 32)), bias=torch.randn(16), kernel="triton")
    dense = torch.nn.Linear(32, 16, bias=False)
    cases = [((nvfp4_linear(16, 32, 4), nvfp4_linear(16, 32, 5)), x3),
             ((nvfp4_linear(16, 32, 4), dense), x1),
             ((nvfp4_linear(16, 32, 4), with_bias), x1),
             ((nvfp4_linear(16, 32, 4, kernel="dequantize"), nvfp4_linear(16, 32, 5)), x1),
             ((nvfp4_linear(16, 32, 4), hooked), x1)]
    for modules, x in cases:
        recorder = Recorder()
        kernels = OneByOne(attend=None, nvfp4_parts=recorder)
        outs = project_parts(modules, x, kernels)
        assert recorder.calls == [] and kernels.alone == list(modules)
        assert [o.shape[-1] for o in outs] == [m.out_features for m in modules]
    assert not plain_w4a16(hooked) and not plain_w4a16(with_bias) and not plain_w4a16(dense)
    assert plain_w4a16(nvfp4_linear(16, 32, 4)) and not plain_w4a16(nvfp4_linear(16, 32, 4, "dequantize"))


def test_the_step_gathers_rope_from_a_table_of_the_same_values():
    """With the fused layers the engine's step reads cos/sin from a table of every cache slot's, made once by the
    model's own Rotary: bit-identical to computing them at those positions, one table per cache length and dtype."""
    from qwenlab.model.qwen3 import Rotary

    rotary = Rotary(128, 1_000_000.0)
    kernels = DecodeKernels(attend=None, fused=object())  # any fused layers: only whether there are some matters
    for dtype in (torch.bfloat16, torch.float32):
        for positions in (torch.tensor([0]), torch.tensor([511]), torch.arange(37, 40)):
            cos, sin = kernels.rotary(rotary, positions, dtype, 512)
            want_cos, want_sin = rotary(positions, dtype)
            assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin) and cos.dtype == dtype
    assert {k[:2] for k in kernels.tables} == {(512, torch.float32), (512, torch.bfloat16)}
    unfused = DecodeKernels(attend=None)
    assert all(torch.equal(a, b) for a, b in zip(unfused.rotary(rotary, torch.tensor([5]), torch.float32, 512),
                                                  rotary(torch.tensor([5]), torch.float32)))
    assert not unfused.tables


def test_the_steps_final_norm_runs_the_module_where_the_kernel_does_not_fit():
    """DecodeKernels.norm leaves the module to run (so its hooks and dtype rules hold) without fused layers, for more
    than one token, for a weight in another dtype, and when a hook is on the norm or global; the kernel itself is
    tested against the module in tests/generation/test_fused_layer.py."""
    from qwenlab.model.qwen3 import RMSNorm

    norm = RMSNorm(32, 1e-6)
    kernels = DecodeKernels(attend=None, fused=object())  # any fused layers: reaching them would fail on .add_norm
    x1, x3 = torch.randn(1, 1, 32), torch.randn(1, 3, 32)
    assert torch.equal(DecodeKernels(attend=None).norm(norm, x1), norm(x1))
    assert torch.equal(kernels.norm(norm, x3), norm(x3))
    assert torch.equal(kernels.norm(norm, x1.double()), norm(x1.double()))
    handle = norm.register_forward_hook(lambda module, args, out: out * 2)
    assert torch.equal(kernels.norm(norm, x1), 2 * RMSNorm(32, 1e-6)(x1))
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: out * 3)
    try:
        assert torch.equal(kernels.norm(norm, x1), 3 * RMSNorm(32, 1e-6).forward(x1))
    finally:
        handle.remove()
    with pytest.raises(AttributeError):
        kernels.norm(norm, x1)  # it fits: the (stand-in) fused layers' kernel is asked for
