"""The decode engine's kernel choices for a one-token step over a static cache, handed to the model's forward as
`kernels` (the model itself never changes): each decoder layer as qwenlab's fused kernels where they fit it
(qwenlab.generation.fused_layer: dense bf16/fp16/fp32 or W4A16 NVFP4), any other layer through `run_layer` with
the split-K Triton attention over the whole cache and, for each projection shape, the Triton GEMV where it measured
faster than cuBLAS on this device. Triton exists only with CUDA, so it is imported when kernels are chosen, never
on the CPU."""
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qwenlab.model.hooks import HookPoint
from qwenlab.model.projection import nvfp4_groups
from qwenlab.quant.linear import global_hooks, plain_w4a16


def call_layer(layer: nn.Module, *args):
    """A decoder layer's forward: what the engine compiles once, for every layer (DecodeKernels.run_layer)."""
    return layer(*args)


@dataclass(frozen=True)
class DecodeKernels:
    attend: Callable  # (q, k, v, pos) -> context, for one query token over every cache slot
    gemv: Callable | None = None  # (x, weight, bias) -> y for one row
    gemv_shapes: frozenset = field(default_factory=frozenset)  # (N, K) of the weights the GEMV runs
    nvfp4_parts: Callable | None = None  # (x, [packed], [block_scale], [tensor_scale]) -> outputs concatenated
    nvfp4_gemv: str = ""  # which NVFP4 GEMV runs for the model's activations: "wide", "mma" or "fma" (gemv_engine)
    run_layer: Callable = call_layer  # (layer, x, cos, sin, mask, kv, attention, kernels) -> x: call_layer, compiled
    fused: object | None = None  # fused_layer.FusedLayers: the layers it fits run as its kernels
    tables: dict = field(default_factory=dict)  # (slots, dtype, device) -> RoPE cos/sin of every slot [slots, 2, D]

    def layer(self, layer: nn.Module, x, cos, sin, mask, kv, attention: str):
        """One decoder layer of the step: the fused kernels where they fit it, else run_layer (its forward)."""
        if self.fused is not None and fits(layer, x, kv) is None:
            return self.fused.layer(layer, x, cos, sin, kv)
        return self.run_layer(layer, x, cos, sin, mask, kv, attention, self)

    def rotary(self, rotary: nn.Module, positions, dtype, slots: int):
        """RoPE's cos/sin at `positions` of a cache of `slots`: with the fused layers, gathered from a table of every
        slot's, made once per cache length and dtype by the same module (so the same values: one gather in the step
        where computing them took seven kernels; the warm-up before a capture makes it), else computed."""
        if self.fused is None:
            return rotary(positions, dtype)
        key = (slots, dtype, str(positions.device))
        if key not in self.tables:
            self.tables[key] = torch.stack(rotary(torch.arange(slots, device=positions.device), dtype), dim=1)
        both = self.tables[key][positions]
        return both[:, 0], both[:, 1]

    def norm(self, norm: nn.Module, x):
        """The final RMSNorm of a one-token step: with the fused layers, one kernel rounding as the forward rounds
        (fused_layer.FusedLayers.add_norm) where nothing is hooked on the module and its weight is in x's dtype and
        device, else the module."""
        if (self.fused is None or x.shape[-2] != 1 or norm.weight.dtype != x.dtype or norm.weight.device != x.device
                or hooked(norm)):
            return norm(x)
        return self.fused.add_norm(x.reshape(-1), norm=norm)[1].reshape(x.shape)

    def linear(self, module: nn.Module, x):
        if type(module) is nn.Linear and x.numel() == module.in_features:
            if tuple(module.weight.shape) in self.gemv_shapes:
                return self.gemv(x, module.weight, module.bias)
            return F.linear(x, module.weight, module.bias)
        return module(x)

    def linear_parts(self, modules: tuple, x) -> tuple:
        """Each module on the same one-row x: W4A16 NVFP4 linears (Triton kernel, no bias, no hooks) as one GEMV
        launch over their separate weights, split back; anything else one by one as `linear`."""
        if (self.nvfp4_parts is not None and x.numel() == modules[0].in_features
                and all(plain_w4a16(m) for m in modules)):
            y = self.nvfp4_parts(x, [m.packed for m in modules], [m.block_scale for m in modules],
                                 [m.tensor_scale for m in modules])
            return y.split([m.out_features for m in modules], dim=-1)
        return tuple(self.linear(m, x) for m in modules)

    def attention(self, q, k, v, pos):
        return self.attend(q, k, v, pos)

    def describe(self) -> dict:
        return {"layers": self.fused.note() if self.fused else None,
                "attention": "split-K Triton",
                "gemv": sorted(f"{n}x{k}" for n, k in self.gemv_shapes),
                "nvfp4": (f"one {NVFP4_GEMVS.get(self.nvfp4_gemv, 'Triton')} GEMV launch per q/k/v and per gate/up"
                          if self.nvfp4_parts else None)}


