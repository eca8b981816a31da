"""One scripted multi-turn chat (data/chat_script.json) under a Policy, every turn tracked: the unit the stress
matrix repeats and notebook 05 measures."""
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from qwenlab.generation.chat import ChatSession
from qwenlab.memory.device import empty_cache
from qwenlab.memory.frame import turn_peaks
from qwenlab.memory.tracker import MemoryTracker
from qwenlab.paths import DATA_DIR

SCRIPT_PATH = DATA_DIR / "chat_script.json"
MB = 2 ** 20


def load_script(path=None) -> tuple[str | None, list[str]]:
    raw = json.loads(Path(path or SCRIPT_PATH).read_text())
    return raw.get("system"), list(raw["turns"])


@dataclass
class Policy:
    """What the user switches: conversation strategy, KV cache layout, emptying the allocator cache per turn,
    and the allocator's expandable_segments (None = leave PYTORCH_CUDA_ALLOC_CONF alone)."""
    strategy: str = "session"
    preallocate: bool = True
    empty_cache: bool = False
    expandable_segments: bool | None = None
    max_len: int | None = None

    def label(self) -> str:
        on = {True: "on", False: "off"}
        s = f"{self.strategy}, kv {'prealloc' if self.preallocate else 'grown'}, empty_cache {on[self.empty_cache]}"
        return s if self.expandable_segments is None else s + f", expandable {on[self.expandable_segments]}"


def run_chat(ckpt, policy: Policy, turns: list[str], params, *, system=None, tracker=None,
             step_samples: bool = True, on_turn=None, **labels):
    """One scripted chat under `policy`, every turn tracked. on_turn(turn index) runs after each turn (the tests
    plant faults through it). Returns (per-turn rows, tracker)."""
    tracker = tracker or MemoryTracker(ckpt.model.device)
    device = ckpt.model.device
    start = len(tracker.rows)
    session = ChatSession(ckpt.model, ckpt.tokenizer, system=system, strategy=policy.strategy,
                          max_len=policy.max_len, preallocate=policy.preallocate)
    after = (lambda: empty_cache(device)) if policy.empty_cache else None
    rows = []
    for i, user in enumerate(turns):
        t0 = time.perf_counter()
        with tracker.labelled(strategy=policy.strategy, **labels):
            turn = tracker.track_send(session, user, params, turn=i, after_turn=after, step_samples=step_samples)
        latency = time.perf_counter() - t0
        if on_turn is not None:
            on_turn(i)
        gen = turn.generation
        rows.append({"strategy": policy.strategy, **labels, "turn": i, "prefill_tokens": turn.prefill_tokens,
                     "tokens_computed": tokens_computed(policy.strategy, turn.prefill_tokens, len(gen.prompt_ids),
                                                       len(gen.ids)),
                     "reused_tokens": turn.reused_tokens, "new_tokens": len(gen.ids),
                     "context_tokens": len(gen.prompt_ids) + len(gen.ids), "latency_s": latency,
                     "prefill_s": gen.prefill_s, "decode_tok_s": gen.decode_tok_s, "stop_reason": gen.stop_reason,
                     "kv_cache_bytes": session.cache.nbytes() if session.cache is not None else 0})
    _add_turn_peaks(rows, tracker, start)
    return rows, tracker


def tokens_computed(strategy: str, prefill_tokens: int, prompt_tokens: int, new_tokens: int) -> int:
    """Positions that went through the model in one turn: with a cache the prefill plus one per further token;
    replay recomputes the whole sequence for every token (prompt, prompt + 1, ...)."""
    if strategy == "replay":
        return sum(prompt_tokens + k for k in range(max(new_tokens, 1)))
    return prefill_tokens + max(new_tokens - 1, 0)


def _add_turn_peaks(rows, tracker, start):
    if len(tracker.rows) == start:
        return
    peaks = turn_peaks(tracker.frame().iloc[start:]).set_index("turn")
    for row in rows:
        p = peaks.loc[row["turn"]]
        cuda = not math.isnan(p["peak_cuda_allocated"])
        row["peak_bytes"] = p["peak_cuda_allocated"] if cuda else p["peak_rss"]
        row["peak_reserved_bytes"] = p["peak_cuda_reserved"]
        row["end_bytes"] = p["end_cuda_allocated"] if cuda else p["end_rss"]
        row["end_reserved_bytes"] = p["end_cuda_reserved"]
