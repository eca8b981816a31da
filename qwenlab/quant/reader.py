"""Reading the NVFP4 tensors of a checkpoint: which linears are stored quantized, checked before any compute
(dtype, shape, both scales present, one convention), then read into NVFP4Weight. A linear whose packed tensor is
absent is stored unquantized (excluded) and loads as before."""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qwenlab.errors import QwenlabError
from qwenlab.quant.codec import BLOCK, NVFP4Weight, check_shape
from qwenlab.quant.layouts import ONLY_IN, Layout, other_layout

SAFETENSORS_DTYPES = {"U8": "uint8", "F8_E4M3": "float8_e4m3fn", "F32": "float32", "BF16": "bfloat16",
                      "F16": "float16", "F64": "float64", "I8": "int8", "I32": "int32", "I64": "int64"}


def tensor_dtypes(path: Path) -> dict[str, str]:
    """name -> torch dtype name, from the safetensors header alone."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: SAFETENSORS_DTYPES.get(v["dtype"], v["dtype"]) for k, v in header.items() if k != "__metadata__"}


@dataclass
class QuantizedModule:
    """File tensor names of one quantized linear."""
    module: str
    packed: str
    block_scale: str
    tensor_scale: str
    input_scale: str | None

    def names(self) -> list[str]:
        return [n for n in (self.packed, self.block_scale, self.tensor_scale, self.input_scale) if n]


def _mixed(module: str, layout: Layout, present) -> str | None:
    foreign = [f"{module}.{n}" for n in ONLY_IN[other_layout(layout.name)] if f"{module}.{n}" in present]
    return foreign[0] if foreign else None


def quantized_modules(shapes: dict, dtypes: dict, layout: Layout, linears: dict[str, tuple[int, int]],
                      where) -> dict[str, QuantizedModule]:
    """For each linear (name -> (N, K)) stored quantized in this layout: its checked tensor names."""
    found = {}
    for module, (N, K) in linears.items():
        foreign = _mixed(module, layout, shapes)
        if foreign:
            raise QwenlabError(f"{where}: the checkpoint mixes both conventions: its config says {layout.name} but "
                               f"it holds {foreign} ({other_layout(layout.name)}'s name)")
        packed = f"{module}.{layout.packed}"
        if packed not in shapes or not _is_packed(module, packed, layout, shapes, dtypes, where):
            continue
        check_shape((N, K), f"{where}: {packed}")
        input_scale = f"{module}.{layout.input_scale}"
        names = QuantizedModule(module, packed, f"{module}.{layout.block_scale}", f"{module}.{layout.tensor_scale}",
                                input_scale if input_scale in shapes else None)
        _check(names, shapes, dtypes, N, K, where)
        found[module] = names
    return found


def _is_packed(module: str, packed: str, layout: Layout, shapes: dict, dtypes: dict, where) -> bool:
    """uint8 codes: quantized. Another dtype is a dense weight only under ModelOpt's shared name `weight` with no
    scales beside it; otherwise it is a packed tensor of the wrong dtype."""
    if dtypes.get(packed) == "uint8":
        return True
    scales = [f"{module}.{n}" for n in (layout.block_scale, layout.tensor_scale) if f"{module}.{n}" in shapes]
    if layout.packed == "weight" and not scales:
        return False
    raise QwenlabError(f"{where}: {packed} has dtype {dtypes.get(packed)}, NVFP4 packed codes are uint8 (two E2M1 "
                       "codes per byte)")


def _check(m: QuantizedModule, shapes: dict, dtypes: dict, N: int, K: int, where):
    if list(shapes[m.packed]) != [N, K // 2]:
        raise QwenlabError(f"{where}: {m.packed} has shape {list(shapes[m.packed])}, expected [N, K/2] = "
                           f"[{N}, {K // 2}] (two FP4 codes per byte)")
    for name, what in ((m.block_scale, "block scales"), (m.tensor_scale, "the per-tensor scale")):
        if name not in shapes:
            raise QwenlabError(f"{where}: {name} ({what}) is missing for quantized {m.packed}")
    if dtypes[m.block_scale] != "float8_e4m3fn":
        raise QwenlabError(f"{where}: {m.block_scale} has dtype {dtypes[m.block_scale]}, NVFP4 block scales are "
                           "float8_e4m3fn")
    if list(shapes[m.block_scale]) != [N, K // BLOCK]:
        raise QwenlabError(f"{where}: {m.block_scale} has shape {list(shapes[m.block_scale])}, expected [N, K/16] = "
                           f"[{N}, {K // BLOCK}]")
    for name in (m.tensor_scale, m.input_scale):
        if name is None:
            continue
        numel = 1
        for d in shapes[name]:
            numel *= d
        if numel != 1 or not dtypes[name].startswith(("float", "bfloat")):
            raise QwenlabError(f"{where}: {name} must be one float scalar, got {dtypes[name]} {list(shapes[name])}")


def _scale(get, name: str, layout: Layout, device, what: str) -> torch.Tensor:
    """A scalar scale as qwenlab uses it (compressed-tensors files hold its reciprocal); positive and finite."""
    stored = get(name)
    scale = layout.scale_from_file(stored)
    if not torch.isfinite(scale) or scale <= 0:
        if layout.reciprocal_scales:
            raise QwenlabError(f"{name} = {stored.float().item()}: {layout.name} stores 1 / scale, so the {what} would "
                               f"be {scale.item()}, not a positive finite number")
        raise QwenlabError(f"{name} = {scale.item()}: the {what} must be a positive finite number")
    return scale.to(device)


def read_module(get, m: QuantizedModule, layout: Layout, device) -> tuple[NVFP4Weight, torch.Tensor | None]:
    """(weight, input_scale or None) of one quantized linear; get(name) -> the file's tensor."""
    tensor_scale = _scale(get, m.tensor_scale, layout, device, "per-tensor scale")
    weight = NVFP4Weight(get(m.packed).to(device), get(m.block_scale).to(device), tensor_scale)
    input_scale = _scale(get, m.input_scale, layout, device, "activation input scale") if m.input_scale else None
    return weight, input_scale
