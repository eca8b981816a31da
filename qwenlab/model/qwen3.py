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

    def forward(self, x, cos, sin, cache: KVCache | None, probe: Probe | None):
        B, T, _ = x.shape
        p = f"layers.{self.layer}.attn."
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
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer, k, v)
        ctx = attend(q, k, v, past, self.impl).transpose(1, 2).reshape(B, T, -1)
        out = self.o_proj(ctx)
        if probe is not None:
            probe.record(p + "context", ctx)
            probe.record(p + "o_proj", out)
        return out


def causal_mask(T: int, S: int, past: int, device) -> torch.Tensor:
    """Boolean [T, S] mask, True where query i (at position past+i) may attend key j."""
    return torch.arange(S, device=device)[None, :] <= (past + torch.arange(T, device=device))[:, None]


def attend(q, k, v, past: int, impl: str):
    """q [B,H,T,D], k/v [B,KVH,S,D] -> [B,H,T,D]; eager mirrors the reference's math op for op."""
    T, S = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    if impl == "sdpa":
        if T == 1:
            return decode_attention(q, k, v)
        if past == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=groups > 1)
        mask = causal_mask(T, S, past, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~causal_mask(T, S, past, q.device), torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


def decode_attention(q, k, v):
    """One query token against the cache, GQA by grouping the query heads: a few plain matmuls. Through SDPA the
    same step took cuDNN attention at ~1.6 ms of CPU per call on an H100, making 4B decode 1.2-1.35x slower
    (bench/decode_bench.py --compare-sdpa-decode)."""
    B, H, _, D = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(B, kv_heads, H // kv_heads, D)
    scores = torch.matmul(qg, k.transpose(2, 3)) * D ** -0.5
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v).reshape(B, H, 1, D)


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer: int):
        super().__init__()
        self.layer = layer
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, probe: Probe | None):
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

    def forward(self, x, cos, sin, cache, probe):
        p = f"layers.{self.layer}."
        h = self.input_layernorm(x)
        if probe is not None:
            probe.record(p + "input", x)
            probe.record(p + "input_layernorm", h)
        x = x + self.self_attn(h, cos, sin, cache, probe)
        h = self.post_attention_layernorm(x)
        if probe is not None:
            probe.record(p + "post_attention_residual", x)
            probe.record(p + "post_attention_layernorm", h)
        x = x + self.mlp(h, probe)
        if probe is not None:
            probe.record(p + "output", x)
        return x


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

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, probe: Probe | None = None,
                last_only: bool = False):
        if ids.dim() == 1:
            ids = ids[None]
        past = cache.length if cache is not None else 0
        positions = torch.arange(past, past + ids.shape[1], device=ids.device)
        x = self.model.embed_tokens(ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.rope_theta, x.dtype)
        if probe is not None:
            probe.record("embed", x)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, probe)
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
