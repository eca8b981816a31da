"""Known bugs planted in a deep copy of a Qwen3 model; the diff against the reference must point at each one.

Each plant function returns a new model and leaves the given one untouched. `expected_*` name the canonical
tensor where a correct diff finds the first divergence.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
from torch import nn

from qwenlab.activations.diff import diff_dumps
from qwenlab.activations.names import LAYER_POINTS, layer_name

# The parameters (relative to a decoder layer) each activation point applies first: where swapped weights show.
POINT_PARAMS = {
    "input_layernorm": ("input_layernorm.weight",),
    "attn.q_proj": ("self_attn.q_proj.weight", "self_attn.q_proj.bias"),
    "attn.k_proj": ("self_attn.k_proj.weight", "self_attn.k_proj.bias"),
    "attn.v_proj": ("self_attn.v_proj.weight", "self_attn.v_proj.bias"),
    "attn.q_norm": ("self_attn.q_norm.weight",),
    "attn.k_norm": ("self_attn.k_norm.weight",),
    "attn.o_proj": ("self_attn.o_proj.weight", "self_attn.o_proj.bias"),
    "post_attention_layernorm": ("post_attention_layernorm.weight",),
    "mlp.gate_proj": ("mlp.gate_proj.weight",),
    "mlp.up_proj": ("mlp.up_proj.weight",),
    "mlp.down_proj": ("mlp.down_proj.weight",),
}


def rope_theta_off(model, factor: float = 10.0):
    """RoPE base multiplied by `factor` (a wrong rope_theta read from the config, or a hard-coded 10000)."""
    bad = copy.deepcopy(model)
    bad.rope_theta = model.rope_theta * factor
    return bad


def skip_q_norm(model, layer: int):
    """Layer `layer` applies no per-head RMSNorm to the queries (Qwen2-style attention)."""
    bad = copy.deepcopy(model)
    bad.model.layers[layer].self_attn.q_norm = nn.Identity()
    return bad


def swap_layers(model, i: int, j: int):
    """Layers i and j hold each other's weights (a shard or index mapped to the wrong layer)."""
    bad = copy.deepcopy(model)
    a, b = bad.model.layers[i], bad.model.layers[j]
    state_a = {k: v.clone() for k, v in a.state_dict().items()}
    a.load_state_dict(b.state_dict())
    b.load_state_dict(state_a)
    return bad


def drop_layers(model, keep: int):
    """Only the first `keep` layers are loaded; the rest keep the zeros they were allocated with."""
    bad = copy.deepcopy(model)
    with torch.no_grad():
        for layer in bad.model.layers[keep:]:
            for p in layer.parameters():
                p.zero_()
    return bad


def expected_rope_theta_off() -> str:
    return layer_name(0, "attn.q_rope")


def expected_skip_q_norm(layer: int) -> str:
    return layer_name(layer, "attn.q_norm")


def expected_swap_layers(model, i: int, j: int) -> str:
    """The first activation point (forward order) of layer min(i, j) whose own weights differ between i and j."""
    first = min(i, j)
    a, b = model.model.layers[i].state_dict(), model.model.layers[j].state_dict()
    for point in LAYER_POINTS:
        names = [n for n in POINT_PARAMS.get(point, ()) if n in a]
        if any(not torch.equal(a[n], b[n]) for n in names):
            return layer_name(first, point)
    return "logits"


def expected_drop_layers(keep: int) -> str:
    return layer_name(keep, "input_layernorm")


@dataclass
class PlantedBug:
    name: str
    description: str
    expected: str
    build: Callable[[], nn.Module]


def standard_bugs(model) -> list[PlantedBug]:
    """The story's bug classes that fit the model's depth: RoPE off, q_norm skipped, layers swapped, layers missing."""
    n = model.config.num_hidden_layers
    q_layer = min(1, n - 1)
    bugs = [
        PlantedBug("rope_theta x10", "RoPE theta 10x the config's", expected_rope_theta_off(),
                   lambda: rope_theta_off(model, 10.0)),
        PlantedBug(f"skip q_norm L{q_layer}", f"layer {q_layer} skips the per-head q RMSNorm",
                   expected_skip_q_norm(q_layer), lambda: skip_q_norm(model, q_layer)),
    ]
    if n >= 2:
        i, j = (1, 2) if n >= 3 else (0, 1)
        bugs.append(PlantedBug(f"swap layers {i}<->{j}", f"layers {i} and {j} hold each other's weights",
                               expected_swap_layers(model, i, j), lambda: swap_layers(model, i, j)))
        keep = min(2, n - 1)
        bugs.append(PlantedBug(f"only {keep} of {n} layers", f"layers {keep}..{n - 1} never loaded (zeros)",
                               expected_drop_layers(keep), lambda: drop_layers(model, keep)))
    return bugs


def diff_planted(bug: PlantedBug, ids: list[int], reference: dict, *, capture: Callable, floors=None, dtype=None):
    """Builds the bug's model, captures it on `ids` (capture(model, ids) -> tensors) and diffs it against the
    reference tensors (floors of `dtype`, default the candidate's); the copy is dropped before returning."""
    bad = bug.build()
    try:
        return diff_dumps(capture(bad, ids), reference, dtype=dtype, floors=floors)
    finally:
        del bad


def localise(bugs: list[PlantedBug], ids: list[int], reference: dict, *, capture: Callable,
             floors=None, dtype=None) -> tuple[pd.DataFrame, dict]:
    """-> (one row per bug: expected vs found first divergence, localised?; {bug name: DiffResult})."""
    rows, results = [], {}
    for bug in bugs:
        result = results[bug.name] = diff_planted(bug, ids, reference, capture=capture, floors=floors, dtype=dtype)
        row = result.first_divergence_row or {}
        logits = result.logits or {}
        rows.append({"bug": bug.name, "description": bug.description, "expected": bug.expected,
                     "found": result.first_divergence, "localised": result.first_divergence == bug.expected,
                     "found_rel_l2": row.get("rel_l2"), "logits_kl_mean": logits.get("kl_mean"),
                     "top1_agreement": logits.get("top1_agreement")})
    return pd.DataFrame(rows).set_index("bug"), results
