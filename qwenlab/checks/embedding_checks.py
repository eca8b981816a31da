"""Embedding checks (notebook 02): the loaded embedding rows against the checkpoint file and the reference, the tied
head, statistics of the table, and what handcrafted embeddings look like in the same numbers."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from torch import nn

from qwenlab.activations.diff import tensor_metrics
from qwenlab.activations.reference import capture_reference
from qwenlab.checks.nbutil import check_max
from qwenlab.errors import QwenlabError
from qwenlab.model.dtypes import dtype_name
from qwenlab.model.loader import weight_files

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def read_file_tensor(checkpoint_dir, name: str) -> torch.Tensor:
    """One tensor straight from the checkpoint's safetensors file (its shard found through the index), as stored."""
    files = weight_files(Path(checkpoint_dir))
    if name not in files:
        raise QwenlabError(f"{checkpoint_dir}: tensor {name} is not in the checkpoint files")
    with safe_open(str(files[name]), framework="pt", device="cpu") as f:
        return f.get_tensor(name)


def file_has_tensor(checkpoint_dir, name: str) -> bool:
    return name in weight_files(Path(checkpoint_dir))


def rows_vs_file(loaded_rows: torch.Tensor, file_table: torch.Tensor, ids: list[int]) -> dict:
    """Prompt rows of the loaded model vs the file's rows cast to the loaded dtype: expected bitwise equal."""
    want = file_table[torch.tensor(ids)].to(loaded_rows.dtype)
    got = loaded_rows.detach().cpu()
    return {"file_dtype": dtype_name(file_table.dtype), "loaded_dtype": dtype_name(got.dtype),
            "bitwise_equal": bool(torch.equal(got, want)), **tensor_metrics(got, want)}


def loaded_rows(model, ids: list[int]) -> torch.Tensor:
    return model.model.embed_tokens.weight[torch.tensor(ids, device=model.device)].detach().cpu()


def reference_embed(ref_model, ids: list[int]) -> torch.Tensor:
    return capture_reference(ref_model, ids, include=["embed"])["embed"]


def tied_head_check(model, checkpoint_dir, ref_model=None) -> dict:
    """Tied: lm_head must BE the embedding (same storage). Untied: lm_head must equal the file's lm_head.weight."""
    tied = bool(model.config.tie_word_embeddings)
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    out = {"tie_word_embeddings": tied, "file_has_lm_head": file_has_tensor(checkpoint_dir, LM_HEAD),
           "same_storage": head.data_ptr() == embed.data_ptr(),
           "head_equals_embed": bool(head.shape == embed.shape and torch.equal(head, embed))}
    if out["file_has_lm_head"]:
        file_head = read_file_tensor(checkpoint_dir, LM_HEAD).to(head.dtype)
        out["head_vs_file_max_abs"] = float((head.detach().cpu() - file_head).abs().max())
    if ref_model is not None:
        ref_head, ref_embed = ref_model.get_output_embeddings().weight, ref_model.get_input_embeddings().weight
        out["reference_same_storage"] = ref_head.data_ptr() == ref_embed.data_ptr()
        out["head_vs_reference_max_abs"] = float((head.detach().cpu() - ref_head.detach().cpu()).abs().max())
    if tied:
        out["ok"] = out["same_storage"] and out["head_equals_embed"]
    else:
        out["ok"] = out.get("head_vs_file_max_abs") == 0.0 and not out["same_storage"]
    return out


def row_norms(table: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """L2 norm of every row in float32, chunked so a 4B-sized table does not need a float32 copy at once."""
    return torch.cat([table[i:i + chunk].float().norm(dim=-1).cpu() for i in range(0, table.shape[0], chunk)])


def table_stats(table: torch.Tensor, used_vocab: int, norms: torch.Tensor | None = None) -> dict:
    """Statistics of the whole table; rows >= used_vocab (the tokenizer's size) are never produced by it."""
    norms = row_norms(table) if norms is None else norms
    total, sq, finite = 0.0, 0.0, True
    for i in range(0, table.shape[0], 16384):
        part = table[i:i + 16384].double()
        total += part.sum().item()
        sq += part.pow(2).sum().item()
        finite = finite and bool(torch.isfinite(part).all())
    n = table.numel()
    mean = total / n
    used, unused = norms[:used_vocab], norms[used_vocab:]
    return {"rows": table.shape[0], "hidden": table.shape[1], "used_vocab": min(used_vocab, table.shape[0]),
            "unused_rows": max(table.shape[0] - used_vocab, 0), "mean": mean, "std": max(sq / n - mean ** 2, 0) ** 0.5,
            "all_finite": finite, "zero_rows": int((norms == 0).sum()),
            "norm_mean": norms.mean().item(), "norm_std": norms.std().item(),
            "norm_min": norms.min().item(), "norm_max": norms.max().item(),
            "norm_p01": norms.quantile(0.01).item(), "norm_p99": norms.quantile(0.99).item(),
            "used_norm_mean": used.mean().item() if len(used) else float("nan"),
            "unused_norm_mean": unused.mean().item() if len(unused) else float("nan")}


def prompt_rows_frame(tokenizer, ids: list[int], norms: torch.Tensor, used_vocab: int) -> pd.DataFrame:
    """Per prompt token: id, token, row norm and its percentile in the whole table."""
    sorted_norms = norms.sort().values
    rows = []
    for pos, i in enumerate(ids):
        rank = torch.searchsorted(sorted_norms, norms[i]).item()
        rows.append({"position": pos, "id": i, "token": tokenizer.id_to_token(i), "row_norm": norms[i].item(),
                     "norm_percentile": 100.0 * rank / len(norms), "tokenizer_can_produce": i < used_vocab})
    return pd.DataFrame(rows).set_index("position")


def handcrafted_table(kind: str, vocab: int, hidden: int, dtype=torch.float32, seed: int = 1234,
                      std: float = 0.02) -> torch.Tensor:
    """Stand-ins for the checkpoint's table, as a hand-written port might build them:
    'random' N(0, std) (an initializer's output), 'one_hot' row i = e_(i mod hidden), 'zeros'. The default seed is
    not 0 on purpose: the fixtures' own generators start from seed 0 and would reproduce their table up to scale."""
    if kind == "random":
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(vocab, hidden, generator=gen) * std).to(dtype)
    if kind == "one_hot":
        table = torch.zeros(vocab, hidden, dtype=dtype)
        table[torch.arange(vocab), torch.arange(vocab) % hidden] = 1
        return table
    if kind == "zeros":
        return torch.zeros(vocab, hidden, dtype=dtype)
    raise QwenlabError(f"handcrafted embedding kind {kind!r}: choose random, one_hot or zeros")


