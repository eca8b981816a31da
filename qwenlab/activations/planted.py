"""Known bugs planted in a run of qwenlab's model; the diff against the reference must point at each one.

A planted bug never copies the model and leaves it as it was: it is a set of activation patches (replace hooks at
canonical names, qwenlab.model.hooks), parameter substitutions for one call (torch.func.functional_call) and/or
module hooks removed after the call, applied while its prompt is captured. So it runs under any placement
(resident, split or sequential) and at any model size. `expected` names the canonical tensor where a correct diff
finds the first divergence.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import pandas as pd
import torch

from qwenlab.activations.capture import capture_qwenlab
from qwenlab.activations.diff import diff_dumps
from qwenlab.activations.names import layer_name, split_name
from qwenlab.model.config import is_moe_layer
from qwenlab.model.hf_names import hf_state_dict
from qwenlab.model.hooks import reference_paths
from qwenlab.model.qwen3 import Rotary, rotate_half


@dataclass
class PlantedBug:
    name: str
    description: str
    expected: str
    replace: dict[str, Callable] = field(default_factory=dict)  # canonical name -> fn(tensor, name) -> tensor
    overrides: Callable[[], dict] | None = None  # -> {parameter/buffer name: tensor}, made when the bug runs
    patch: Callable[[torch.nn.Module], ContextManager] | None = None  # module hooks for the capture only
    # also localised when the first divergence is one of these (later points of the same layer, where a small weight
    # difference, e.g. two trained norms a few % apart, first exceeds the floor)
    also: tuple[str, ...] = ()

    def localised(self, found: str | None) -> bool:
        return found == self.expected or (found is not None and found in self.also)

    def capture(self, model, ids: list[int], attention: str | None = None) -> dict:
        """The bug's activations on `ids`, as capture_qwenlab gives them for the correct model."""
        overrides = self.overrides() if self.overrides is not None else None
        with self.patch(model) if self.patch is not None else nullcontext():
            return capture_qwenlab(model, ids, attention=attention, replace=self.replace, overrides=overrides)


def rope_theta_off(model, factor: float = 10.0) -> Callable[[], dict]:
    """RoPE base multiplied by `factor` (a wrong rope_theta read from the config, or a hard-coded 10000)."""
    rotary = model.model.rotary
    wrong = Rotary(model.config.head_dim, model.config.rope_theta * factor).inv_freq
    return lambda: {"model.rotary.inv_freq": wrong.to(rotary.inv_freq.device)}


def skip_norm(layer: int, which: str = "q") -> dict[str, Callable]:
    """Layer `layer` applies no per-head RMSNorm to the queries (or keys): Qwen2-style attention."""
    before = {}

    def keep(x, name):
        before["x"] = x

    return {layer_name(layer, f"attn.{which}_proj"): keep,
            layer_name(layer, f"attn.{which}_norm"): lambda x, name: before["x"].reshape(x.shape)}


