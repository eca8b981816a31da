"""Canonical activation names (doc/dump-format.md) and their forward order."""

from __future__ import annotations

import re

LAYER_POINTS = (
    "input",
    "input_layernorm",
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.q_norm",
    "attn.k_norm",
    "attn.q_rope",
    "attn.k_rope",
    "attn.context",
    "attn.o_proj",
    "post_attention_residual",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.act",
    "mlp.down_proj",
    "output",
)
HEAD_POINTS = ("embed",)
TAIL_POINTS = ("norm", "logits")

# Each tensor's dimensions in a dump (token-major, batch dropped); `heads*head_dim` is a head-major flatten.
HIDDEN_DIMS = ("T", "hidden")
POINT_DIMS = {
    "embed": HIDDEN_DIMS,
    "attn.q_proj": ("T", "heads*head_dim"),
    "attn.k_proj": ("T", "kv_heads*head_dim"),
    "attn.v_proj": ("T", "kv_heads*head_dim"),
    "attn.q_norm": ("T", "heads", "head_dim"),
    "attn.k_norm": ("T", "kv_heads", "head_dim"),
    "attn.q_rope": ("T", "heads", "head_dim"),
    "attn.k_rope": ("T", "kv_heads", "head_dim"),
    "attn.context": ("T", "heads*head_dim"),
    "mlp.gate_proj": ("T", "intermediate"),
    "mlp.up_proj": ("T", "intermediate"),
    "mlp.act": ("T", "intermediate"),
    "logits": ("T", "vocab"),
}

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_POINT_INDEX = {point: i for i, point in enumerate(LAYER_POINTS)}


def layer_name(layer: int, point: str) -> str:
    return f"layers.{layer}.{point}"


def canonical_names(num_layers: int) -> list[str]:
    names = list(HEAD_POINTS)
    for layer in range(num_layers):
        names.extend(layer_name(layer, point) for point in LAYER_POINTS)
    names.extend(TAIL_POINTS)
    return names


def point_dims(name_or_point: str) -> tuple[str, ...]:
    """The dimension names of a canonical tensor, e.g. ('T', 'heads', 'head_dim') for layers.0.attn.q_norm."""
    point = split_name(name_or_point)[1]
    return POINT_DIMS.get(point, HIDDEN_DIMS)


def is_canonical(name: str) -> bool:
    layer, point = split_name(name)
    return point in _POINT_INDEX if layer is not None else point in HEAD_POINTS + TAIL_POINTS


def split_name(name: str) -> tuple[int | None, str]:
    match = _LAYER_RE.match(name)
    if match:
        return int(match.group(1)), match.group(2)
    return None, name


def forward_order_key(name: str) -> tuple:
    """Sort key: embed, layers by index then point, norm, logits; unknown names last."""
    layer, point = split_name(name)
    if layer is None and point in HEAD_POINTS:
        return (0, 0, HEAD_POINTS.index(point), "")
    if layer is not None and point in _POINT_INDEX:
        return (1, layer, _POINT_INDEX[point], "")
    if layer is None and point in TAIL_POINTS:
        return (2, 0, TAIL_POINTS.index(point), "")
    return (3, 0, 0, name)


def sort_forward(names) -> list[str]:
    return sorted(names, key=forward_order_key)