@contextmanager
def embeddings_replaced(model, table: torch.Tensor):
    """Runs the model with another input embedding table; lm_head (even when tied) keeps the checkpoint's."""
    original = model.model.embed_tokens
    model.model.embed_tokens = nn.Embedding.from_pretrained(table.to(model.device, model.dtype), freeze=True)
    try:
        yield model
    finally:
        model.model.embed_tokens = original


def _logprobs(model, ids):
    logits = model(torch.tensor(ids, device=model.device))
    return torch.log_softmax(logits[0].double().cpu(), -1)


def handcrafted_comparison(model, file_table: torch.Tensor, ids: list[int], used_vocab: int,
                           kinds=("random", "one_hot", "zeros"), seed: int = 1234) -> pd.DataFrame:
    """The checkpoint's table and each handcrafted one in the same metrics: prompt rows vs the file, table norms,
    and what the model then predicts on the prompt (KL to the checkpoint run, top-1 agreement)."""
    vocab, hidden = file_table.shape
    ref_lp = _logprobs(model, ids)
    ref_top = ref_lp.argmax(-1)
    tables = {"checkpoint": model.model.embed_tokens.weight.detach().cpu()}
    tables |= {kind: handcrafted_table(kind, vocab, hidden, model.dtype, seed) for kind in kinds}
    rows = []
    for name, table in tables.items():
        want = file_table[torch.tensor(ids)].to(table.dtype)
        metrics = tensor_metrics(table[torch.tensor(ids)], want)
        norms = row_norms(table)
        if name == "checkpoint":
            lp = ref_lp
        else:
            with embeddings_replaced(model, table):
                lp = _logprobs(model, ids)
        kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0)
        rows.append({"table": name, "prompt_rows_max_abs": metrics["max_abs"], "prompt_rows_rel_l2": metrics["rel_l2"],
                     "prompt_rows_cosine": metrics["cosine"], "norm_mean": norms[:used_vocab].mean().item(),
                     "norm_std": norms[:used_vocab].std().item(), "logits_kl_mean": kl.mean().item(),
                     "top1_agreement": (lp.argmax(-1) == ref_top).double().mean().item()})
    return pd.DataFrame(rows).set_index("table")


def verdict(thresholds: dict, *, ids: list[int], vs_file: dict, vs_reference: dict, reference_floor: float,
            head: dict, stats: dict, handcrafted: pd.DataFrame) -> tuple[dict, list[str]]:
    """Notebook 02's metrics and the thresholds they exceed (an empty list passes)."""
    metrics = {
        "prompt_tokens": len(ids),
        "max_abs_vs_file": vs_file["max_abs"],
        "bitwise_equal_file": vs_file["bitwise_equal"],
        "rel_l2_vs_reference": vs_reference["rel_l2"],
        "max_abs_vs_reference": vs_reference["max_abs"],
        "reference_floor": reference_floor,
        "tied": head["tie_word_embeddings"],
        "head_ok": head["ok"],
        "head": head,
        "table": stats,
        "handcrafted": handcrafted.to_dict(orient="index"),
    }
    reasons: list[str] = []
    check_max(reasons, "prompt rows max |loaded - file|", vs_file["max_abs"], thresholds["max_abs_vs_file"])
    check_max(reasons, "prompt rows rel_l2 vs reference embed", vs_reference["rel_l2"], reference_floor)
    if thresholds.get("require_tied_head_ok", True) and not head["ok"]:
        reasons.append(f"lm_head check failed ({'tied' if head['tie_word_embeddings'] else 'untied'}): {head}")
    if thresholds.get("require_finite_table", True) and not stats["all_finite"]:
        reasons.append("embedding table has non-finite values")
    return metrics, reasons
