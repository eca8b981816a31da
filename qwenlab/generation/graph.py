"""One decode step captured as a CUDA graph: the model's own forward for one token, with static shapes over a
StaticKVCache and the engine's kernels (its decoder layers compiled by torch.compile: fused elementwise kernels),
captured once per cache. A step is then one graph replay: no Python, no per-kernel launches. The engine owns every
CapturedStep.

The graph ends by writing its greedy choice (the argmax of its logits) into its own input token, so greedy decoding
can replay step after step without the host choosing or writing a token in between (replay_chained; the host reads
the tokens back one step behind, qwenlab.generation.decode). replay(token) overwrites that input first: sampling
and callers that read the logits are unaffected."""
import functools
import time

import torch

from qwenlab.model.kv_cache import StaticKVCache


@functools.cache
def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream every capture on `device` warms up and records on, for the life of the process. cuBLAS
    keeps a workspace (32 MiB on an H200) for each stream it ran on and never frees it: a new stream per capture
    grew CUDA memory by 32 MiB per chat session (notebook 05's stress on the Qwen3-4B shape)."""
    return torch.cuda.Stream(device)


def one_token(model, token: torch.Tensor, cache: StaticKVCache, kernels) -> torch.Tensor:
    return model(token, cache=cache, last_only=True, kernels=kernels)


class CapturedStep:
    """replay(token) runs the step on `token`; replay_chained() on the token the previous replay chose greedily (or
    that was written into `token`). Each replay writes K/V at cache.pos and moves it; `logits` holds its logits and
    `token` its greedy choice afterwards."""

    def __init__(self, model, cache: StaticKVCache, step, kernels):
        self.cache = cache
        with torch.inference_mode(False):  # an ordinary tensor, as the cache's (KVCache): one compile for both
            self.token = torch.zeros((1, 1), dtype=torch.long, device=model.device)
        t0 = time.perf_counter()
        length = cache.length
        cache.static_shapes = True
        try:
            with torch.inference_mode():
                side = self.stream = capture_stream(model.device)
                side.wait_stream(torch.cuda.current_stream(model.device))
                with torch.cuda.stream(side):
                    for i in range(3):  # the first call compiles; the next ones settle cuBLAS/Triton workspaces
                        step(model, self.token, cache, kernels)
                        if i == 0:
                            torch.cuda.synchronize(model.device)
                            self.first_call_s = time.perf_counter() - t0
                torch.cuda.current_stream(model.device).wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, stream=side):
                    self.logits = step(model, self.token, cache, kernels)
                    self.token.copy_(self.logits[:, -1].argmax(dim=-1, keepdim=True))
        finally:
            cache.static_shapes = False
            cache.crop(length)  # the warm-up steps wrote scratch slots past `length`; pos goes back too
        torch.cuda.synchronize(model.device)
        self.capture_s = time.perf_counter() - t0  # first_call_s (compiling, when the step is new) included

    def replay(self, token: int) -> torch.Tensor:
        self.token.fill_(token)
        return self.replay_chained()

    def replay_chained(self) -> torch.Tensor:
        self.graph.replay()
        self.cache.replayed(1)
        return self.logits
