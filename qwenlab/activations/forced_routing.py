"""Routing-forced captures of a MoE model (doc/moe.md, "Near-tie flips").

A token whose experts flip at a near-tie (routing.compare_routing: explained by precision) goes through other
experts by rounding alone; every tensor after it at that token, and through attention a little at later tokens, then
differs from the reference by far more than rounding. To compare those tensors like with like, the candidate is
captured again with the reference's experts at exactly those (layer, token) places, through replace hooks at
`mlp.router_ids` and `mlp.router_weights` (the weights are qwenlab's own softmax of its router logits, taken at the
forced experts and renormalised as the config says). Flips that appear in later layers once the earlier ones are
forced are forced in another round (force_near_tie_flips: the same rounds force transformers' model, whose router
capture_reference(routing=...) gives the experts, where notebook 04 measures the reference's own noise). The routing
rows keep what the candidate chose on its own, judged with its own router logits (own_routing,
diff_dumps(routing=...)): the flip stays reported where it happened, and a flip that an earlier near-tie flip of the
same token caused (its own router logits then moved by more than rounding) is explained by those logits, not judged
against the forced run's.
"""
from __future__ import annotations

from collections.abc import Callable

from qwenlab.activations.capture import capture_qwenlab
from qwenlab.activations.names import layer_name
from qwenlab.activations.routing import (
    ROUTER_IDS,
    ROUTER_LOGITS,
    ROUTER_WEIGHTS,
    explained_flips,
    forced_weights,
    with_experts,
)

MAX_ROUNDS = 4


def forcing_hooks(forced: dict[int, dict[int, list[int]]], norm_topk_prob: bool) -> dict:
    """{layer: {token: expert ids}} -> replace hooks that give those tokens those experts."""
    hooks = {}
    for layer, rows in forced.items():
        kept: dict = {}

        def keep(logits, name, kept=kept):
            kept["logits"] = logits

        def choose(ids, name, rows=rows, kept=kept):
            kept["ids"] = with_experts(ids, rows)
            return kept["ids"]

        def weigh(weights, name, rows=rows, kept=kept):
            return forced_weights(weights, kept["logits"], kept["ids"], rows, norm_topk_prob)

        hooks[layer_name(layer, ROUTER_LOGITS)] = keep
        hooks[layer_name(layer, ROUTER_IDS)] = choose
        hooks[layer_name(layer, ROUTER_WEIGHTS)] = weigh
    return hooks


def own_routing(cand: dict) -> dict:
    """The candidate's own router ids and logits of every MoE layer: what its routing rows are judged on."""
    return {name: t for name, t in cand.items() if name.endswith((ROUTER_IDS, ROUTER_LOGITS))}


def force_near_tie_flips(capture: Callable[[dict], dict], first: dict, ref: dict,
                         margin: float) -> tuple[dict, dict[int, dict[int, list[int]]]]:
    """The rounds of forcing, for any model: `first` is its own capture, capture(forced) captures it again with
    {layer: {token: experts}} forced. Every flip against `ref` that precision explains is forced to ref's experts;
    flips that appear in later layers once the earlier ones are forced are forced in the next round. -> (the last
    capture, everything forced); (first, {}) when nothing flipped at a near-tie."""
    forced: dict[int, dict[int, list[int]]] = {}
    current = first
    for _ in range(MAX_ROUNDS):
        new = {layer: {t: e for t, e in rows.items() if t not in forced.get(layer, {})}
               for layer, rows in explained_flips(current, ref, margin).items()}
        new = {layer: rows for layer, rows in new.items() if rows}
        if not new:
            break
        for layer, rows in new.items():
            forced.setdefault(layer, {}).update(rows)
        current = capture(forced)
    return current, forced


def capture_routing_forced(model, ids: list[int], cand: dict, ref: dict, margin: float,
                           attention: str | None = None, include=None) -> tuple[dict, dict]:
    """(candidate capture with near-tie flips forced to the reference's experts, {layer: {token: experts}} forced).
    A dense model, or one without such flips, gives cand back unchanged and {}. include: what the forced captures
    record (capture_qwenlab's; None: everything); it must hold the router ids and logits, which each round reads."""
    if not getattr(model.config, "is_moe", False):
        return cand, {}
    current, forced = force_near_tie_flips(
        lambda f: capture_qwenlab(model, ids, include, attention=attention,
                                  replace=forcing_hooks(f, model.config.norm_topk_prob)), cand, ref, margin)
    if not forced:
        return cand, {}
    out = dict(current)
    for layer, rows in forced.items():  # the routing rows say what the candidate chose on its own
        for point in (ROUTER_IDS, ROUTER_WEIGHTS):
            name = layer_name(layer, point)
            if name not in out:  # not in `include`
                continue
            tensor = out[name].clone()
            flat, own = tensor.view(-1, tensor.shape[-1]), cand[name].reshape(-1, tensor.shape[-1])
            for token in rows:
                flat[token] = own[token]
            out[name] = tensor
    return out, forced
