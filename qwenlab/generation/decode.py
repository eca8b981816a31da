"""Token generation: kv (cache) or replay (recompute everything each step), with per-token timings.

Two engines run the same forward. `eager` calls it once per token. `graph` (CUDA) prefills with it, then replays
its one-token step as a captured CUDA graph over a static cache (qwenlab/generation/graph.py). `auto` takes
`graph` where it can run and says in the result why it did not.
"""
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from qwenlab.errors import QwenlabError
from qwenlab.generation.graph import captured_step, graph_unavailable, pooled_cache
from qwenlab.generation.sampling import Sampler, SamplingParams
from qwenlab.model.kv_cache import KVCache, StaticKVCache
from qwenlab.model.placement import layer_devices
from qwenlab.model.qwen3 import Qwen3

MODES = ("kv", "replay")
ENGINES = ("auto", "graph", "eager")


@dataclass
class Generation:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = ""
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    engine: str = "eager"
    engine_note: str = ""  # why `auto` (or a `graph` request) ran eager; for graph, which kernels it uses
    compile_s: float = 0.0  # compile + graph capture in this call, not counted in prefill_s or step_s

    @property
    def decode_tok_s(self) -> float:
        return len(self.step_s) / sum(self.step_s) if self.step_s else 0.0

    def to_json(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "ids": self.ids, "text": self.text, "stop_reason": self.stop_reason,
                "prefill_s": self.prefill_s, "step_s": self.step_s, "decode_tok_s": self.decode_tok_s,
                "engine": self.engine, "engine_note": self.engine_note, "compile_s": self.compile_s}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_context(model: Qwen3, n_tokens: int, what: str = "prompt"):
    limit = model.config.max_position_embeddings
    if n_tokens > limit:
        raise QwenlabError(f"{what} has {n_tokens} tokens, more than max_position_embeddings={limit}")
    if n_tokens == 0:
        raise QwenlabError(f"{what} is empty (0 tokens)")


def choose_engine(engine: str, model: Qwen3, mode: str = "kv") -> tuple[str, str]:
    """-> (engine that will run, why it is not the one asked for or not graph under auto; '' when nothing to say)."""
    if engine not in ENGINES:
        raise QwenlabError(f"engine={engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "eager":
        return "eager", ""
    why = graph_unavailable(model) or ("replay mode recomputes the whole sequence: no cache to capture"
                                       if mode == "replay" else None)
    return ("eager", why) if why else ("graph", "")


def new_cache(model: Qwen3, max_len: int, preallocate: bool = True, engine: str = "eager") -> KVCache:
    """A cache for `engine` as choose_engine() resolves it: static (graph-capturable) for graph unless a grown cache
    is asked for (preallocate=False: its shapes change every step, so it always decodes eager)."""
    if preallocate and choose_engine(engine, model)[0] == "graph":
        return StaticKVCache.for_config(model.config, max_len=max_len, dtype=model.dtype, device=model.device)
    return KVCache.for_config(model.config, max_len=max_len, dtype=model.dtype,
                              device=layer_devices(model) or model.device, preallocate=preallocate)


def generate(model: Qwen3, prompt_ids: list[int], params: SamplingParams = SamplingParams(), *,
             stop_ids=(), mode: str = "kv", cache: KVCache | None = None, engine: str = "auto",
             on_token: Callable[[int], None] | None = None, on_logits: Callable[[torch.Tensor], None] | None = None,
             should_stop: Callable[[], bool] | None = None, tokenizer=None) -> Generation:
    """Generates after prompt_ids. `ids` holds the generated tokens, the stop token included when one ended it.

    With `cache`, only the prompt tokens beyond cache.length are prefilled (a chat session's new turn).
    stop_reason: 'stop_token', 'max_new_tokens', 'context_full' or 'stopped' (should_stop() returned True).
    With a tokenizer, stop_ids default to its stop ids and `text` is filled (the stop token left out).
    on_logits(logits [V]) sees the logits each generated token is chosen from, whichever engine runs.
    """
    if tokenizer is not None and not stop_ids:
        stop_ids = tokenizer.stop_ids
    if mode not in MODES:
        raise QwenlabError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
    check_context(model, len(prompt_ids))
    limit = model.config.max_position_embeddings
    used, note = choose_engine(engine, model, mode)
    if used == "graph" and cache is not None and not isinstance(cache, StaticKVCache):
        used, note = "eager", "the given cache is not a StaticKVCache (make it with new_cache(..., engine=...))"
    if mode == "kv" and cache is None:
        needed = min(limit, len(prompt_ids) + params.max_new_tokens)
        cache = pooled_cache(model, needed) if used == "graph" else new_cache(model, needed)
    out = Generation(list(prompt_ids), engine=used, engine_note=note)
    step = None
    if used == "graph":
        try:
            step, out.compile_s = captured_step(model, cache)
            gemv = step.kernels["gemv"] or "none"
            out.engine_note = f"attention: {step.kernels['attention']}; Triton GEMV for {gemv}"
        except Exception as e:  # noqa: BLE001 - capture can fail for reasons of the platform; decode still works
            out.engine, out.engine_note = "eager", f"graph capture failed: {type(e).__name__}: {str(e)[:200]}"
    sampler = Sampler(params, model.device, on_device=step is not None)
    stop_ids, device = set(stop_ids), model.device
    seq = list(prompt_ids)
    max_len = cache.max_len if mode == "kv" else limit

    t0 = time.perf_counter()
    if mode == "kv":
        logits = model(torch.tensor(seq[cache.length:], device=device), cache=cache, last_only=True)
    else:
        logits = model(torch.tensor(seq, device=device), last_only=True)
    _sync(device)
    out.prefill_s = time.perf_counter() - t0

    while True:
        if should_stop is not None and should_stop():
            out.stop_reason = "stopped"
            break
        t0 = time.perf_counter()
        if on_logits is not None:
            on_logits(logits[0, -1])
        token = sampler(logits[0, -1])
        out.ids.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop_ids:
            out.stop_reason = "stop_token"
        elif len(out.ids) >= params.max_new_tokens:
            out.stop_reason = "max_new_tokens"
        elif len(seq) + 1 >= max_len:
            out.stop_reason = "context_full"
        if out.stop_reason:
            out.step_s.append(time.perf_counter() - t0)
            break
        seq.append(token)
        if step is not None:
            logits = step.replay(token)
        elif mode == "kv":
            logits = model(torch.tensor([token], device=device), cache=cache)
        else:
            logits = model(torch.tensor(seq, device=device), last_only=True)
        _sync(device)
        out.step_s.append(time.perf_counter() - t0)
    if tokenizer is not None:
        out.text = tokenizer.decode(out.ids[:-1] if out.stop_reason == "stop_token" else out.ids)
    return out
