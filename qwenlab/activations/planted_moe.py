"""Known Qwen3-MoE bugs planted for one capture, the way qwenlab.activations.planted plants them (replace hooks at
canonical names or parameter substitutions through torch.func, never a copy of the model), each named at the tensor
where the diff must find it:

    top-k renormalisation flipped   router_weights  the k weights not renormalised (or renormalised when the config
                                                    says not to): the choice is right, the mix is not
    softmax over the wrong axis     router_ids      probabilities over the tokens instead of the experts: other
                                                    experts chosen, at clear margins
    expert order reversed           experts         expert e holds expert E-1-e's weights (a checkpoint's experts
                                                    read in the wrong order): routing right, outputs wrong
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from qwenlab.activations.names import layer_name
from qwenlab.activations.planted import PlantedBug
from qwenlab.model.config import is_moe_layer


def renormalisation_flipped(layer: int, top_k: int, norm_topk_prob: bool) -> dict[str, Callable]:
    """Layer `layer` does the opposite of norm_topk_prob with its top-k weights."""
    kept = {}

    def keep(logits, name):
        kept["logits"] = logits

    def weights(w, name):
        top = torch.topk(F.softmax(kept["logits"], dim=-1, dtype=torch.float32), top_k, dim=-1).values
        return (top if norm_topk_prob else top / top.sum(dim=-1, keepdim=True)).to(w.dtype)

    return {layer_name(layer, "mlp.router_logits"): keep, layer_name(layer, "mlp.router_weights"): weights}


def softmax_wrong_axis(layer: int, top_k: int, norm_topk_prob: bool) -> dict[str, Callable]:
    """Layer `layer` takes the router softmax over the tokens (dim -2 of [B, T, experts]), then chooses from it."""
    kept = {}

    def keep(logits, name):
        kept["logits"] = logits

    def choose(ids, name):
        weights, chosen = torch.topk(F.softmax(kept["logits"], dim=-2, dtype=torch.float32), top_k, dim=-1)
        kept["weights"] = weights / weights.sum(dim=-1, keepdim=True) if norm_topk_prob else weights
        return chosen

    return {layer_name(layer, "mlp.router_logits"): keep, layer_name(layer, "mlp.router_ids"): choose,
            layer_name(layer, "mlp.router_weights"): lambda w, name: kept["weights"].to(w.dtype)}


def experts_reversed(model, layer: int) -> Callable[[], dict]:
    """Expert e of layer `layer` computes with expert E-1-e's weights."""
    experts = model.model.layers[layer].mlp.experts
    count = len(experts)

    def overrides():
        return {f"model.layers.{layer}.mlp.experts.{e}.{name}": tensor
                for e in range(count) for name, tensor in experts[count - 1 - e].state_dict().items()}
    return overrides


def moe_bugs(model) -> list[PlantedBug]:
    """The MoE bugs for a MoE model (none for a dense one): the router bugs in the first MoE layer, the reversed
    experts in the last."""
    cfg = model.config
    moe = [i for i in range(cfg.num_hidden_layers) if is_moe_layer(cfg, i)]
    if not moe:
        return []
    first, last = moe[0], moe[-1]
    k, norm = cfg.num_experts_per_tok, cfg.norm_topk_prob
    return [
        PlantedBug(f"top-k {'not ' if norm else ''}renormalised L{first}",
                   f"layer {first} {'skips' if norm else 'adds'} the renormalisation of its top-{k} weights",
                   layer_name(first, "mlp.router_weights"), replace=renormalisation_flipped(first, k, norm)),
        PlantedBug(f"router softmax over tokens L{first}", f"layer {first} takes the router softmax over the "
                   "tokens instead of the experts", layer_name(first, "mlp.router_ids"),
                   replace=softmax_wrong_axis(first, k, norm)),
        PlantedBug(f"experts reversed L{last}", f"layer {last}'s expert e holds expert {cfg.num_experts - 1}-e's "
                   "weights", layer_name(last, "mlp.experts"), overrides=experts_reversed(model, last)),
    ]
