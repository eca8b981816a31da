"""The greedy loop that runs one step ahead of the host (decode.decode_ahead, used by the graph engine with
ChainedGreedy): driven here on the CPU by an eager stand-in for the chained graph, it must give exactly the tokens,
stop reasons and cache length of the step-by-step loop, and queue at most one step past the last token. The CUDA
tests in test_graph_engine.py run the real chained graph against the step-by-step one."""
import pytest
import torch

from qwenlab.generation.decode import Generation, decode_ahead, generate
from qwenlab.generation.sampling import SamplingParams
from qwenlab.model.kv_cache import KVCache


class EagerChain:
    """What ChainedGreedy does, eagerly: launch() feeds the last chosen token and chooses the next greedily."""

    def __init__(self, model, cache, prefill_logits):
        self.model, self.cache = model, cache
        self.tokens = [int(prefill_logits[0, -1].argmax())]
        self.launches = 0

    def launch(self):
        logits = self.model(torch.tensor([self.tokens[-1]]), cache=self.cache)
        self.tokens.append(int(logits[0, -1].argmax()))
        self.launches += 1

    def read(self, i):
        return self.tokens[i]


@torch.inference_mode()
def run_ahead(model, prompt, max_new, stop_ids=(), max_len=None, should_stop=None):
    max_len = max_len or len(prompt) + max_new
    cache = KVCache.for_config(model.config, max_len=max_len, dtype=model.dtype, device="cpu")
    logits = model(torch.tensor(prompt), cache=cache, last_only=True)
    pipe, out, seq, seen = EagerChain(model, cache, logits), Generation(list(prompt)), list(prompt), []
    decode_ahead(pipe, out, seq, cache, set(stop_ids), max_new, max_len, seen.append, should_stop)
    return out, cache, pipe, seen


def step_by_step(model, prompt, max_new, stop_ids=(), max_len=None, should_stop=None):
    max_len = max_len or len(prompt) + max_new
    cache = KVCache.for_config(model.config, max_len=max_len, dtype=model.dtype, device="cpu")
    gen = generate(model, prompt, SamplingParams(max_new_tokens=max_new), stop_ids=stop_ids or (-1,), cache=cache,
                   engine="eager", should_stop=should_stop)
    return gen, cache


def stopper_after(n):
    calls = []
    return lambda: calls.append(1) or len(calls) > n


@pytest.mark.parametrize("case", ["max_new_tokens", "stop_token_first", "stop_token_later", "context_full",
                                  "stopped", "one_token"])
def test_running_ahead_gives_the_step_by_step_tokens_and_cache(tiny, case):
    model = tiny.model
    prompt = tiny.tokenizer.encode("Have you ever seen a UFO?")
    greedy = step_by_step(model, prompt, 12)[0].ids
    kwargs = {"max_new_tokens": dict(max_new=12), "stop_token_first": dict(max_new=12, stop_ids=(greedy[0],)),
              "stop_token_later": dict(max_new=12, stop_ids=(greedy[5],)),
              "context_full": dict(max_new=12, max_len=len(prompt) + 4), "one_token": dict(max_new=1),
              "stopped": dict(max_new=12)}[case]
    if case == "stopped":
        ahead, cache, pipe, seen = run_ahead(model, prompt, should_stop=stopper_after(3), **kwargs)
        want, want_cache = step_by_step(model, prompt, should_stop=stopper_after(3), **kwargs)
    else:
        ahead, cache, pipe, seen = run_ahead(model, prompt, **kwargs)
        want, want_cache = step_by_step(model, prompt, **kwargs)
    assert ahead.ids == want.ids and seen == want.ids
    assert ahead.stop_reason == want.stop_reason
    assert cache.length == want_cache.length == len(prompt) + len(want.ids) - (want.stop_reason != "stopped"
                                                                             and want.stop_reason != "")
    for layer in range(model.config.num_hidden_layers):  # the K/V left in the cache are the step-by-step loop's
        assert torch.equal(cache.k[layer][:, :, :cache.length], want_cache.k[layer][:, :, :cache.length])
    # one step queued past the last token read only where the end was not known in advance (a stop token,
    # should_stop()); never past max_new_tokens or the cache's length (a static cache has no slot there)
    known_end = want.stop_reason in ("max_new_tokens", "context_full")
    assert pipe.launches == len(want.ids) - known_end
    assert len(ahead.step_s) == len(ahead.ids)
