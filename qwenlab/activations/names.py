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
