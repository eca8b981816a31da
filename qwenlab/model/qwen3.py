"""Qwen3 forward in plain torch, HF parameter names, hook points at the canonical activation names. Qwen3-MoE is the
same model with a sparse MoE block (qwenlab.model.moe) in place of the MLP on its MoE layers.

The module tree is fixed at construction (the loader builds it): which linears are NVFP4, whether q/k/v and
gate/up are fused into one registered parameter each (`qkv_proj`, `gate_up_proj`; qwenlab.model.packing maps
them to and from HF names), the attention implementation and the per-layer devices of a split model.
No transformers import here.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from qwenlab.model.config import Qwen3Config, is_moe_layer
from qwenlab.model.hooks import HIDDEN, HookPoint
from qwenlab.model.kv_cache import KVCache, LayerKV
from qwenlab.model.moe import SparseMoE
from qwenlab.model.projection import make_linear, prefill_layer, project, project_parts
from qwenlab.quant.linear import QuantInfo

ATTENTIONS = ("sdpa", "eager")


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


class Rotary(nn.Module):
    """RoPE tables. inv_freq is computed on the CPU in float32 exactly as the reference does, once, at
    construction (a buffer: it follows the model's device; not saved in checkpoints)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta ** exponents), persistent=False)

    def forward(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, head_dim] for integer positions, computed in float32 like the reference."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config, prefix: str, fused: bool, quant: QuantInfo | None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        H, bias = cfg.hidden_size, cfg.attention_bias
        if fused:
            self.qkv_proj = nn.Linear(H, sum(self.sizes), bias=bias)
        else:
            self.q_proj = make_linear(prefix + "q_proj", H, cfg.q_size, bias, quant)
            self.k_proj = make_linear(prefix + "k_proj", H, cfg.kv_size, bias, quant)
            self.v_proj = make_linear(prefix + "v_proj", H, cfg.kv_size, bias, quant)
        self.hook_q_proj = HookPoint(("T", "heads*head_dim"), ("q_proj", "output"))
        self.hook_k_proj = HookPoint(("T", "kv_heads*head_dim"), ("k_proj", "output"))
        self.hook_v_proj = HookPoint(("T", "kv_heads*head_dim"), ("v_proj", "output"))
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.hook_q_norm = HookPoint(("T", "heads", "head_dim"), ("q_norm", "output"))
        self.hook_k_norm = HookPoint(("T", "kv_heads", "head_dim"), ("k_norm", "output"))
        self.hook_q_rope = HookPoint(("T", "heads", "head_dim"), ("q_norm", "rope"))
        self.hook_k_rope = HookPoint(("T", "kv_heads", "head_dim"), ("k_norm", "rope"))
        self.hook_context = HookPoint(("T", "heads*head_dim"), ("o_proj", "input"))
        self.o_proj = make_linear(prefix + "o_proj", cfg.q_size, H, bias, quant)
        self.hook_o_proj = HookPoint(HIDDEN, ("o_proj", "output"))

    def projections(self, x, kernels):
        if hasattr(self, "qkv_proj"):
            return project(self.qkv_proj, x, kernels).split(self.sizes, dim=-1)
        return project_parts((self.q_proj, self.k_proj, self.v_proj), x, kernels)

    def forward(self, x, cos, sin, mask, kv: LayerKV | None, attention: str, kernels):
        """kv: this layer's view of the cache (KVCache.layer), or None."""
        B, T, _ = x.shape
        q, k, v = self.projections(x, kernels)
        q, k, v = self.hook_q_proj(q), self.hook_k_proj(k), self.hook_v_proj(v)
        q = self.hook_q_norm(self.q_norm(q.view(B, T, self.n_heads, self.head_dim))).transpose(1, 2)
        k = self.hook_k_norm(self.k_norm(k.view(B, T, self.n_kv, self.head_dim))).transpose(1, 2)
        q = self.hook_q_rope((q * cos + rotate_half(q) * sin).transpose(1, 2)).transpose(1, 2)
        k = self.hook_k_rope((k * cos + rotate_half(k) * sin).transpose(1, 2)).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if kv is not None:
            k, v = kv.update(k, v)
        if T == 1 and kv is not None and kv.static_shapes and kernels is not None:
            ctx = kernels.attention(q, k, v, kv.pos)
        else:
            ctx = attend(q, k, v, mask, attention)
        ctx = self.hook_context(ctx.transpose(1, 2).reshape(B, T, -1))
        return self.hook_o_proj(project(self.o_proj, ctx, kernels))


def causal_mask(T: int, S: int, past: int, device) -> torch.Tensor:
    """Boolean [T, S] mask, True where query i (at position past+i) may attend key j."""
    return torch.arange(S, device=device)[None, :] <= (past + torch.arange(T, device=device))[:, None]


def attend(q, k, v, mask, attention: str):
    """q [B,H,T,D], k/v [B,KVH,S,D] -> [B,H,T,D]; eager mirrors the reference's math op for op.
    mask: boolean [T, S], or None when the queries are the last T of the S keys (causal)."""
    T, S = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    if attention == "sdpa":
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
    def __init__(self, cfg: Qwen3Config, prefix: str, fused: bool, quant: QuantInfo | None):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        if fused:
            self.gate_up_proj = nn.Linear(H, 2 * I, bias=False)
        else:
            self.gate_proj = make_linear(prefix + "gate_proj", H, I, False, quant)
            self.up_proj = make_linear(prefix + "up_proj", H, I, False, quant)
        self.hook_gate_proj = HookPoint(("T", "intermediate"), ("gate_proj", "output"))
        self.hook_up_proj = HookPoint(("T", "intermediate"), ("up_proj", "output"))
        self.hook_act = HookPoint(("T", "intermediate"), ("act_fn", "output"))
        self.down_proj = make_linear(prefix + "down_proj", I, H, False, quant)
        self.hook_down_proj = HookPoint(HIDDEN, ("down_proj", "output"))

    def forward(self, x, kernels):
        if hasattr(self, "gate_up_proj"):
            gate, up = project(self.gate_up_proj, x, kernels).chunk(2, dim=-1)
        else:
            gate, up = project_parts((self.gate_proj, self.up_proj), x, kernels)
        gate, up = self.hook_gate_proj(gate), self.hook_up_proj(up)
        act = self.hook_act(F.silu(gate))
        return self.hook_down_proj(project(self.down_proj, act * up, kernels))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer: int, fused: bool, quant: QuantInfo | None):
        super().__init__()
        prefix = f"model.layers.{layer}."
        self.hook_input = HookPoint(HIDDEN, ("", "input"))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hook_input_layernorm = HookPoint(HIDDEN, ("input_layernorm", "output"))
        self.self_attn = Attention(cfg, prefix + "self_attn.", fused, quant)
        self.hook_post_attention_residual = HookPoint(HIDDEN, ("post_attention_layernorm", "input"))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hook_post_attention_layernorm = HookPoint(HIDDEN, ("post_attention_layernorm", "output"))
        self.mlp = SparseMoE(cfg, prefix + "mlp.", quant) if is_moe_layer(cfg, layer) else \
            MLP(cfg, prefix + "mlp.", fused, quant)
        self.hook_output = HookPoint(HIDDEN, ("", "output"))

    def forward(self, x, cos, sin, mask, kv, attention: str, kernels):
        x = self.hook_input(x)
        h = self.hook_input_layernorm(self.input_layernorm(x))
        x = self.hook_post_attention_residual(x + self.self_attn(h, cos, sin, mask, kv, attention, kernels))
        h = self.hook_post_attention_layernorm(self.post_attention_layernorm(x))
        return self.hook_output(x + self.mlp(h, kernels))


