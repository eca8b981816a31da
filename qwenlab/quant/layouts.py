"""The two checkpoint layouts in use for the same NVFP4 numbers, per quantized linear `<module>`:

    what                      ModelOpt / TensorRT-LLM            compressed-tensors (llm-compressor, vLLM)
    packed E2M1 codes         <module>.weight         uint8      <module>.weight_packed       uint8    [N, K/2]
    block scales              <module>.weight_scale   e4m3       <module>.weight_scale        e4m3     [N, K/16]
    tensor scale              <module>.weight_scale_2 = s        <module>.weight_global_scale = 1 / s
    activation tensor scale   <module>.input_scale    = a        <module>.input_global_scale  = 1 / a

s = weight amax / (6 x 448) multiplies; compressed-tensors stores its reciprocal and divides. Reading one layout's
tensor scale with the other's convention is off by a factor s^2 (~1e-7 for typical weights).
Exclusions: ModelOpt's `exclude_modules` are fnmatch globs; compressed-tensors' `ignore` entries are exact module
names or `re:<regex>`; qwenlab accepts both spellings and writes the matched names out in full.
"""
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from qwenlab.errors import QwenlabError

MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"


@dataclass(frozen=True)
class Layout:
    name: str
    packed: str
    block_scale: str
    tensor_scale: str
    input_scale: str
    reciprocal_scales: bool  # the file holds 1 / scale
    scale_shape: tuple  # shape the writer gives the two scalar scales

    def names(self) -> tuple[str, ...]:
        return self.packed, self.block_scale, self.tensor_scale, self.input_scale

    def scale_from_file(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float32).reshape(())
        return 1.0 / t if self.reciprocal_scales else t

    def scale_to_file(self, scale: torch.Tensor) -> torch.Tensor:
        scale = scale.to(torch.float32).reshape(())
        return (1.0 / scale if self.reciprocal_scales else scale).reshape(self.scale_shape).contiguous()


LAYOUTS = {
    MODELOPT: Layout(MODELOPT, "weight", "weight_scale", "weight_scale_2", "input_scale", False, ()),
    COMPRESSED_TENSORS: Layout(COMPRESSED_TENSORS, "weight_packed", "weight_scale", "weight_global_scale",
                               "input_global_scale", True, (1,)),
}
# Tensor names only one convention uses: finding one of the other layout's names is a mixed checkpoint.
ONLY_IN = {MODELOPT: ("weight_scale_2", "input_scale"),
           COMPRESSED_TENSORS: ("weight_packed", "weight_global_scale", "input_global_scale")}


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise QwenlabError(f"--format {name!r}: choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def other_layout(name: str) -> str:
    return COMPRESSED_TENSORS if name == MODELOPT else MODELOPT


def matches(module: str, pattern: str) -> bool:
    """A module name against one exclusion entry: `re:<regex>` (compressed-tensors), a glob or an exact name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return module == pattern or fnmatchcase(module, pattern)


def is_excluded(module: str, patterns) -> bool:
    return any(matches(module, p) for p in patterns or ())


def check_patterns(patterns, flag: str = "--exclude"):
    for p in patterns or ():
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise QwenlabError(f"{flag} {p!r}: not a valid regular expression ({e})") from None
