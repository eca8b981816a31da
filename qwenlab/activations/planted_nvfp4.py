"""Interop bugs of an NVFP4 path, planted in a deep copy of a quantized model (the given one is untouched): each
NVFP4Linear of the copy reads its (correct) tensors the wrong way, as a port to the FP4 kernels can.

    nibble order swapped         the odd element read from the low nibble, the even one from the high nibble
    block scale applied twice    e2m1 x block_scale^2 x tensor_scale
    tensor scale inverted        1 / tensor_scale: a compressed-tensors weight_global_scale read as ModelOpt's
                                 weight_scale_2 (or the other way round)

Against the quantized reference each must be found at the first quantized tensor in forward order
(layers.0.attn.q_proj unless that module is excluded); against the unquantized one it must stand far above honest
NVFP4 noise.
"""
from __future__ import annotations

import copy

import torch

from qwenlab.activations.names import sort_forward
from qwenlab.activations.planted import PlantedBug
from qwenlab.quant import codec
from qwenlab.quant.linear import NVFP4Linear, nvfp4_modules

MODULE_POINTS = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj",
                 "self_attn.v_proj": "attn.v_proj", "self_attn.o_proj": "attn.o_proj",
                 "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj"}


class SwappedNibbles(NVFP4Linear):
    def dequantize_weight(self, dtype):
        swapped = (self.packed >> 4) | (self.packed << 4)
        return codec.dequantize(codec.NVFP4Weight(swapped, self.block_scale, self.tensor_scale), dtype)


class BlockScaleTwice(NVFP4Linear):
    def dequantize_weight(self, dtype):
        once = codec.dequantize(self.nvfp4(), torch.float32)
        block = self.block_scale.to(torch.float32).repeat_interleave(codec.BLOCK, dim=1)
        return (once * block).to(dtype)


class InvertedTensorScale(NVFP4Linear):
    def dequantize_weight(self, dtype):
        return codec.dequantize(codec.NVFP4Weight(self.packed, self.block_scale, 1.0 / self.tensor_scale), dtype)


BUGS = {
    "nibble order swapped": (SwappedNibbles, "each byte's two FP4 codes read high nibble first"),
    "block scale applied twice": (BlockScaleTwice, "values multiplied by the E4M3 block scale twice"),
    "tensor scale inverted": (InvertedTensorScale, "per-tensor scale read with the other layout's convention (1/s)"),
}


def activation_point(module: str) -> str:
    """Module name -> the canonical activation it produces first (lm_head -> logits)."""
    if module == "lm_head":
        return "logits"
    parts = module.split(".")  # model.layers.<i>.<self_attn|mlp>.<name>
    return f"layers.{parts[2]}.{MODULE_POINTS['.'.join(parts[3:])]}"


def first_quantized_point(model) -> str | None:
    points = [activation_point(m) for m in nvfp4_modules(model)]
    return sort_forward(points)[0] if points else None


def plant(model, bug_class):
    """A deep copy of model whose every NVFP4Linear dequantizes with bug_class's mistake."""
    bad = copy.deepcopy(model)
    for module in nvfp4_modules(bad).values():
        module.__class__ = bug_class
    return bad


def nvfp4_bugs(model) -> list[PlantedBug]:
    expected = first_quantized_point(model)
    return [PlantedBug(name, description, expected, lambda cls=cls: plant(model, cls))
            for name, (cls, description) in BUGS.items()]