def rope_theta_off_in_layer(model, layer: int, factor: float) -> dict[str, Callable]:
    """Layer `layer` rotates q and k with RoPE base x `factor` (one layer's RoPE built from a wrong config value);
    every other layer is right. Patches that layer's q_rope/k_rope with the rotation at the wrong base."""
    wrong = Rotary(model.config.head_dim, model.config.rope_theta * factor).inv_freq
    normed = {}

    def keep(x, name):
        normed[name.rsplit(".", 1)[1][0]] = x

    def rotate(x, name):
        y = normed[name.rsplit(".", 1)[1][0]]  # [B, T, heads, D], the norm's output
        positions = torch.arange(y.shape[1], device=y.device, dtype=torch.float32)
        freqs = positions[:, None] * wrong.to(y.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(y.dtype)[:, None], emb.sin().to(y.dtype)[:, None]
        return y * cos + rotate_half(y) * sin
    return {layer_name(layer, "attn.q_norm"): keep, layer_name(layer, "attn.k_norm"): keep,
            layer_name(layer, "attn.q_rope"): rotate, layer_name(layer, "attn.k_rope"): rotate}


def swap_layers(model, i: int, j: int) -> Callable[[], dict]:
    """Layers i and j hold each other's weights (a shard or index mapped to the wrong layer)."""
    a, b = model.model.layers[i], model.model.layers[j]

    def overrides():
        out = {}
        for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
            out[f"model.layers.{i}.{name}"] = tb.to(ta.device)
            out[f"model.layers.{j}.{name}"] = ta.to(tb.device)
        return out
    return overrides


def drop_layers(num_layers: int, keep: int) -> dict[str, Callable]:
    """Only the first `keep` layers are loaded and the rest stay zeros. A layer of zero weights (no biases in
    Qwen3) passes its input through: both its norms output zeros, so every projection, the attention and the MLP
    give zeros. Patching the two norm outputs to zeros is that, exactly, without touching a weight."""
    zeros = lambda x, name: torch.zeros_like(x)  # noqa: E731
    return {layer_name(i, point): zeros for i in range(keep, num_layers)
            for point in ("input_layernorm", "post_attention_layernorm")}


def expected_swap_layers(model, i: int, j: int) -> str:
    """The first activation point (forward order) of layer min(i, j) made by a module whose weights differ."""
    return swap_layer_points(model, i, j)[0]


def swap_layer_points(model, i: int, j: int) -> list[str]:
    """The activation points of layer min(i, j) from the first one made by a module whose weights differ onwards, in
    forward order (["logits"] when no weight differs): where swapping layers i and j can first show. The first is
    expected; a later one is still this layer's bug, when the first weights differ by less than the floor shows (the
    RMSNorm weights of two layers of a briefly trained model)."""
    first, other = min(i, j), max(i, j)
    state, paths = hf_state_dict(model), reference_paths(model)
    points = [name for name, (path, kind, _, _) in paths.items()
              if split_name(name)[0] == first and kind == "output" and path != f"model.layers.{first}"]
    for k, name in enumerate(points):
        path = paths[name][0]
        mine = {key: v for key, v in state.items() if key.startswith(path + ".")}
        theirs = [state[key.replace(f"model.layers.{first}.", f"model.layers.{other}.", 1)] for key in mine]
        if any(not torch.equal(v, w.to(v.device)) for v, w in zip(mine.values(), theirs)):
            return points[k:] + [f"layers.{first}.output"]
    return ["logits"]


def standard_bugs(model) -> list[PlantedBug]:
    """The story's bug classes that fit the model's depth: RoPE off, q_norm skipped, layers swapped, layers missing."""
    n = model.config.num_hidden_layers
    q_layer = min(1, n - 1)
    bugs = [
        PlantedBug("rope_theta x10", "RoPE theta 10x the config's", layer_name(0, "attn.q_rope"),
                   overrides=rope_theta_off(model, 10.0)),
        PlantedBug(f"skip q_norm L{q_layer}", f"layer {q_layer} skips the per-head q RMSNorm",
                   layer_name(q_layer, "attn.q_norm"), replace=skip_norm(q_layer)),
    ]
    if n >= 2:
        i, j = (1, 2) if n >= 3 else (0, 1)
        if is_moe_layer(model.config, i) == is_moe_layer(model.config, j):  # a dense and a MoE layer cannot swap
            points = swap_layer_points(model, i, j)
            bugs.append(PlantedBug(f"swap layers {i}<->{j}", f"layers {i} and {j} hold each other's weights",
                                   points[0], overrides=swap_layers(model, i, j), also=tuple(points[1:])))
        keep = min(2, n - 1)
        bugs.append(PlantedBug(f"only {keep} of {n} layers", f"layers {keep}..{n - 1} never loaded (zeros)",
                               layer_name(keep, "input_layernorm"), replace=drop_layers(n, keep)))
    return bugs


def localise(bugs: list[PlantedBug], reference: dict, *, capture: Callable[[PlantedBug], dict],
             floors=None, dtype=None) -> tuple[pd.DataFrame, dict]:
    """Each bug captured (capture(bug) -> tensors, e.g. bug.capture(model, ids)) and diffed against the reference
    tensors of the same prompt. -> (one row per bug: expected vs found first divergence, localised?;
    {bug name: DiffResult})."""
    rows, results = [], {}
    for bug in bugs:
        result = results[bug.name] = diff_dumps(capture(bug), reference, dtype=dtype, floors=floors)
        row = result.first_divergence_row or {}
        logits = result.logits or {}
        rows.append({"bug": bug.name, "description": bug.description, "expected": bug.expected,
                     "found": result.first_divergence, "localised": bug.localised(result.first_divergence),
                     "found_rel_l2": row.get("rel_l2"), "logits_kl_mean": logits.get("kl_mean"),
                     "top1_agreement": logits.get("top1_agreement")})
    return pd.DataFrame(rows).set_index("bug"), results