NVFP4_GEMVS = {"wide": "wide-load (Gluon)", "mma": "tensor-core (bf16 mma.sync, Gluon)", "fma": "Triton FMA"}


def layer_weights(layer: nn.Module) -> list:
    """The four weights a dense fused layer multiplies by (q/k/v, o, gate/up, down), or [] for a layer of another
    structure: q/k/v and gate/up not fused into one plain linear each, NVFP4, MoE, a bias."""
    attn, mlp = layer.self_attn, layer.mlp
    linears = [getattr(attn, "qkv_proj", None), attn.o_proj, getattr(mlp, "gate_up_proj", None),
               getattr(mlp, "down_proj", None)]
    if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
        return []
    return [m.weight for m in linears]


def nvfp4_linears(layer: nn.Module) -> list:
    """The seven linears of a layer whose every projection is the W4A16 NVFP4 Triton GEMV (q, k, v, o, gate, up,
    down), or [] (qwenlab.model.projection.nvfp4_groups)."""
    return [m for group in nvfp4_groups(layer) or () for m in group]


def layer_kind(layer: nn.Module) -> str | None:
    """"dense" (layer_weights), "nvfp4" (nvfp4_linears) or None: which fused layer can run it."""
    return "dense" if layer_weights(layer) else "nvfp4" if nvfp4_linears(layer) else None


def fits(layer: nn.Module, x: torch.Tensor, kv) -> str | None:
    """Why the fused layer cannot run this layer for this step, or None when it can: a one-token step over a static
    cache; a dense layer with q/k/v and gate/up fused into one plain linear each, or one whose seven projections are
    all the W4A16 NVFP4 Triton GEMV, with no bias; norms, dense weights and cache in x's dtype and on its device;
    nothing installed that the layer's forward would run (a hook point's function, a module hook)."""
    if x.shape[-2] != 1 or not getattr(kv, "static_shapes", False):
        return "not a one-token step over a static cache"
    if global_hooks():
        return "a global module hook is installed"
    attn, kind = layer.self_attn, layer_kind(layer)
    if kind is None:
        return ("its projections are neither plain fused linears nor all W4A16 NVFP4 Triton GEMVs, without bias "
                "(unfused dense, MoE, another NVFP4 kernel)")
    if attn.head_dim % 2:
        return f"head_dim {attn.head_dim} is odd"
    params = layer_weights(layer) + [layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                                     attn.q_norm.weight, attn.k_norm.weight]
    if any(p.dtype != x.dtype or p.device != x.device for p in params) or kv.k.dtype != x.dtype:
        return "its weights or cache are not all in the activations' dtype and device"
    if any(hooked(m) for m in layer.modules()):
        return "a hook is installed in the layer"
    return None


def hooked(module: nn.Module) -> bool:
    """A module hook on `module` (its own or a global one), or a hook point function when it is a HookPoint."""
    return bool(module._forward_hooks or module._forward_pre_hooks or (isinstance(module, HookPoint) and module.fns)
                or global_hooks())


def decode_linears(model) -> list[nn.Linear]:
    """Every plain nn.Linear a decode step multiplies by (fused projections, HF-named ones, lm_head)."""
    return [m for m in model.modules() if type(m) is nn.Linear]


def choose_kernels(model, timings: dict, fused: bool = True) -> DecodeKernels:
    """Measures cuBLAS against the Triton GEMV once per (N, K, dtype, device) into `timings` (the engine's) and
    keeps the GEMV where it is at least 3% faster. fused: dense layers run as the fused kernels, whatever cuBLAS
    measured on their shapes."""
    from qwenlab.generation.decode_attention import decode_attention_static  # Triton: only where CUDA is
    from qwenlab.generation.gemv import gemv, linear_timings  # the same

    chosen = set()
    for linear in decode_linears(model):
        weight = linear.weight
        key = (*weight.shape, weight.dtype, str(weight.device))
        if key not in timings:
            timings[key] = linear_timings(weight)
        cublas_us, triton_us = timings[key]
        if triton_us < 0.97 * cublas_us:
            chosen.add(tuple(weight.shape))
    parts, engine, layer_gemv = None, "", None
    if any(plain_w4a16(m) for m in model.modules()):
        from qwenlab.quant.triton_nvfp4 import gemv_engine, layer_gemv, nvfp4_gemv_parts  # the same

        parts = nvfp4_gemv_parts
        engine = gemv_engine(torch.empty(1, 1, dtype=model.dtype, device=model.device))
    layers = None
    if fused and any(layer_kind(layer) for layer in model.model.layers):
        from qwenlab.generation.fused_layer import FusedLayers, pdl_wanted  # the same

        layers = FusedLayers(pdl_wanted(model.device), nvfp4_parts=parts,
                             nvfp4_layer_gemv=layer_gemv if engine == "wide" else None)
        layers.prepare(model.device, model.config.num_key_value_heads)
    return DecodeKernels(decode_attention_static, gemv, frozenset(chosen), parts, engine, fused=layers)
