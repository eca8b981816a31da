"""FP4 E2M1, the element type of NVFP4: 1 sign bit, 2 exponent bits, 1 mantissa bit. Sixteen codes:

    code (bits 2..0)   0    1    2    3    4    5    6    7
    magnitude          0    0.5  1    1.5  2    3    4    6       bit 3 is the sign: codes 8..15 are the negatives

Code 1 (0.5) is the only subnormal. Rounding onto the grid is round-to-nearest, ties to the even code (mantissa
bit 0), as an IEEE cast does: 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
Magnitudes above 6 saturate to 6. The sign is kept when a value rounds to zero (-0.1 -> code 8, "-0").

Two codes share a byte: the element with the even index in the low nibble, the odd one in the high nibble.
"""
import functools

import torch

from qwenlab.errors import QwenlabError

MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
SIGN_BIT = 0b1000


@functools.lru_cache(maxsize=None)
def _grid(device) -> torch.Tensor:
    return torch.tensor(MAGNITUDES, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def code_values(device=None) -> torch.Tensor:
    """float32 [16]: the value of every code, 0..7 positive, 8..15 negative (code 8 is -0.0)."""
    grid = _grid(device)
    return torch.cat([grid, -grid])


def encode(x: torch.Tensor) -> torch.Tensor:
    """float32 values (already divided by their scale) -> uint8 codes 0..15, one per element."""
    magnitude = x.abs()
    grid = _grid(x.device)
    midpoints = (grid[1:] + grid[:-1]) / 2
    lower = torch.bucketize(magnitude, midpoints, right=False)  # on a midpoint: the smaller neighbour
    upper = torch.bucketize(magnitude, midpoints, right=True)  # on a midpoint: the larger neighbour
    code = torch.where(lower % 2 == 0, lower, upper)  # they differ only on a tie: take the even code
    sign = torch.signbit(x).to(torch.uint8) * SIGN_BIT
    return code.to(torch.uint8) | sign


def decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 -> float32 values."""
    return code_values(codes.device)[codes.long()]


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> uint8 bytes [..., K/2]: element 2i in the low nibble, 2i+1 in the high nibble."""
    if codes.shape[-1] % 2:
        raise QwenlabError(f"cannot pack {codes.shape[-1]} FP4 codes per row: two share a byte, K must be even")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes [..., K/2] -> uint8 codes [..., K] (the inverse of pack)."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


@functools.lru_cache(maxsize=None)
def pair_values(device=None) -> torch.Tensor:
    """float32 [256, 2]: the two values a byte holds, (low nibble, high nibble). A one-gather unpack + decode.
    (The tables are made once per device and shared: never modify them.)"""
    byte = torch.arange(256, device=device)
    values = code_values(device)
    return torch.stack((values[byte & 0x0F], values[byte >> 4]), dim=-1)
