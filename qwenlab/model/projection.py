"""The linears of the forward: which class each one is (decided at construction) and how a call multiplies."""
import torch
from torch import nn

from qwenlab.quant.linear import NVFP4Linear, QuantInfo, multiply_parts


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
