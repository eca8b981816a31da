"""The decode engine: one object owns a model's decode state, so nothing is kept in modules or globals.

`graph` (CUDA): prefill with the ordinary forward, then each token is one replay of a CUDA graph of the one-token
step over a static cache (qwenlab.generation.graph), with the engine's kernels (qwenlab.generation.kernels).
`eager`: the forward once per token. `auto`: graph where it can run, else eager, saying why.
A decoder layer runs as qwenlab's fused kernels where they fit it (qwenlab.generation.fused_layer: dense bf16, fp16
or fp32 with fused projections, or W4A16 NVFP4; no hook installed; `fused=False`: never). Any other layer runs its
forward, for which torch.compile compiles one decoder layer before the first capture, whose code every such layer
then runs (COMPILES: or the whole step, which leaves out the fused kernels, or nothing). On one H200, Qwen3-4B
shape, the layer compiled in 5.3 s against 36.2 s for the whole step and replays 1.4% (bf16) / 0.9% (NVFP4) slower
(bench/decode_profile.py, doc/performance.md).
The engine keeps the compiled code, the kernel choices and their timings, the captured graph of each static cache
it made (and, in `captures`, each capture's cache length, seconds and graphs compiled: a new length compiles
again), and a pooled cache for one-off generations (so the playground's second Generate reuses the graph).
"""
import time
import weakref
from dataclasses import dataclass, replace

import torch

from qwenlab.errors import QwenlabError
from qwenlab.generation.graph import CapturedStep, one_token
from qwenlab.generation.kernels import DecodeKernels, call_layer, choose_kernels
from qwenlab.model.kv_cache import KVCache, StaticKVCache

ENGINES = ("auto", "graph", "eager")
# what torch.compile compiles before a capture (and how the engine's note says it): one decoder layer, whose compiled
# code every layer runs (the default: seconds, where the whole step was a minute on the Qwen3-4B shape), the whole
# one-token step (lets Inductor fuse across layer boundaries), or nothing (eager kernels captured as they are).
COMPILES = {"layer": "torch.compile: one decoder layer, run by every layer", "step": "torch.compile: the whole step",
            "none": "not compiled"}
MIN_POOLED_LEN = 512


def cache_length_for(needed: int, shortest: int, limit: int) -> int:
    """The cache length a graph is captured for: `shortest`, doubled until `needed` fits, at most `limit` (the
    model's context)."""
    size = shortest
    while size < needed:
        size *= 2
    return min(size, limit)


def graph_unavailable(model) -> str | None:
    """Why the graph engine cannot run this model, or None when it can."""
    if model.device.type != "cuda" or not torch.cuda.is_available():
        return f"the graph engine needs CUDA (the model is on {model.device})"
    if model.is_split:
        return f"the model is split across {', '.join(sorted(set(model.layer_devices)))}: a graph captures one device"
    if model.config.is_moe:
        return "a MoE model's experts are picked per token on the host (qwenlab.model.moe.mix): no graph can hold it"
    return None


@dataclass
class Prepared:
    """What one generation runs on: its cache, the captured step (None: eager), and what to tell the user."""
    cache: KVCache | None
    step: CapturedStep | None
    engine: str
    note: str
    compile_s: float = 0.0


