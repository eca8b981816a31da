"""Do a checkpoint's logits look like a trained model's? Next-token entropy on held-out text and the top-2 logit
margins along a greedy continuation: random-weight checkpoints are nearly one-hot (no near-ties), trained ones
are spread (median entropy of a few nats) and often nearly tied between their two best tokens."""
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwenlab.model.kv_cache import KVCache


@dataclass(frozen=True)
class RealismBar:
    entropy_min: float = 1.0  # nats, median next-token entropy on held-out text
    entropy_max: float = 5.0
    margin: float = 0.5  # a greedy step is a near-tie when its top-2 logit margin is below this
    near_tie_fraction: float = 0.05  # at least this share of the greedy steps


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last dimension, computed in float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    """Best logit minus second-best over the last dimension (float32)."""
    top = logits.float().topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


@torch.inference_mode()
def heldout_stats(model, heldout: torch.Tensor, seq_len: int, max_windows: int) -> dict:
    """Per-position entropy and cross-entropy over the first `max_windows` windows of seq_len + 1 tokens."""
    n = min(max_windows, (len(heldout) - 1) // seq_len)
    if n < 1:
        raise ValueError(f"held-out text of {len(heldout)} tokens holds no window of {seq_len + 1}")
    entropies, nll = [], []
    for i in range(n):
        window = heldout[i * seq_len:(i + 1) * seq_len + 1].to(model.device)
        logits = model(window[None, :-1])[0]
        entropies.append(entropy(logits).cpu())
        nll.append(F.cross_entropy(logits.float(), window[1:], reduction="none").cpu())
    ent, nll = torch.cat(entropies), torch.cat(nll)
    return {"heldout_tokens_scored": len(ent), "heldout_loss": nll.mean().item(),
            "median_entropy": ent.median().item(), "mean_entropy": ent.mean().item()}


@torch.inference_mode()
def greedy_margins(model, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy continuation of `prompt` through a KV cache: the chosen ids and each step's top-2 logit margin."""
    cache = KVCache.for_config(model.config, max_len=len(prompt) + new_tokens, dtype=model.dtype,
                               device=model.device)
    logits = model(torch.tensor([prompt], device=model.device), cache=cache, last_only=True)[0, -1]
    ids, margins = [], []
    for _ in range(new_tokens):
        margins.append(top2_margin(logits).item())
        ids.append(int(logits.argmax()))
        if len(ids) < new_tokens:
            logits = model(torch.tensor([[ids[-1]]], device=model.device), cache=cache, last_only=True)[0, -1]
    return ids, margins


def judge(median_entropy: float, margins: list[float], bar: RealismBar = RealismBar()) -> dict:
    near = sum(m < bar.margin for m in margins)
    fraction = near / len(margins)
    reasons = []
    if not bar.entropy_min <= median_entropy <= bar.entropy_max:
        reasons.append(f"median entropy {median_entropy:.2f} nats outside [{bar.entropy_min}, {bar.entropy_max}]")
    if fraction < bar.near_tie_fraction:
        reasons.append(f"{fraction:.1%} of greedy steps with a top-2 margin < {bar.margin}, "
                       f"need {bar.near_tie_fraction:.0%}")
    return {"greedy_steps": len(margins), "near_tie_steps": near, "near_tie_fraction": fraction,
            "min_margin": min(margins), "median_margin": statistics.median(margins),
            "bar": {"entropy_nats": [bar.entropy_min, bar.entropy_max], "margin": bar.margin,
                    "near_tie_fraction": bar.near_tie_fraction},
            "realistic": not reasons, "reasons": reasons}


def measure(model, heldout: torch.Tensor, *, seq_len: int = 512, max_windows: int = 16, prompt_tokens: int = 64,
            new_tokens: int = 256, bar: RealismBar = RealismBar()) -> dict:
    """Realism of `model`'s logits: held-out entropy and loss, then `new_tokens` greedy steps from the first
    `prompt_tokens` held-out tokens; `realistic` is whether both meet `bar`."""
    stats = heldout_stats(model, heldout, seq_len, max_windows)
    prompt = heldout[:prompt_tokens].tolist()
    ids, margins = greedy_margins(model, prompt, new_tokens)
    return {**stats, **judge(stats["median_entropy"], margins, bar), "prompt_ids": prompt, "greedy_ids": ids,
            "margins": margins, "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device)}