class Backbone(nn.Module):
    def __init__(self, cfg: Qwen3Config, fused: bool, quant: QuantInfo | None):
        super().__init__()
        # built on the meta device (the loader, meta_model): no random init, whose normal_ there runs through
        # torch._refs and imports torch._dynamo, 2-3 s of every process that loads a model
        table = torch.empty(cfg.vocab_size, cfg.hidden_size) if torch.get_default_device().type == "meta" else None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=table)
        self.hook_embed = HookPoint(HIDDEN, ("embed_tokens", "output"))
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, fused, quant) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hook_norm = HookPoint(HIDDEN, ("norm", "output"))


class Qwen3(nn.Module):
    """`model(ids)` -> logits [B, T, V]. Module names match HF checkpoints (model.layers.0.self_attn.q_proj...).

    attention: "sdpa" or "eager" (a forward may ask for the other one without changing the model); fused: q/k/v and
    gate/up as one parameter each; quantization: the loader's QuantInfo (None: dense); layer_devices: one device per
    decoder layer for a model split across devices (None: one device)."""

    def __init__(self, cfg: Qwen3Config, *, attention: str = "sdpa", fused: bool = False,
                 quantization: QuantInfo | None = None, layer_devices: list[str] | None = None):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, not {attention!r}")
        self.config = cfg
        self.attention = attention
        self.fused = fused
        self.quantization = quantization
        self.layer_devices = list(layer_devices) if layer_devices else None
        self.model = Backbone(cfg, fused, quantization)
        self.lm_head = make_linear("lm_head", cfg.hidden_size, cfg.vocab_size, False, quantization)
        self.hook_logits = HookPoint(("T", "vocab"), ("lm_head", "output"))

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    @property
    def is_split(self) -> bool:
        return self.layer_devices is not None and len(set(self.layer_devices)) > 1

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, *, last_only: bool = False,
                attention: str | None = None, kernels=None) -> torch.Tensor:
        """ids [T] or [B, T] -> logits [B, T, V] ([B, 1, V] with last_only). cache: positions continue after its
        length and keys/values are written to it. attention overrides the model's for this call only. kernels:
        the decode engine's (qwenlab.generation), for a one-token step over a static cache."""
        if ids.dim() == 1:
            ids = ids[None]
        T = ids.shape[1]
        positions = cache.positions(T, ids.device) if cache is not None else torch.arange(T, device=ids.device)
        mask = cache.attention_mask(T) if cache is not None else None
        attention = attention or self.attention
        x = self.model.hook_embed(self.model.embed_tokens(ids))
        if kernels is None:
            cos, sin = self.model.rotary(positions, x.dtype)
        else:  # the engine's step: a table of every slot's (DecodeKernels.rotary)
            cos, sin = kernels.rotary(self.model.rotary, positions, x.dtype, cache.max_len)
        nvfp4 = kernels is None and self.quantization is not None and self.quantization.kernel == "triton"
        split = self.is_split
        for i, layer in enumerate(self.model.layers):
            if self.layer_devices is not None and x.device != torch.device(self.layer_devices[i]):
                x, cos, sin, mask = _moved(torch.device(self.layer_devices[i]), x, cos, sin, mask)
            kv = cache.layer(i) if cache is not None else None
            with _layer_device(x.device, split):
                if kernels is None:  # a prefill over NVFP4 Triton linears: the layer's weights in one launch
                    x = layer(x, cos, sin, mask, kv, attention, prefill_layer(layer, x) if nvfp4 else None)
                else:  # the engine's step: its fused kernels, or one layer compiled once for all (DecodeKernels.layer)
                    x = kernels.layer(layer, x, cos, sin, mask, kv, attention)
        if cache is not None:
            cache.advance(T)
        x = x.to(self.model.norm.weight.device)
        x = self.model.norm(x) if kernels is None else kernels.norm(self.model.norm, x)
        if last_only:
            x = x[:, -1:]
        x = self.model.hook_norm(x)
        head = self.lm_head.weight if isinstance(self.lm_head, nn.Linear) else self.lm_head.packed
        return self.hook_logits(project(self.lm_head, x.to(head.device), kernels))


def _layer_device(device: torch.device, split: bool):
    """A layer of a model split across GPUs runs with its GPU current, where Triton launches its kernels."""
    if split and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _moved(device, *tensors):
    return tuple(t.to(device, non_blocking=True) if t is not None else None for t in tensors)
