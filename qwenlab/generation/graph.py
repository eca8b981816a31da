"""The CUDA decode engine: the model's own forward (probe=None) for one token, with static shapes over a
StaticKVCache, compiled by torch.compile (fused elementwise kernels) and captured as one CUDA graph. A decode step
is then one graph replay: no Python, no per-kernel launches. Prefill stays the ordinary forward (SDPA/flash).

Compiled code is kept per model and reused by every cache of the same shape; torch's on-disk inductor and Triton
caches make a second process compile much faster. A captured graph belongs to its cache (`cache.captured`)
and is freed with it.
"""
import time
import weakref

import torch

from qwenlab.model.kv_cache import StaticKVCache
from qwenlab.model.placement import is_split, layer_devices
from qwenlab.model.qwen3 import Qwen3

_compiled: "weakref.WeakKeyDictionary[Qwen3, object]" = weakref.WeakKeyDictionary()
_pool: "weakref.WeakKeyDictionary[Qwen3, StaticKVCache]" = weakref.WeakKeyDictionary()
MIN_POOLED_LEN = 512


def graph_unavailable(model: Qwen3) -> str | None:
    """Why the graph engine cannot run for this model, or None when it can."""
    if model.device.type != "cuda":
        return f"the graph engine needs CUDA (the model is on {model.device})"
    if is_split(model):
        return f"the model is split across {', '.join(sorted(set(layer_devices(model))))}: a graph captures one device"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def _one_token(model: Qwen3, token: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    return model(token, cache=cache, last_only=True)


def compiled_step(model: Qwen3, compile: bool = True):
    """torch.compile of the one-token forward for this model (built once, reused by every cache)."""
    if not compile:
        return _one_token
    if model not in _compiled:
        _compiled[model] = torch.compile(_one_token, dynamic=False)
    return _compiled[model]


class CapturedStep:
    """One decode step of `model` over `cache` as a CUDA graph: write the token id into `token`, call replay(),
    read `logits`. Each replay writes K/V at cache.pos, advances it and cache.length."""

    def __init__(self, model: Qwen3, cache: StaticKVCache, compile: bool = True, kernels: bool = True):
        model.fuse_projections()
        self.kernels = use_kernels(model, kernels)
        self.cache, self.compiled = cache, compile
        self.token = torch.zeros((1, 1), dtype=torch.long, device=model.device)
        step = compiled_step(model, compile)
        t0 = time.perf_counter()
        length = cache.length
        cache.static_shapes = True
        try:
            side = torch.cuda.Stream(model.device)
            side.wait_stream(torch.cuda.current_stream(model.device))
            with torch.cuda.stream(side):
                for _ in range(3):  # the first call compiles; the next ones settle cuBLAS/Triton workspaces
                    step(model, self.token, cache)
            torch.cuda.current_stream(model.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = step(model, self.token, cache)
        finally:
            cache.static_shapes = False
            cache.crop(length)  # the warm-up steps wrote scratch slots past `length`; pos goes back too
            use_kernels(model, False)  # the graph keeps its kernels; eager calls of the model stay plain torch
        torch.cuda.synchronize(model.device)
        self.capture_s = time.perf_counter() - t0

    def replay(self, token: int) -> torch.Tensor:
        self.token.fill_(token)
        self.graph.replay()
        self.cache.length += 1
        return self.logits


def use_kernels(model: Qwen3, enabled: bool = True) -> dict:
    """The graph engine's Triton kernels: the split-K attention over the static cache, and the GEMV for each
    projection shape where it measures faster than cuBLAS on this device. -> what was chosen, for the record."""
    from qwenlab.generation.decode_attention import decode_attention_static  # lazy: Triton exists only with CUDA
    from qwenlab.generation.gemv import use_gemv  # lazy: the same

    for layer in model.model.layers:
        layer.self_attn.decode_kernel = decode_attention_static if enabled else None
    gemv = use_gemv(model, enabled)
    return {"attention": "split-K Triton" if enabled else "torch",
            "gemv": sorted(f"{n}x{k}" for (n, k), used in gemv.items() if used)}


def captured_step(model: Qwen3, cache: StaticKVCache, compile: bool = True) -> tuple[CapturedStep, float]:
    """The cache's captured step, made on first use. -> (step, seconds spent compiling/capturing in this call)."""
    step = getattr(cache, "captured", None)
    if step is not None:
        return step, 0.0
    cache.captured = step = CapturedStep(model, cache, compile)
    return step, step.capture_s


def pooled_cache(model: Qwen3, needed: int) -> StaticKVCache:
    """A static cache of at least `needed` positions for one-off generations, kept per model so that the next call
    reuses it and its captured graph (the playground's second Generate). Lengths are powers of two from 512."""
    limit = model.config.max_position_embeddings
    cache = _pool.get(model)
    if cache is not None and cache.max_len >= needed:
        cache.crop(0)
        return cache
    _pool.pop(model, None)
    size = MIN_POOLED_LEN
    while size < needed:
        size *= 2
    cache = StaticKVCache.for_config(model.config, max_len=min(size, limit), dtype=model.dtype, device=model.device)
    _pool[model] = cache
    return cache
