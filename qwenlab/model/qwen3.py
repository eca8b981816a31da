"""Qwen3 forward in plain torch, HF parameter names, optional probe. No transformers import here."""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from qwenlab.model.config import Qwen3Config
from qwenlab.model.kv_cache import KVCache
from qwenlab.model.probe import Probe


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@torch.compiler.disable  # a cached device tensor: compiled code must not recompute (or copy) it
@functools.lru_cache(maxsize=16)
def inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """Computed on the CPU in float32 exactly as the reference does, then kept on the device (no copy per step)."""
    return (1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))).to(device)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype):
    """cos/sin of shape [T, head_dim] for integer positions, computed in float32 like the reference."""
    freqs = positions.float()[:, None] * inv_freq(head_dim, float(theta), positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.impl = "sdpa"
        self.qkv_proj = None  # one Linear whose weight slices are q/k/v_proj's parameters, see fuse_projections()
        self.decode_kernel = None  # fn(q, k, v, pos) for one token over a whole static cache (the graph engine's)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, probe: Probe | None):
        B, T, _ = x.shape
        p = f"layers.{self.layer}.attn."
        if self.qkv_proj is not None:
            q_lin, k_lin, v_lin = self.qkv_proj(x).split([self.q_proj.out_features, self.k_proj.out_features,
                                                          self.v_proj.out_features], dim=-1)
        else:
            q_lin, k_lin, v_lin = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q_lin.view(B, T, self.n_heads, self.head_dim))
        k = self.k_norm(k_lin.view(B, T, self.n_kv, self.head_dim))
        v = v_lin.view(B, T, self.n_kv, self.head_dim)
        if probe is not None:
            for name, t in (("q_proj", q_lin), ("k_proj", k_lin), ("v_proj", v_lin), ("q_norm", q), ("k_norm", k)):
                probe.record(p + name, t)
        q = q.transpose(1, 2) * cos + rotate_half(q.transpose(1, 2)) * sin
        k = k.transpose(1, 2) * cos + rotate_half(k.transpose(1, 2)) * sin
        v = v.transpose(1, 2)
        if probe is not None:
            probe.record(p + "q_rope", q.transpose(1, 2))
            probe.record(p + "k_rope", k.transpose(1, 2))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if T == 1 and cache is not None and cache.static_shapes and self.decode_kernel is not None:
            ctx = self.decode_kernel(q, k, v, cache.pos)
        else:
            ctx = attend(q, k, v, mask, self.impl)
        ctx = ctx.transpose(1, 2).reshape(B, T, -1)
        out = self.o_proj(ctx)
        if probe is not None:
            probe.record(p + "context", ctx)
            probe.record(p + "o_proj", out)
        return out


def causal_mask(T: int, S: int, past: int, device) -> torch.Tensor:
    """Boolean [T, S] mask, True where query i (at position past+i) may attend key j."""
    return torch.arange(S, device=device)[None, :] <= (past + torch.arange(T, device=device))[:, None]


def attend(q, k, v, mask, impl: str):
    """q [B,H,T,D], k/v [B,KVH,S,D] -> [B,H,T,D]; eager mirrors the reference's math op for op.
    mask: boolean [T, S], or None when the queries are the last T of the S keys (causal)."""
    T, S = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    if impl == "sdpa":
        if T == 1:
            return decode_attention(q, k, v, mask)
        if mask is None and T == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
        mask = causal_mask(T, S, S - T, q.device) if mask is None else mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    mask = causal_mask(T, S, S - T, q.device) if mask is None else mask
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


def decode_attention(q, k, v, mask=None):
    """One query token against the cache, GQA by grouping the query heads: a few plain matmuls (through SDPA the
    same step took cuDNN attention at ~1.6 ms of CPU per call on an H100). mask [1, S]: the valid cache slots."""
    B, H, _, D = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(B, kv_heads, H // kv_heads, D)
    scores = torch.matmul(qg, k.transpose(2, 3)) * D ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v).reshape(B, H, 1, D)


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer: int):
        super().__init__()
        self.layer = layer
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj = None  # one Linear whose halves are gate_proj's and up_proj's, see fuse_projections()

    def forward(self, x, probe: Probe | None):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = F.silu(gate)
        out = self.down_proj(act * up)
        if probe is not None:
            p = f"layers.{self.layer}.mlp."
            for name, t in (("gate_proj", gate), ("up_proj", up), ("act", act), ("down_proj", out)):
                probe.record(p + name, t)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer: int):
        super().__init__()
        self.layer = layer
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, probe):
        p = f"layers.{self.layer}."
        h = self.input_layernorm(x)
        if probe is not None:
            probe.record(p + "input", x)
            probe.record(p + "input_layernorm", h)
        x = x + self.self_attn(h, cos, sin, mask, cache, probe)
        h = self.post_attention_layernorm(x)
        if probe is not None:
            probe.record(p + "post_attention_residual", x)
            probe.record(p + "post_attention_layernorm", h)
        x = x + self.mlp(h, probe)
        if probe is not None:
            probe.record(p + "output", x)
        return x


def _fuse(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear over the concatenated weights (and biases); each given module is re-pointed at its slice."""
    with torch.device("meta"):
        fused = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears),
                          bias=linears[0].bias is not None)
    for name in ("weight", "bias"):
        parts = [getattr(m, name) for m in linears]
        if parts[0] is None:
            continue
        whole = torch.cat([t.detach() for t in parts])
        start = 0
        for m, t in zip(linears, parts):
            setattr(m, name, nn.Parameter(whole[start:start + t.shape[0]], requires_grad=t.requires_grad))
            start += t.shape[0]
        setattr(fused, name, nn.Parameter(whole, requires_grad=False))
    return fused


class Backbone(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3(nn.Module):
    """`model(ids)` -> logits [B, T, V]. Module names match HF checkpoints (model.layers.0.self_attn.q_proj...)."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.rope_theta = cfg.rope_theta
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def set_attention(self, impl: str):
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"attention impl must be 'sdpa' or 'eager', not {impl!r}")
        for layer in self.model.layers:
            layer.self_attn.impl = impl
        return self

    def fuse_projections(self):
        """One matmul for q/k/v and one for gate/up: each layer's weights move into one fused storage and the
        HF-named parameters become slices of it, so names, probes and dumps stay, and memory does not double.
        Only plain nn.Linear projections are fused; idempotent. The fused Linear is kept out of the module tree
        (state_dict, named_modules and .to() see only the HF names)."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.qkv_proj is None and all(type(m) is nn.Linear for m in (attn.q_proj, attn.k_proj, attn.v_proj)):
                attn.__dict__["qkv_proj"] = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            if mlp.gate_up_proj is None and all(type(m) is nn.Linear for m in (mlp.gate_proj, mlp.up_proj)):
                mlp.__dict__["gate_up_proj"] = _fuse([mlp.gate_proj, mlp.up_proj])
        return self

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, probe: Probe | None = None,
                last_only: bool = False):
        if ids.dim() == 1:
            ids = ids[None]
        T = ids.shape[1]
        positions = cache.positions(T, ids.device) if cache is not None else torch.arange(T, device=ids.device)
        mask = cache.attention_mask(T) if cache is not None else None
        x = self.model.embed_tokens(ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.rope_theta, x.dtype)
        if probe is not None:
            probe.record("embed", x)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, probe)
        if cache is not None:
            cache.advance(ids.shape[1])
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        if probe is not None:
            probe.record("norm", x)
            probe.record("logits", logits)
        return logits
