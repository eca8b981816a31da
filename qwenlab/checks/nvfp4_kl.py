"""What NVFP4 costs, in the statistics of `llama-perplexity --kl-divergence`: over every position of a corpus, the KL
divergence from the unquantized model's next-token distribution to the quantized one's (mean, median, p99, max),
how often both pick the same top token, the RMS of delta-p (the change in the probability of the token that
actually comes next), and the perplexity ratio on a committed text (data/nvfp4_perplexity_text.txt)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import torch

from qwenlab.paths import DATA_DIR

PERPLEXITY_TEXT = DATA_DIR / "nvfp4_perplexity_text.txt"


@torch.inference_mode()
def qwenlab_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor(ids, device=model.device))[0].float().cpu()


@torch.inference_mode()
def reference_logits(hf_model, ids: list[int]) -> torch.Tensor:
    return hf_model(input_ids=torch.tensor([ids], device=hf_model.device), use_cache=False).logits[0].float().cpu()


@dataclass
class ReferenceSide:
    """What the statistics need of the reference on one sequence, computed once: next-token probabilities [T, V],
    sum p log p per position, top-1 and the log-probability of the actual next token."""
    probs: torch.Tensor
    neg_entropy: torch.Tensor
    top1: torch.Tensor
    next_logp: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor, ids: list[int]) -> "ReferenceSide":
        logp = torch.log_softmax(logits.float(), -1)
        probs = logp.exp()
        neg_entropy = (probs * logp).sum(-1, dtype=torch.float64)
        next_logp = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:], dtype=torch.long)].double()
        return cls(probs, neg_entropy, logits.argmax(-1), next_logp)


@dataclass
class PositionStats:
    """Per position, pooled over sequences: KL(reference || candidate), same top-1, delta-p and NLL of the next
    token (candidate and reference)."""
    kl: list[float] = field(default_factory=list)
    same_top1: list[bool] = field(default_factory=list)
    delta_p: list[float] = field(default_factory=list)
    nll_candidate: list[float] = field(default_factory=list)
    nll_reference: list[float] = field(default_factory=list)

    def add(self, cand_logits: torch.Tensor, ref: ReferenceSide, ids: list[int]):
        """KL = sum p_ref (log p_ref - log p_cand), summed in float64 over float32 terms (~1e-6 relative)."""
        logp = torch.log_softmax(cand_logits.float(), -1)
        cross = (ref.probs * logp).sum(-1, dtype=torch.float64)
        self.kl += (ref.neg_entropy - cross).clamp_min(0).tolist()
        self.same_top1 += (cand_logits.argmax(-1) == ref.top1).tolist()
        next_logp = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:], dtype=torch.long)].double()
        self.delta_p += (next_logp.exp() - ref.next_logp.exp()).tolist()
        self.nll_candidate += (-next_logp).tolist()
        self.nll_reference += (-ref.next_logp).tolist()

    def summary(self, last: int | None = None) -> dict:
        """Statistics over every position; the perplexities over the last `last` next-token positions only."""
        kl = pd.Series(self.kl, dtype=float)
        dp = pd.Series(self.delta_p, dtype=float)
        nll_c, nll_r = self.nll_candidate[-last:] if last else self.nll_candidate, \
            self.nll_reference[-last:] if last else self.nll_reference
        mean_c, mean_r = sum(nll_c) / max(len(nll_c), 1), sum(nll_r) / max(len(nll_r), 1)
        ppl_c, ppl_r = _exp(mean_c), _exp(mean_r)
        return {"positions": len(self.kl), "kl_mean": kl.mean(), "kl_median": kl.median(), "kl_p99": kl.quantile(0.99),
                "kl_max": kl.max(), "same_top1_pct": 100.0 * sum(self.same_top1) / max(len(self.same_top1), 1),
                "delta_p_rms": math.sqrt((dp ** 2).mean()) if len(dp) else float("nan"),
                "ppl_candidate": ppl_c, "ppl_reference": ppl_r, "ppl_ratio": _exp(mean_c - mean_r)}


def perplexity_ids(tokenizer, max_tokens: int, path=PERPLEXITY_TEXT) -> list[int]:
    return tokenizer.encode(path.read_text(encoding="utf-8"))[:max_tokens]


@dataclass
class Corpus:
    """Token sequences (the prompts, then the perplexity text, last) and the unquantized reference's side of them,
    computed once and reused for every variant."""
    sequences: list[list[int]]
    reference: list[ReferenceSide]

    @classmethod
    def build(cls, hf_model, prompt_ids: list[list[int]], text_ids: list[int]) -> "Corpus":
        sequences = [ids for ids in prompt_ids if len(ids) > 1] + [text_ids]
        return cls(sequences, [ReferenceSide.from_logits(reference_logits(hf_model, ids), ids) for ids in sequences])

    def stats(self, model) -> dict:
        """KL / top-1 / delta-p pooled over every sequence; perplexity on the text alone."""
        pooled = PositionStats()
        for ids, ref in zip(self.sequences, self.reference):
            pooled.add(qwenlab_logits(model, ids), ref, ids)
        text = len(self.sequences[-1])
        return pooled.summary(last=text - 1) | {"ppl_tokens": text, "kl_per_position": pooled.kl}


def _exp(x: float) -> float:
    """exp that saturates to inf: a random-weight model's perplexity overflows a float (the ratio, taken as the
    exp of the difference of mean NLLs, stays finite)."""
    return math.exp(x) if x < 709 else math.inf
