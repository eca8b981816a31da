"""Next-token choice: greedy at temperature <= 0, else temperature / top-k / top-p with a seeded generator."""
from dataclasses import dataclass

import torch

from qwenlab.errors import QwenlabError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128

    def __post_init__(self):
        if self.top_k < 0:
            raise QwenlabError(f"top_k={self.top_k}: must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise QwenlabError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise QwenlabError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [V] (float32, on the logits' device) after temperature, top-k and top-p; zero outside the
    kept set."""
    logits = logits.float() / params.temperature
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
