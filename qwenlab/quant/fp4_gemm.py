"""Native NVFP4 GEMM: torch._scaled_mm on float4_e2m1fn_x2 operands, Blackwell (sm_100+) only. The H100 (sm_90) and
CPUs have no FP4 tensor cores: there the quantized linear dequantizes (qwenlab.quant.linear).

cuBLAS wants the block scales in its 128 x 4 tiled ("swizzled") layout; to_blocked produces it (equal to torchao's
to_blocked, tests/quant/test_codec.py). The product of the two tensor scales is applied to the output afterwards.
"""
import torch

from qwenlab.quant import codec


def available(device) -> bool:
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "float4_e2m1fn_x2") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (10, 0)


def to_blocked(scale: torch.Tensor) -> torch.Tensor:
    """[rows, cols] block scales -> cuBLAS's layout, flattened: zero-padded to multiples of 128 rows and 4 columns,
    cut into 128 x 4 tiles (row-major over tiles), each tile stored as 32 rows of (4 groups of 32 rows) x 4."""
    rows, cols = scale.shape
    padded_rows, padded_cols = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = scale.new_zeros((padded_rows, padded_cols))
    padded[:rows, :cols] = scale
    tiles = padded.view(padded_rows // 128, 128, padded_cols // 4, 4).permute(0, 2, 1, 3)
    return tiles.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten()


def linear(x: torch.Tensor, weight: codec.NVFP4Weight, input_scale: torch.Tensor | None, bias=None) -> torch.Tensor:
    """x [..., K] @ weight.T with both operands in NVFP4 (activations quantized here, per 16-block)."""
    flat = x.reshape(-1, x.shape[-1])
    a = codec.quantize(flat, input_scale, where="activation")
    out = torch._scaled_mm(a.packed.view(torch.float4_e2m1fn_x2), weight.packed.view(torch.float4_e2m1fn_x2).t(),
                           to_blocked(a.block_scale).view(torch.float8_e4m3fn),
                           to_blocked(weight.block_scale).view(torch.float8_e4m3fn), out_dtype=x.dtype)
    out = out * (a.tensor_scale * weight.tensor_scale).to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])