class Engine:
    """compile: one of COMPILES (True: "layer", False: "none"). fused: decoder layers as the fused kernels where they
    fit (not with compile "step", which compiles every layer's forward into the step). min_cache_len: the
    shortest pooled cache (a power of two from 512 otherwise). Compiled code is static-shaped, so every new
    cache length compiles again (with the whole step compiled: 131 s and 86 s on the Qwen3-32B shape, against
    0.2 s for another cache of a length already compiled): a caller that decodes sequences of several lengths in
    one process gives the longest here and makes its other caches that long too (notebook 04, one compile)."""

    def __init__(self, model, kind: str = "auto", *, compile: bool | str = True, fused: bool = True,
                 min_cache_len: int = MIN_POOLED_LEN):
        if kind not in ENGINES:
            raise QwenlabError(f"engine={kind!r}: choose one of {', '.join(ENGINES)}")
        compile = {True: "layer", False: "none"}[compile] if isinstance(compile, bool) else compile
        if not isinstance(compile, str) or compile not in COMPILES:
            raise QwenlabError(f"compile={compile!r}: choose one of {', '.join(COMPILES)}")
        if not isinstance(min_cache_len, int) or min_cache_len < 1:
            raise QwenlabError(f"min_cache_len={min_cache_len!r}: give a positive number of positions")
        why = graph_unavailable(model) if kind != "eager" else None
        if kind == "graph" and why:
            raise QwenlabError(f"engine graph: {why} (use engine auto or eager)")
        self.model, self.asked, self.compile, self.min_cache_len = model, kind, compile, min_cache_len
        self.fused = bool(fused) and compile != "step"
        self.kind = "eager" if kind == "eager" or why else "graph"
        self.note = why or ""
        self.kernels: DecodeKernels | None = None
        self.timings: dict = {}  # (N, K, dtype, device) -> (cuBLAS us, GEMV us), measured once
        self._step_fn = None
        self._graphs: "weakref.WeakKeyDictionary[StaticKVCache, CapturedStep]" = weakref.WeakKeyDictionary()
        self._pool: StaticKVCache | None = None
        # each graph captured, in order: {"max_len", "seconds" (all of it), "kernels_s" (choosing the kernels, first
        # capture only), "first_call_s" (the step's first call: compiling it where it is new), "graphs_compiled"}
        self.captures: list[dict] = []

    def new_cache(self, max_len: int, preallocate: bool = True) -> KVCache:
        """A cache this engine decodes: static (graph-capturable) for graph unless a grown one is asked for."""
        m = self.model
        if self.kind == "graph" and preallocate:
            return StaticKVCache.for_config(m.config, max_len=max_len, dtype=m.dtype, device=m.device)
        if self.asked == "graph":
            raise QwenlabError("engine graph: a cache grown per step cannot be captured (preallocate it)")
        return KVCache.for_config(m.config, max_len=max_len, dtype=m.dtype, device=m.layer_devices or m.device,
                                  preallocate=preallocate)

    def pooled_cache(self, needed: int) -> StaticKVCache:
        """A static cache of at least `needed` positions, kept for the next one-off generation with its graph.
        Lengths are min_cache_len, doubled until `needed` fits (each new length compiles and captures anew)."""
        if self._pool is not None and self._pool.max_len >= needed:
            self._pool.crop(0)
            return self._pool
        self._pool = None
        self._pool = self.new_cache(cache_length_for(needed, self.min_cache_len,
                                                     self.model.config.max_position_embeddings))
        return self._pool

    def prepare(self, mode: str, cache: KVCache | None, needed: int) -> Prepared:
        """The cache and captured step for one generation (kv: `cache` or a pooled/new one; replay: none)."""
        if mode == "replay":
            note = "replay mode recomputes the whole sequence: no cache to capture" if self.asked != "eager" else ""
            return Prepared(None, None, "eager", note)
        if self.kind == "eager":
            return Prepared(cache or self.new_cache(needed), None, "eager", self.note)
        if cache is not None and not isinstance(cache, StaticKVCache):
            if self.asked == "graph":
                raise QwenlabError("engine graph: the given cache is not a StaticKVCache (make it with "
                                   "Engine.new_cache)")
            return Prepared(cache, None, "eager", "the given cache is not a StaticKVCache (make it with "
                                                  "Engine.new_cache)")
        cache = cache or self.pooled_cache(needed)
        try:
            step, seconds = self.captured(cache)
        except Exception as e:  # noqa: BLE001 - capture fails for reasons of the platform; auto decodes eager
            why = f"graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if self.asked == "graph":
                raise QwenlabError(f"engine graph: {why}") from e
            self.kind, self.note = "eager", why
            return Prepared(cache, None, "eager", why)
        kernels = self.kernels.describe()
        gemv = ", ".join(kernels["gemv"]) or "no shape"
        nvfp4 = f"; NVFP4: {kernels['nvfp4']}" if kernels["nvfp4"] else ""
        compiled = COMPILES[self.compile]
        if kernels["layers"]:
            compiled = f"decoder layers: {kernels['layers']} where they fit, else {compiled}"
        return Prepared(cache, step, "graph", f"attention {kernels['attention']}; Triton GEMV for {gemv}{nvfp4}; "
                        f"{compiled}", seconds)

    def captured(self, cache: StaticKVCache) -> tuple[CapturedStep, float]:
        """The cache's captured step, made on first use. -> (step, seconds spent compiling and capturing now)."""
        if cache in self._graphs:
            return self._graphs[cache], 0.0
        t0 = time.perf_counter()
        if self.kernels is None:
            kernels = choose_kernels(self.model, self.timings, self.fused)
            self.kernels = layer_compiled(kernels) if self.compile == "layer" else kernels
        kernels_s = time.perf_counter() - t0
        if self._step_fn is None:
            self._step_fn = torch.compile(one_token, dynamic=False) if self.compile == "step" else one_token
        graphs = compiled_graphs()
        step = self._graphs[cache] = CapturedStep(self.model, cache, self._step_fn, self.kernels)
        seconds = time.perf_counter() - t0
        self.captures.append({"max_len": cache.max_len, "seconds": round(seconds, 3),
                              "kernels_s": round(kernels_s, 3), "first_call_s": round(step.first_call_s, 3),
                              "graphs_compiled": compiled_graphs() - graphs})
        return step, seconds


def layer_compiled(kernels: DecodeKernels, backend: str = "inductor") -> DecodeKernels:
    """The same kernels with every decoder layer run through one torch.compile of call_layer: the layer's parameters,
    cache view (KVCache.layer) and inputs are the compiled code's inputs, so Dynamo's guards hold for every layer
    and one graph serves them all."""
    return replace(kernels, run_layer=torch.compile(call_layer, dynamic=False, backend=backend))


def compiled_graphs() -> int:
    """How many graphs torch.compile has made in this process so far (Dynamo's own count)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
