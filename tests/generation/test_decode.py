"""Greedy decode against transformers' generate; kv vs replay; a persistent chat cache vs replaying the chat."""
import pytest
import torch

from qwenlab.activations.reference import reference_generate
from qwenlab.generation.chat import ChatSession
from qwenlab.generation.decode import generate
from qwenlab.generation.sampling import SamplingParams, filtered_probs

PROMPTS = ["Have you ever seen a UFO?", "Write a poem about the sea.", "你好, UFO?", "Tell me a joke"]
GREEDY32 = SamplingParams(max_new_tokens=32)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers_generate(tiny, tiny_ref, prompt):
    ids = tiny.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    ours = generate(tiny.model, ids, GREEDY32, tokenizer=tiny.tokenizer)
    theirs = reference_generate(tiny_ref, ids, 32, tiny.tokenizer.stop_ids)
    assert ours.ids == theirs
    assert ours.stop_reason == ("stop_token" if ours.ids[-1] in tiny.tokenizer.stop_ids else "max_new_tokens")


def test_at_least_one_prompt_decodes_the_full_32_steps(tiny):
    ids = tiny.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    out = generate(tiny.model, ids, GREEDY32, tokenizer=tiny.tokenizer)
    assert len(out.ids) == 32 and len(set(out.ids)) > 1


@pytest.mark.parametrize("prompt", PROMPTS)
def test_kv_and_replay_give_identical_tokens_and_step_logits(tiny, prompt):
    ids = tiny.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    kv = generate(tiny.model, ids, GREEDY32, tokenizer=tiny.tokenizer, mode="kv")
    replay = generate(tiny.model, ids, GREEDY32, tokenizer=tiny.tokenizer, mode="replay")
    assert kv.ids == replay.ids and kv.text == replay.text
    full = torch.tensor(ids + kv.ids)
    no_cache = tiny.model(full)[0, len(ids) - 1:-1]
    from qwenlab.generation.decode import new_cache
    cache = new_cache(tiny.model, len(full))
    step_logits = [tiny.model(full[: len(ids)], cache=cache)[0, -1]]
    step_logits += [tiny.model(full[i:i + 1], cache=cache)[0, -1] for i in range(len(ids), len(full) - 1)]
    cached = torch.stack(step_logits)
    assert ((cached - no_cache).norm() / no_cache.norm()).item() < 1e-5


def test_stop_token_ends_generation(tiny):
    ids = tiny.tokenizer.encode("Hello<|im_end|>")
    out = generate(tiny.model, ids, GREEDY32, tokenizer=tiny.tokenizer)
    assert out.ids == [151645] and out.stop_reason == "stop_token" and out.text == ""
    runs_on = generate(tiny.model, ids, GREEDY32, stop_ids=(-1,))
    assert runs_on.stop_reason == "max_new_tokens" and len(runs_on.ids) == 32


@pytest.mark.parametrize("strategy", ["rebuild", "replay"])
def test_chat_session_cache_matches_replaying_the_conversation(tiny, strategy):
    users = ["Have you ever seen a UFO?", "What colour was it?", "谢谢!"]
    params = SamplingParams(max_new_tokens=12)
    session = ChatSession(tiny.model, tiny.tokenizer, system="You are terse.")
    other = ChatSession(tiny.model, tiny.tokenizer, system="You are terse.", strategy=strategy)
    for user in users:
        a, b = session.send(user, params), other.send(user, params)
        assert a.generation.ids == b.generation.ids
    assert session.messages == other.messages
    assert session.turns[0].reused_tokens == 0
    assert all(t.reused_tokens > 0 for t in session.turns[1:]), "turns 2 and 3 must reuse the cache"
    assert all(t.prefill_tokens < len(t.generation.prompt_ids) / 2 for t in session.turns[1:])


def test_grown_cache_matches_preallocated(tiny):
    users = ["one", "two"]
    a = ChatSession(tiny.model, tiny.tokenizer, preallocate=True)
    b = ChatSession(tiny.model, tiny.tokenizer, preallocate=False)
    for u in users:
        assert a.send(u, SamplingParams(max_new_tokens=8)).generation.ids == \
            b.send(u, SamplingParams(max_new_tokens=8)).generation.ids


def test_sampling_is_seeded_and_respects_top_k_top_p(tiny):
    ids = tiny.tokenizer.encode("Once upon a time")
    p = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7, max_new_tokens=16)
    first = generate(tiny.model, ids, p, stop_ids=(-1,))
    assert first.ids == generate(tiny.model, ids, p, stop_ids=(-1,)).ids
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (probs[2:] == 0).all() and abs(probs.sum().item() - 1) < 1e-6
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert probs[0] == 1.0


def test_should_stop_stops_with_reason_stopped(tiny):
    ids = tiny.tokenizer.encode("Once upon a time")
    seen = []
    out = generate(tiny.model, ids, SamplingParams(max_new_tokens=100), stop_ids=(-1,),
                   on_token=seen.append, should_stop=lambda: len(seen) >= 5)
    assert out.stop_reason == "stopped" and len(out.ids) == 5


def test_rebuild_never_holds_two_caches(tiny, monkeypatch):
    import weakref

    from qwenlab.generation.engine import Engine

    alive = []
    original = Engine.new_cache

    def tracking_new_cache(*args, **kwargs):
        assert sum(ref() is not None for ref in alive) == 0, "the previous turn's cache is still referenced"
        cache = original(*args, **kwargs)
        alive.append(weakref.ref(cache))
        return cache

    monkeypatch.setattr(Engine, "new_cache", tracking_new_cache)
    session = ChatSession(tiny.model, tiny.tokenizer, strategy="rebuild")
    for user in ("one", "two", "three"):
        session.send(user, SamplingParams(max_new_tokens=4))
    assert len(alive) == 3
