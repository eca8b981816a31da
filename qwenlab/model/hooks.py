"""Hook points: named places in the module tree where an activation can be read (captured) or replaced (patched).

A HookPoint is an identity module the forward passes a tensor through. With nothing installed it returns its
input, so the same forward is what you debug and what runs fast (a captured CUDA graph never sees it). Its
canonical name (doc/dump-format.md) comes from its path in the module tree, in one place: canonical_name().
`reference` says where HF transformers' Qwen3 holds the same tensor, relative to the hook point's parent module:
(module, "output" | "input") or (norm module, "rope") for the rotated queries/keys, which transformers computes in
a function rather than a module. `index`: the element of a module's tuple output (transformers' MoE router returns
(logits, weights, ids)); `flat`: transformers holds the tensor with batch and tokens flattened into one dimension
(its MoE block does), so the reference side adds the batch dimension back.
"""
from contextlib import contextmanager
from fnmatch import fnmatchcase
from typing import Callable, NamedTuple

import torch
from torch import nn

from qwenlab.errors import QwenlabError

HIDDEN = ("T", "hidden")


class Reference(NamedTuple):
    """Where transformers holds a canonical tensor: module path, "output" | "input" | "rope", tuple index, flat."""
    path: str
    kind: str
    index: int = 0
    flat: bool = False


class HookPoint(nn.Module):
    def __init__(self, dims: tuple[str, ...] = HIDDEN, reference: tuple[str, str] = ("", "output"), *,
                 index: int = 0, flat: bool = False):
        super().__init__()
        self.dims = dims
        self.reference = reference
        self.index, self.flat = index, flat
        self.fns: list[Callable] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            out = fn(x)
            if out is not None:
                x = out
        return x

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


def canonical_name(path: str) -> str:
    """Module path of a hook point -> canonical activation name: `model.layers.3.self_attn.hook_q_rope` ->
    `layers.3.attn.q_rope`, `model.hook_embed` -> `embed`, `hook_logits` -> `logits`."""
    parts = path.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    parts = ["attn" if p == "self_attn" else p for p in parts]
    parts[-1] = parts[-1].removeprefix("hook_")
    return ".".join(parts)


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """{canonical name: hook point} in forward order (modules are registered in the order the forward uses them)."""
    return {canonical_name(path): m for path, m in model.named_modules() if isinstance(m, HookPoint)}


def reference_paths(model: nn.Module) -> dict[str, Reference]:
    """{canonical name: Reference(HF module path, "output" | "input" | "rope", index, flat)}: where transformers
    holds each tensor."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, HookPoint):
            parent = path.rpartition(".")[0]
            module, kind = m.reference
            out[canonical_name(path)] = Reference(".".join(p for p in (parent, module) if p), kind, m.index, m.flat)
    return out


def _matching(points: dict, pattern: str) -> list[str]:
    return [name for name in points if name == pattern or fnmatchcase(name, pattern)]


class Recorder:
    """Reads activations as the forward passes them: batch row 0 (a capture is one prompt), detached, copied to
    the CPU when `to_cpu` (a long capture then holds no accelerator memory)."""

    def __init__(self, to_cpu: bool = True):
        self.to_cpu = to_cpu
        self.tensors: dict[str, torch.Tensor] = {}

    def __call__(self, name: str):
        def read(x):
            if x.shape[0] != 1:
                raise QwenlabError(f"capture of {name}: batch of {x.shape[0]} prompts; a capture records one prompt "
                                   "(batch 1)")
            row = x[0].detach()
            self.tensors[name] = row.to("cpu", copy=True) if self.to_cpu else row.clone()
        return read


@contextmanager
def hooks(model: nn.Module, read: list[str] | None = None, replace: dict[str, Callable] | None = None,
          recorder: Recorder | None = None):
    """Installs hooks for the duration of the block and yields the Recorder that collects what `read` names.

    read: canonical names or globs to capture ("*" for all). replace: {name or glob: fn(tensor, name) -> tensor}
    patches the activation (the replacement flows on and is what a read of the same point records). Unknown names
    are an error, so a typo never silently captures nothing. Hooks are removed on exit, also after an exception.
    """
    points = hook_points(model)
    recorder = recorder or Recorder()
    installed = []
    try:
        for pattern, fn in (replace or {}).items():
            names = _matching(points, pattern)
            if not names:
                raise QwenlabError(f"replace hook {pattern!r}: no hook point of that name (e.g. layers.0.output)")
            for name in names:
                installed.append((points[name], _bound(fn, name)))
        for pattern in read or []:
            names = _matching(points, pattern)
            if not names:
                raise QwenlabError(f"read hook {pattern!r}: no hook point of that name (e.g. layers.0.output)")
            installed += [(points[name], recorder(name)) for name in names]
        for point, fn in installed:
            point.fns.append(fn)
        yield recorder
    finally:
        for point, fn in installed:
            if fn in point.fns:
                point.fns.remove(fn)


def _bound(fn: Callable, name: str) -> Callable:
    return lambda x: fn(x, name)
