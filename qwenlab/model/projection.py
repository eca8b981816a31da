"""The linears of the forward: which class each one is (decided at construction) and how a call multiplies."""
import torch
import torch.nn.functional as F
from torch import nn

from qwenlab.quant.linear import NVFP4Linear, QuantInfo, multiply_parts, plain_w4a16


def make_linear(name: str, in_features: int, out_features: int, bias: bool, quant: QuantInfo | None) -> nn.Module:
    """nn.Linear, or NVFP4Linear when the loader's QuantInfo lists `name` (an HF module name) as quantized."""
    if quant is not None and name in quant.quantized:
        return NVFP4Linear(in_features, out_features, bias, has_input_scale=name in quant.input_scales,
                           activations=quant.activations, kernel=quant.kernel)
    return nn.Linear(in_features, out_features, bias=bias)


def project(linear: nn.Module, x: torch.Tensor, kernels) -> torch.Tensor:
    """linear(x), or the decode engine's kernel for it when the engine passes its kernels."""
    return linear(x) if kernels is None else kernels.linear(linear, x)


def project_parts(linears: tuple, x: torch.Tensor, kernels) -> tuple:
    """(linear(x) for each of linears, all on the same x): q/k/v or gate/up of an unfused model. A prefill over
    NVFP4 linears multiplies them as one transient weight (qwenlab.quant.linear.multiply_parts); the decode engine's
    kernels may multiply them in one launch (NVFP4: one GEMV over the separate weights)."""
    if kernels is None:
        return multiply_parts(linears, x)
    return kernels.linear_parts(linears, x)


class PrefillLayer:
    """The `kernels` a prefill hands one decoder layer whose seven projections are all W4A16 NVFP4 Triton linears
    (plain: no bias, no hook): the seven weights dequantized in one launch into one transient buffer
    (qwenlab.quant.triton_nvfp4.dequantize_groups), then one cuBLAS matmul each for q/k/v, o, gate/up and down, as
    multiply_parts and each module's own call compute them (the same weights, the same matmuls). One Triton launch a
    layer instead of four: an NVFP4 prefill is bound by the host that issues its kernels, not by the GPU
    (doc/performance.md). The buffer (one layer's weights in the activations' dtype) is freed when the layer
    returns."""

    def __init__(self, groups: tuple, dtype: torch.dtype):
        from qwenlab.quant.triton_nvfp4 import dequantize_groups  # Triton: only where CUDA is (the loader chose it)

        weights = dequantize_groups([[(m.packed, m.block_scale, m.tensor_scale) for m in group] for group in groups],
                                    dtype)
        self.weights = dict(zip(groups, weights))

    def linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight = self.weights.get((module,))
        return module(x) if weight is None else F.linear(x, weight)

    def linear_parts(self, modules: tuple, x: torch.Tensor) -> tuple:
        weight = self.weights.get(tuple(modules))
        if weight is None:
            return tuple(self.linear(m, x) for m in modules)
        return F.linear(x, weight).split([m.out_features for m in modules], dim=-1)


def nvfp4_groups(layer: nn.Module) -> tuple | None:
    """The projections of a layer whose seven are all plain W4A16 NVFP4 Triton linears (no bias, no module hook of
    their own or global), as they are multiplied: (q, k, v), (o,), (gate, up), (down,); else None (fused, dense, MoE
    or biased projections, another kernel, a hook)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = ((getattr(attn, "q_proj", None), getattr(attn, "k_proj", None), getattr(attn, "v_proj", None)),
              (attn.o_proj,), (getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)),
              (getattr(mlp, "down_proj", None),))
    return groups if all(plain_w4a16(m) for group in groups for m in group) else None


def prefill_layer(layer: nn.Module, x: torch.Tensor) -> PrefillLayer | None:
    """A PrefillLayer for this layer and x, or None (the layer runs module by module): x of one token (a decode step:
    the GEMV), or a layer that nvfp4_groups does not take."""
    if x.dim() < 2 or x.shape[-2] == 1:
        return None
    groups = nvfp4_groups(layer)
    return None if groups is None else PrefillLayer(groups, x.dtype)
