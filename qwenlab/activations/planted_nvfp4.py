"""Interop bugs of an NVFP4 path: every NVFP4Linear reads its (correct) tensors the wrong way for one capture, as a
port to the FP4 kernels can (the model is left as it was):

    nibble order swapped         the odd element read from the low nibble, the even one from the high nibble
    block scale applied twice    e2m1 x block_scale^2 x tensor_scale
    tensor scale inverted        1 / tensor_scale: a compressed-tensors weight_global_scale read as ModelOpt's
                                 weight_scale_2 (or the other way round)

Against the quantized reference each must be found at the first quantized tensor in forward order
(layers.0.attn.q_proj unless that module is excluded); against the unquantized one it must stand far above honest
NVFP4 noise.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from qwenlab.activations.names import sort_forward
from qwenlab.activations.planted import PlantedBug
from qwenlab.model.hooks import canonical_name
from qwenlab.quant import codec
from qwenlab.quant.linear import nvfp4_modules


def swapped_nibbles(w: codec.NVFP4Weight, dtype) -> torch.Tensor:
    return codec.dequantize(codec.NVFP4Weight((w.packed >> 4) | (w.packed << 4), w.block_scale, w.tensor_scale), dtype)


def block_scale_twice(w: codec.NVFP4Weight, dtype) -> torch.Tensor:
    block = w.block_scale.to(torch.float32).repeat_interleave(codec.BLOCK, dim=1)
    return (codec.dequantize(w, torch.float32) * block).to(dtype)


def inverted_tensor_scale(w: codec.NVFP4Weight, dtype) -> torch.Tensor:
    return codec.dequantize(codec.NVFP4Weight(w.packed, w.block_scale, 1.0 / w.tensor_scale), dtype)


BUGS = {
    "nibble order swapped": (swapped_nibbles, "each byte's two FP4 codes read high nibble first"),
    "block scale applied twice": (block_scale_twice, "values multiplied by the E4M3 block scale twice"),
    "tensor scale inverted": (inverted_tensor_scale, "per-tensor scale read with the other layout's convention (1/s)"),
}


def reading(mistake):
    """A context in which every NVFP4Linear of the model multiplies by the weight `mistake` dequantizes."""
    @contextmanager
    def patch(model):
        def hook(module, args, output):
            x = args[0]
            return F.linear(x, mistake(module.nvfp4(), x.dtype), module.bias)
        handles = [m.register_forward_hook(hook) for m in nvfp4_modules(model).values()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
    return patch


def activation_point(module: str) -> str:
    """Module name -> the canonical activation it produces (lm_head -> logits)."""
    if module == "lm_head":
        return "logits"
    parent, _, name = module.rpartition(".")
    return canonical_name(f"{parent}.hook_{name}")


def first_quantized_point(model) -> str | None:
    points = [activation_point(m) for m in nvfp4_modules(model)]
    return sort_forward(points)[0] if points else None


def nvfp4_bugs(model) -> list[PlantedBug]:
    expected = first_quantized_point(model)
    return [PlantedBug(name, description, expected, patch=reading(mistake))
            for name, (mistake, description) in BUGS.items()]
