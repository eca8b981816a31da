"""Routing agreement of a MoE layer (doc/moe.md): the experts each token chose (`layers.{i}.mlp.router_ids`) against
the reference's, as a set per token (the order within the top-k does not matter), and every disagreement with the
reference's router-logit margin there.

A flip is a token whose chosen set differs. Its margin is the gap the candidate overturned: the reference's logit of
the best expert the candidate dropped minus that of the worst expert it took instead. To flip, the candidate's
logits of those two experts must have moved by the margin between them, so a flip is explained by precision when

    margin <= limit + 2 x (the candidate's largest router-logit error at that token)

(limit: data/thresholds/03_layer_diffs.json routing.margin, per dtype: ties and rounding of the logits themselves).
Whether the candidate's router logits are right is the router_logits row's question (a floor like every tensor); a
flip beyond that bound means the candidate did not choose the top-k of its own logits: a routing bug.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qwenlab.activations.names import split_name

ROUTER_IDS = "mlp.router_ids"
ROUTER_LOGITS = "mlp.router_logits"
ROUTER_WEIGHTS = "mlp.router_weights"
# routing.margin of data/thresholds/03_layer_diffs.json, used where no thresholds are given: about one rounding step
# of a router logit in each dtype (bf16 and fp16 logits round to equal values, then top-k breaks the tie by index).
DEFAULT_MARGIN = {"float64": 1e-9, "float32": 1e-5, "bfloat16": 0.03125, "float16": 0.004}


def is_routing(name: str) -> bool:
    return split_name(name)[1] == ROUTER_IDS


def logits_name(ids_name: str) -> str:
    layer, _ = split_name(ids_name)
    return f"layers.{layer}.{ROUTER_LOGITS}"


@dataclass
class Routing:
    tokens: int
    top_k: int
    agreement: float  # share of (token, slot) choices the reference also made
    flips: list[dict] = field(default_factory=list)  # one per token whose set of experts differs

    @property
    def unexplained(self) -> list[dict]:
        return [f for f in self.flips if not f["explained"]]

    def note(self) -> str:
        if not self.flips:
            return f"routing: all {self.tokens * self.top_k} choices agree"
        worst = max(self.flips, key=lambda f: f["margin"])
        return (f"routing: agreement {self.agreement:.4f}, {len(self.flips)} tokens flipped, "
                f"{len(self.unexplained)} at a clear margin (largest margin {worst['margin']:.3g})")

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "top_k": self.top_k, "agreement": self.agreement, "flips": self.flips,
                "unexplained": len(self.unexplained)}


def compare_routing(cand_ids: torch.Tensor, ref_ids: torch.Tensor, ref_logits: torch.Tensor | None,
                    cand_logits: torch.Tensor | None, limit: float) -> Routing:
    """cand_ids/ref_ids [T, k] expert indices; ref_logits/cand_logits [T, experts] (None: not captured; without the
    reference's no margin can be measured and every flip counts as unexplained)."""
    cand, ref = cand_ids.long().cpu(), ref_ids.long().cpu()
    T, k = ref.shape
    ref_l = ref_logits.double().cpu() if ref_logits is not None else None
    err = (cand_logits.double().cpu() - ref_l).abs().amax(-1) if cand_logits is not None and ref_l is not None \
        and cand_logits.shape == ref_l.shape else None
    agree, flips = 0, []
    for t in range(T):
        c, r = set(cand[t].tolist()), set(ref[t].tolist())
        agree += len(c & r)
        if c == r:
            continue
        missed, extra = sorted(r - c), sorted(c - r)
        flip = {"token": t, "reference": ref[t].tolist(), "candidate": cand[t].tolist(), "margin": math.inf,
                "cutoff_gap": math.nan, "logit_error": math.nan, "limit": limit, "explained": False}
        if ref_l is not None:
            row = ref_l[t]
            ordered = row.sort(descending=True).values
            valid = extra and all(0 <= e < row.numel() for e in extra)  # duplicates or a bad id: no margin
            flip["margin"] = (row[missed].max() - row[extra].min()).item() if valid else math.inf
            flip["cutoff_gap"] = (ordered[k - 1] - ordered[k]).item() if k < row.numel() else math.inf
            flip["limit"] = limit + (2 * err[t].item() if err is not None else 0.0)
            flip["logit_error"] = err[t].item() if err is not None else math.nan
            flip["explained"] = flip["margin"] <= flip["limit"]
        flips.append(flip)
    return Routing(T, k, agree / max(T * k, 1), flips)


def explained_flips(cand: dict, ref: dict, margin: float) -> dict[int, dict[int, list[int]]]:
    """{layer: {token: the reference's expert ids}} for every flip of cand against ref that precision explains
    (compare_routing at `margin`), over every MoE layer both captures hold; {} for a dense model."""
    out: dict[int, dict[int, list[int]]] = {}
    for name in ref:
        if not is_routing(name) or name not in cand:
            continue
        k = ref[name].shape[-1]
        logits = logits_name(name)
        routing = compare_routing(cand[name].reshape(-1, k), ref[name].reshape(-1, k), ref.get(logits),
                                  cand.get(logits), margin)
        for flip in routing.flips:
            if flip["explained"]:
                out.setdefault(split_name(name)[0], {})[flip["token"]] = flip["reference"]
    return out


def with_experts(ids: torch.Tensor, rows: dict[int, list[int]]) -> torch.Tensor:
    """Router ids [..., k] with the tokens of `rows` ({token: expert ids}, tokens counted over the flattened leading
    dimensions) given those experts; a copy."""
    out = ids.clone()
    flat = out.view(-1, out.shape[-1])
    for token, experts in rows.items():
        flat[token] = torch.tensor(experts, dtype=out.dtype, device=out.device)
    return out


def forced_weights(weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, rows: dict[int, list[int]],
                   norm_topk_prob: bool) -> torch.Tensor:
    """Router weights [..., k] with the tokens of `rows` weighted as a router weighs its own choice of `ids`: the
    softmax of its logits (float32) at those experts, renormalised when norm_topk_prob, in the weights' dtype; a
    copy. Used by the forcing of both sides (qwenlab's replace hooks, the reference's router hooks)."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32).gather(-1, ids)
    if norm_topk_prob:
        probs = probs / probs.sum(dim=-1, keepdim=True)
    out = weights.clone()
    flat, new = out.view(-1, out.shape[-1]), probs.reshape(-1, out.shape[-1]).to(out.dtype)
    for token in rows:
        flat[token] = new[token]
    return out
