"""Canonical activation names (doc/dump-format.md) and their forward order, read off the model's hook points
(qwenlab.model.hooks): the module tree is the one place they are defined."""

from __future__ import annotations

import functools
import re
from dataclasses import replace

from qwenlab.model.config import Qwen3Config
from qwenlab.model.hf_names import meta_model
from qwenlab.model.hooks import HIDDEN, hook_points

_ONE_LAYER = Qwen3Config(vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=8,
                         rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=True)
_ONE_MOE_LAYER = replace(_ONE_LAYER, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=4)
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def split_name(name: str) -> tuple[int | None, str]:
    match = _LAYER_RE.match(name)
    if match:
        return int(match.group(1)), match.group(2)
    return None, name


def _points(config: Qwen3Config) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], dict[str, tuple]]:
    points = hook_points(meta_model(config))
    head, layer, tail = [], [], []
    for name in points:
        index, point = split_name(name)
        (layer if index is not None else tail if layer else head).append(point)
    dims = {split_name(name)[1]: p.dims for name, p in points.items() if p.dims != HIDDEN}
    return tuple(head), tuple(layer), tuple(tail), dims


HEAD_POINTS, LAYER_POINTS, TAIL_POINTS, _DENSE_DIMS = _points(_ONE_LAYER)  # a dense layer's points
_, _MOE_POINTS, _, _MOE_DIMS = _points(_ONE_MOE_LAYER)
# A MoE layer's points (qwenlab.model.moe): the router's and the experts' in place of the dense MLP's.
MOE_LAYER_POINTS = _MOE_POINTS
# Every layer point in forward order: the dense MLP's, then the MoE block's, then the layer's output.
ALL_LAYER_POINTS = LAYER_POINTS[:-1] + tuple(p for p in _MOE_POINTS if p not in LAYER_POINTS) + LAYER_POINTS[-1:]
POINT_DIMS = _DENSE_DIMS | _MOE_DIMS
HIDDEN_DIMS = HIDDEN
_POINT_INDEX = {point: i for i, point in enumerate(ALL_LAYER_POINTS)}


def layer_name(layer: int, point: str) -> str:
    return f"layers.{layer}.{point}"


@functools.lru_cache(maxsize=8)
def _names_of(config: Qwen3Config) -> tuple[str, ...]:
    return tuple(hook_points(meta_model(config)))


def canonical_names(layers_or_config: int | Qwen3Config) -> list[str]:
    """Every canonical name of a model, forward order (a config gives its exact set, MoE layers included; a layer
    count the dense one)."""
    if isinstance(layers_or_config, Qwen3Config):
        return list(_names_of(layers_or_config))
    names = list(HEAD_POINTS)
    for layer in range(layers_or_config):
        names.extend(layer_name(layer, point) for point in LAYER_POINTS)
    return names + list(TAIL_POINTS)


def point_dims(name_or_point: str) -> tuple[str, ...]:
    """The dimension names of a canonical tensor, e.g. ('T', 'heads', 'head_dim') for layers.0.attn.q_norm."""
    point = split_name(name_or_point)[1]
    return POINT_DIMS.get(point, HIDDEN_DIMS)


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
