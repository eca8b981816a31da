"""Layout diagnostics: a candidate tensor stored in another dimension order (HF's internal [heads, T, head_dim],
feature-major [hidden, T]) diverges after the reshape; a permutation that matches tells the layout it was in."""
from __future__ import annotations

from itertools import permutations

import torch

from qwenlab.activations.names import point_dims

LAST_POSITION_POINTS = ("norm", "logits")


def rel_l2(cand: torch.Tensor, ref: torch.Tensor) -> float:
    c, r = cand.detach().to(torch.float64).reshape(-1), ref.detach().to(torch.float64).reshape(-1)
    ref_norm = r.norm().item()
    diff = (c - r).norm().item()
    return diff / ref_norm if ref_norm else (0.0 if diff == 0 else float("inf"))


def is_last_position(name: str, cand: torch.Tensor, ref: torch.Tensor) -> bool:
    """`logits` or `norm` given for the last position only ([vocab] or [1, vocab]) against a [T, vocab] reference."""
    return (name in LAST_POSITION_POINTS and ref.dim() == 2 and ref.shape[0] > 1
            and cand.numel() == ref.shape[1] and all(size == 1 for size in cand.shape[:-1]))


def _dim_names(name: str, ndim: int) -> tuple[str, ...]:
    """Names of the reference's dimensions, split or merged to `ndim` (heads*head_dim -> heads, head_dim)."""
    dims = point_dims(name)
    if len(dims) == ndim:
        return dims
    if len(dims) == 2 and ndim == 3 and "*" in dims[1]:
        return (dims[0], *dims[1].split("*"))
    if len(dims) == 3 and ndim == 2:
        return (dims[0], f"{dims[1]}*{dims[2]}")
    return ("T", *(f"d{i}" for i in range(1, ndim)))


def _squeezed(cand: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Leading size-1 dimensions (a batch kept in the dump) dropped: (tensor, how many were dropped)."""
    dropped = 0
    while cand.dim() > 2 and cand.shape[0] == 1:
        cand, dropped = cand[0], dropped + 1
    return cand, dropped


def diagnose_layout(name: str, cand: torch.Tensor, ref: torch.Tensor, floor: float) -> str | None:
    """'looks like [heads, T, head_dim]; expected [T, heads*head_dim]' when a permutation of the candidate's own
    dimensions (token dimension first; a same-shape swap too, e.g. T == heads) matches the reference within `floor`;
    None when nothing matches."""
    if cand.numel() != ref.numel() or cand.dim() > 5:
        return None
    squeezed, dropped = _squeezed(cand)
    tokens = ref.shape[0]
    for order in permutations(range(squeezed.dim())):
        if order == tuple(range(squeezed.dim())) or squeezed.shape[order[0]] != tokens:
            continue
        moved = squeezed.permute(order)
        if rel_l2(moved.reshape(ref.shape), ref) <= floor:
            names = _dim_names(name, moved.dim())
            layout = [""] * len(order)
            for target, source in enumerate(order):
                layout[source] = names[target]
            shown = ["1"] * dropped + layout
            return f"looks like [{', '.join(shown)}]; expected [{', '.join(point_dims(name))}]"
    return None
