"""Qwen3-MoE's sparse MLP block in plain torch: a router scores num_experts expert MLPs per token, the token goes to
its num_experts_per_tok best, and its MLP output is their outputs weighted by the router.

Op for op what transformers' Qwen3MoeSparseMoeBlock does with its eager experts: router logits in the run dtype,
softmax in float32, top-k of the probabilities, renormalised to sum to one when norm_topk_prob, the weights cast
back to the run dtype; then expert by expert in increasing index, its tokens through SiLU(gate) * up -> down, scaled
by their weight and added into the output (so each token's sum runs in expert order, as transformers adds it).

Hook points (canonical names, doc/dump-format.md): mlp.router_logits [T, experts], mlp.router_ids [T, k] (int64,
the chosen experts, best first), mlp.router_weights [T, k] (after renormalisation, in the run dtype) and mlp.experts
[T, hidden] (the weighted sum: the layer's MLP output). transformers' router module returns (logits, weights, ids)
and its experts module the weighted sum, both with batch and tokens flattened.
"""
import torch
import torch.nn.functional as F
from torch import nn

from qwenlab.model.config import Qwen3Config
from qwenlab.model.hooks import HIDDEN, HookPoint
from qwenlab.model.projection import make_linear, project
from qwenlab.quant.linear import QuantInfo


class Expert(nn.Module):
    """One expert: the dense MLP's math with its own (narrower) weights and no hook points."""

    def __init__(self, hidden: int, intermediate: int, prefix: str, quant: QuantInfo | None):
        super().__init__()
        self.gate_proj = make_linear(prefix + "gate_proj", hidden, intermediate, False, quant)
        self.up_proj = make_linear(prefix + "up_proj", hidden, intermediate, False, quant)
        self.down_proj = make_linear(prefix + "down_proj", intermediate, hidden, False, quant)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    def __init__(self, cfg: Qwen3Config, prefix: str, quant: QuantInfo | None):
        super().__init__()
        H, E = cfg.hidden_size, cfg.num_experts
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = make_linear(prefix + "gate", H, E, False, quant)  # the router
        self.hook_router_logits = HookPoint(("T", "experts"), ("gate", "output"), index=0, flat=True)
        self.hook_router_ids = HookPoint(("T", "experts_per_tok"), ("gate", "output"), index=2, flat=True)
        self.hook_router_weights = HookPoint(("T", "experts_per_tok"), ("gate", "output"), index=1, flat=True)
        self.experts = nn.ModuleList(Expert(H, cfg.moe_intermediate_size, f"{prefix}experts.{e}.", quant)
                                     for e in range(E))
        self.hook_experts = HookPoint(HIDDEN, ("experts", "output"), flat=True)

    def route(self, x, kernels) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> (ids [B, T, k] int64, weights [B, T, k] in x's dtype)."""
        logits = self.hook_router_logits(project(self.gate, x, kernels))
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.hook_router_ids(ids), self.hook_router_weights(weights.to(logits.dtype))

    def forward(self, x, kernels=None):
        B, T, H = x.shape
        ids, weights = self.route(x, kernels)
        out = mix(self.experts, x.reshape(-1, H), ids.reshape(B * T, -1), weights.reshape(B * T, -1))
        return self.hook_experts(out.view(B, T, H))


def mix(experts: nn.ModuleList, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x [N, H], ids/weights [N, k] -> [N, H]: each chosen expert on its tokens, weighted, summed per token in
    increasing expert index. Which experts run depends on the data: one host sync per layer (the count of tokens
    per expert), so fine eagerly, not in a CUDA graph."""
    k = ids.shape[1]
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, row-major within each
    token, slot = order // k, order % k
    counts = torch.bincount(flat, minlength=len(experts)).tolist()  # the layer's one host sync
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n:
            t, s = token[start:start + n], slot[start:start + n]
            y = experts[e](x[t]) * weights[t, s, None]
            out.index_add_(0, t, y.to(out.dtype))
        start += n
    return out
