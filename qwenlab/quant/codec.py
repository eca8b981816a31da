"""NVFP4 = FP4 E2M1 elements in blocks of 16 along the input dimension K, one FP8 E4M3 scale per block, one FP32
scale per tensor. A weight [N, K] is stored as

    packed       uint8          [N, K/2]    two E2M1 codes per byte (qwenlab.quant.e2m1)
    block_scale  float8_e4m3fn  [N, K/16]   per block: (block amax / 6) / tensor_scale, rounded to E4M3
    tensor_scale float32        []          amax / (6 x 448): the largest block scale lands on E4M3's max, 448

and read back as  value = e2m1(code) x block_scale x tensor_scale.

Quantizing, per block of 16: scale it so that its largest magnitude maps to 6 (the top of the E2M1 grid), round
that scale to E4M3 (clamped to [2^-6, 448]: 2^-6 is E4M3's smallest normal), divide the block by the rounded scale
(values that now exceed 6, because the scale rounded down, saturate at 6) and round each element to the E2M1 grid.
The float operations and their order are torchao's (torchao.prototype.mx_formats.nvfp4_tensor), so the bytes, the
scales and the dequantized values are bit-identical to it (tests/quant/test_codec.py).

K must be a multiple of 16: qwenlab refuses other shapes rather than padding them. A tensor that is all zeros
gets tensor_scale 1.0 (amax / 2688 would be 0 and every scale 0/0); compressed-tensors falls back the same way.
"""
from dataclasses import dataclass

import torch

from qwenlab.errors import QwenlabError
from qwenlab.quant import e2m1

BLOCK = 16
E4M3_MAX = 448.0
E4M3_MIN_SCALE = torch.finfo(torch.float8_e4m3fn).tiny  # 2^-6, the smallest normal E4M3 number
TENSOR_SCALE_DIVISOR = E4M3_MAX * e2m1.E2M1_MAX  # 2688: amax / 2688 = the tensor scale


@dataclass
class NVFP4Weight:
    packed: torch.Tensor
    block_scale: torch.Tensor
    tensor_scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def to(self, device) -> "NVFP4Weight":
        return NVFP4Weight(self.packed.to(device), self.block_scale.to(device), self.tensor_scale.to(device))


def check_shape(shape, where: str = "tensor"):
    if len(shape) != 2:
        raise QwenlabError(f"{where}: NVFP4 quantizes 2-D weights [N, K], got shape {list(shape)}")
    if shape[1] % BLOCK:
        raise QwenlabError(f"{where}: K = {shape[1]} (shape {list(shape)}) is not a multiple of {BLOCK}: NVFP4 "
                           f"scales blocks of {BLOCK} along K (qwenlab refuses such tensors rather than padding)")


def tensor_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """amax / (6 x 448) in float32 (ModelOpt's weight_scale_2, torchao's per_tensor_scale); 1.0 for amax 0."""
    amax = amax.to(torch.float32)
    return torch.where(amax > 0, amax / TENSOR_SCALE_DIVISOR, torch.ones_like(amax))


def quantize(x: torch.Tensor, tensor_scale: torch.Tensor | None = None, where: str = "tensor") -> NVFP4Weight:
    """[N, K] float tensor -> NVFP4Weight. tensor_scale: a calibrated scale (e.g. an activation's input_scale);
    default: from the tensor's own amax. Values beyond 6 x block scale x tensor scale saturate."""
    check_shape(x.shape, where)
    x = x.detach().to(torch.float32)
    if not torch.isfinite(x).all():
        raise QwenlabError(f"{where}: holds NaN or infinite values, which NVFP4 cannot represent")
    if tensor_scale is None:
        tensor_scale = tensor_scale_from_amax(x.abs().amax())
    tensor_scale = tensor_scale.to(device=x.device, dtype=torch.float32).reshape(())
    N, K = x.shape
    blocks = x.reshape(N, K // BLOCK, BLOCK)
    block_amax = blocks.abs().amax(dim=-1)
    block_scale = (block_amax / e2m1.E2M1_MAX) / tensor_scale
    block_scale = block_scale.clamp(min=E4M3_MIN_SCALE, max=E4M3_MAX).to(torch.float8_e4m3fn)
    reciprocal = (1.0 / tensor_scale) / block_scale.to(torch.float32)
    scaled = (blocks * reciprocal.unsqueeze(-1)).clamp(-e2m1.E2M1_MAX, e2m1.E2M1_MAX)
    codes = e2m1.encode(scaled.reshape(N, K))
    return NVFP4Weight(e2m1.pack(codes), block_scale, tensor_scale)


def scales(q: NVFP4Weight) -> torch.Tensor:
    """float32 [N, K/16]: the scale each block's E2M1 values are multiplied by (tensor_scale x block_scale)."""
    return q.tensor_scale * q.block_scale.to(torch.float32)


def dequantize(q: NVFP4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NVFP4Weight -> [N, K] in dtype, computed in float32 (then cast, once). Each byte indexes a table of the two
    values it holds (low nibble first), which unpacks and decodes in one gather."""
    N, K = q.shape
    values = e2m1.pair_values(q.packed.device)[q.packed.int()].reshape(N, K // BLOCK, BLOCK)
    return (values * scales(q).unsqueeze(-1)).reshape(N, K).to(dtype)


def fake_quantize(x: torch.Tensor, tensor_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] quantized to NVFP4 per 16-block along K and back, in x's dtype: what an NVFP4 GEMM sees of its
    activations (tensor_scale: the checkpoint's input_scale; None: this tensor's own amax, i.e. dynamic)."""
    flat = x.reshape(-1, x.shape[-1])
    return dequantize(quantize(flat, tensor_scale, where="activation"), x.dtype).reshape(x.shape)
