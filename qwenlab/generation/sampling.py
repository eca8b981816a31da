"""Next-token choice: greedy at temperature 0, else temperature / top-k / top-p with a seeded generator.

Any positive finite temperature works, however small: the logits are shifted by their maximum and divided in float64,
so the top logit becomes 0 and the others a negative number or -inf, never inf - inf or 0 / 0 (at 1e-45 only exact
ties of the top logit keep any probability: greedy unless two logits are equal)."""
import math
from dataclasses import dataclass

import torch

from qwenlab.errors import QwenlabError

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise QwenlabError(f"temperature={t}: must be a finite number >= 0 (0 is greedy)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise QwenlabError(f"seed={self.seed}: must be an integer from 0 to 2**63-1")
        if self.top_k < 0:
            raise QwenlabError(f"top_k={self.top_k}: must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise QwenlabError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise QwenlabError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [V] (float64, on the logits' device) after temperature, top-k and top-p; zero outside the
    kept set."""
    logits = logits.double()
    logits = (logits - logits.max()) / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p
        sorted_p[before >= params.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        probs /= probs.sum()
    return probs


class Sampler:
    """Greedy: argmax where the logits are. Sampling: on the CPU with a CPU generator (on_device=False, the default:
    the same seed gives the same tokens on every device), or where the logits are with a generator of that device
    (on_device=True: only the chosen id crosses to the host; the graph engine's choice)."""

    def __init__(self, params: SamplingParams, device="cpu", on_device: bool = False):
        self.params = params
        self.device = torch.device(device) if on_device else torch.device("cpu")
        self.generator = torch.Generator(self.device).manual_seed(params.seed if params.seed is not None else 0)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.params.greedy:
            return int(logits.argmax())
        probs = filtered_probs(logits.to(self.device), self.params)
        return int(torch.multinomial(probs, 1, generator=self.generator))
