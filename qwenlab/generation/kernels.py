"""The decode engine's kernel choices for a one-token step over a static cache, handed to the model's forward as
`kernels` (the model itself never changes): the split-K Triton attention over the whole cache, and for each
projection shape the Triton GEMV where it measured faster than cuBLAS on this device. Triton exists only with
CUDA, so it is imported when kernels are chosen, never on the CPU."""
from dataclasses import dataclass, field
from typing import Callable

import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecodeKernels:
    attend: Callable  # (q, k, v, pos) -> context, for one query token over every cache slot
    gemv: Callable | None = None  # (x, weight, bias) -> y for one row
    gemv_shapes: frozenset = field(default_factory=frozenset)  # (N, K) of the weights the GEMV runs

    def linear(self, module: nn.Module, x):
        if type(module) is nn.Linear and x.numel() == module.in_features:
            if tuple(module.weight.shape) in self.gemv_shapes:
                return self.gemv(x, module.weight, module.bias)
            return F.linear(x, module.weight, module.bias)
        return module(x)

    def attention(self, q, k, v, pos):
        return self.attend(q, k, v, pos)

    def describe(self) -> dict:
        return {"attention": "split-K Triton",
                "gemv": sorted(f"{n}x{k}" for n, k in self.gemv_shapes)}


def decode_linears(model) -> list[nn.Linear]:
    """Every plain nn.Linear a decode step multiplies by (fused projections, HF-named ones, lm_head)."""
    return [m for m in model.modules() if type(m) is nn.Linear]


def choose_kernels(model, timings: dict) -> DecodeKernels:
    """Measures cuBLAS against the Triton GEMV once per (N, K, dtype, device) into `timings` (the engine's) and
    keeps the GEMV where it is at least 3% faster."""
    from qwenlab.generation.decode_attention import decode_attention_static  # Triton: only where CUDA is
    from qwenlab.generation.gemv import gemv, linear_timings  # the same

    chosen = set()
    for linear in decode_linears(model):
        weight = linear.weight
        key = (*weight.shape, weight.dtype, str(weight.device))
        if key not in timings:
            timings[key] = linear_timings(weight)
        cublas_us, triton_us = timings[key]
        if triton_us < 0.97 * cublas_us:
            chosen.add(tuple(weight.shape))
    return DecodeKernels(decode_attention_static, gemv, frozenset(chosen))
