"""Token generation: kv (cache) or replay (recompute everything each step), with per-token timings.

The loop is the same for every engine (qwenlab.generation.engine): prefill with the forward, then per token
either the captured graph's replay or the forward on one token (kv) or on the whole sequence (replay).

Greedy decoding on the graph engine with nobody reading the logits (no on_logits) runs ahead of the host: each
replay feeds the graph the token the previous one chose on the device (CapturedStep.replay_chained), and the host
reads the tokens back one step behind, through pinned memory, while the next step already runs (ChainedGreedy). A
stop token is then seen one step late: the step launched past it is taken back (cache cropped), so the tokens, the
cache and the stop reasons are those of the step-by-step loop.
"""
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from qwenlab.errors import QwenlabError
from qwenlab.generation.engine import Engine
from qwenlab.generation.sampling import Sampler, SamplingParams

MODES = ("kv", "replay")


@dataclass
class Generation:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = ""
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    engine: str = "eager"
    engine_note: str = ""  # why `auto` ran eager; for graph, which kernels it uses
    compile_s: float = 0.0  # compile + graph capture in this call, not counted in prefill_s or step_s

    @property
    def decode_tok_s(self) -> float:
        return len(self.step_s) / sum(self.step_s) if self.step_s else 0.0

    def to_json(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "ids": self.ids, "text": self.text, "stop_reason": self.stop_reason,
                "prefill_s": self.prefill_s, "step_s": self.step_s, "decode_tok_s": self.decode_tok_s,
                "engine": self.engine, "engine_note": self.engine_note, "compile_s": self.compile_s}


def stop_reason(token, generated: int, fed: int, stop_ids, max_new_tokens: int, max_len: int) -> str:
    """Why generation ends with `token`, the generated-th new token, chosen after `fed` tokens (prompt included):
    'stop_token', 'max_new_tokens', 'context_full', or '' when it goes on (token None: only the limits known in
    advance)."""
    if token in stop_ids:
        return "stop_token"
    if generated >= max_new_tokens:
        return "max_new_tokens"
    if fed + 1 >= max_len:
        return "context_full"
    return ""


class ChainedGreedy:
    """A captured step's greedy tokens, read back asynchronously: launch() replays the step on the last chosen token
    and queues the copy of its choice into pinned host memory; read(i) waits for the i-th chosen token only (token 0
    is the prefill's). Nothing else synchronises the host with the device."""

    def __init__(self, step, prefill_logits: torch.Tensor, capacity: int):
        self.step = step
        self.host = torch.empty(capacity, dtype=torch.long, pin_memory=True)
        self.events: list[torch.cuda.Event] = []
        step.token.copy_(prefill_logits[:, -1].argmax(dim=-1, keepdim=True))
        self._queue_copy()

    def _queue_copy(self):
        i = len(self.events)
        self.host[i:i + 1].copy_(self.step.token.view(1), non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.step.token.device))  # the copy's stream, on any GPU
        self.events.append(event)

    def launch(self):
        self.step.replay_chained()
        self._queue_copy()

    def read(self, i: int) -> int:
        self.events[i].synchronize()
        return int(self.host[i])


def decode_ahead(pipe, out: Generation, seq: list[int], cache, stop_ids: set, max_new_tokens: int, max_len: int,
                 on_token=None, should_stop=None):
    """The step-by-step loop's tokens and stop reasons with one step always queued ahead: before waiting for token
    i, the step that turns it into token i+1 is launched, unless a known limit says token i is the last. When token
    i ends the generation (a stop token, should_stop()), the step queued past it is taken back: the cache is cropped
    to the tokens fed, as the step-by-step loop leaves it. `pipe`: launch() and read(i) (ChainedGreedy)."""
    launched = 0  # steps queued; token i+1 comes from step i+1
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        if should_stop is not None and should_stop():
            out.stop_reason = "stopped"
            break
        last = stop_reason(None, i + 1, len(seq), (), max_new_tokens, max_len)  # a known end: queue nothing past it
        if not last and launched == i:
            pipe.launch()
            launched += 1
        token = pipe.read(i)
        out.ids.append(token)
        if on_token is not None:
            on_token(token)
        out.stop_reason = stop_reason(token, len(out.ids), len(seq), stop_ids, max_new_tokens, max_len)
        now = time.perf_counter()
        out.step_s.append(now - t0)
        t0 = now
        if out.stop_reason:
            break
        seq.append(token)
    if cache.length > len(seq):  # a step launched past the end: its K/V go, as if it never ran
        pipe.read(launched)  # let it finish before its slots are reused
        cache.crop(len(seq))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_context(model, n_tokens: int, what: str = "prompt"):
    limit = model.config.max_position_embeddings
    if n_tokens > limit:
        raise QwenlabError(f"{what} has {n_tokens} tokens, more than max_position_embeddings={limit}")
    if n_tokens == 0:
        raise QwenlabError(f"{what} is empty (0 tokens)")


def engine_for(model, engine: "str | Engine") -> Engine:
    if isinstance(engine, Engine):
        if engine.model is not model:
            raise QwenlabError("the engine given belongs to another model")
        return engine
    return Engine(model, engine)


def new_cache(model, max_len: int, preallocate: bool = True, engine: "str | Engine" = "eager"):
    """A cache for `engine` (static for graph unless preallocate=False: a grown cache always decodes eager)."""
    return engine_for(model, engine).new_cache(max_len, preallocate)


@torch.inference_mode()
def generate(model, prompt_ids: list[int], params: SamplingParams = SamplingParams(), *,
             stop_ids=(), mode: str = "kv", cache=None, engine: "str | Engine" = "auto",
             on_token: Callable[[int], None] | None = None, on_logits: Callable[[torch.Tensor], None] | None = None,
             should_stop: Callable[[], bool] | None = None, tokenizer=None) -> Generation:
    """Generates after prompt_ids. `ids` holds the generated tokens, the stop token included when one ended it.

    engine: auto | graph | eager, or an Engine (reused across calls: its compiled step and graphs stay).
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
    run = engine_for(model, engine).prepare(mode, cache, min(limit, len(prompt_ids) + params.max_new_tokens))
    cache, step = run.cache, run.step
    out = Generation(list(prompt_ids), engine=run.engine, engine_note=run.note, compile_s=run.compile_s)
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

    if step is not None and params.greedy and on_logits is None:
        out.engine_note += "; greedy tokens chosen on the device, read back one step behind"
        pipe = ChainedGreedy(step, logits, params.max_new_tokens + 1)
        decode_ahead(pipe, out, seq, cache, stop_ids, params.max_new_tokens, max_len, on_token, should_stop)
    else:
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
            out.stop_reason = stop_reason(token, len(out.ids), len(seq), stop_ids, params.max_new_tokens, max_len)
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
