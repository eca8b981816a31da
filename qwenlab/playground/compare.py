"""Playground: qwenlab vs the reference on the current prompt (greedy comparison, layer inspection, heatmap)."""
from __future__ import annotations

import html
from dataclasses import dataclass, field

import torch

from qwenlab.activations.capture import capture
from qwenlab.activations.diff import diff_dumps, logits_metrics, rel_l2_grid
from qwenlab.activations.dump import Dump
from qwenlab.activations.names import split_name
from qwenlab.activations.reference import reference_generate
from qwenlab.generation.decode import check_context, generate
from qwenlab.generation.sampling import SamplingParams
from qwenlab.playground.core import TOP_K, token_label


def top_tokens(logits: torch.Tensor, tokenizer, k: int = TOP_K) -> list[dict]:
    probs = torch.softmax(logits.double(), dim=-1)
    top = probs.topk(k)
    return [{"id": int(i), "token": token_label(tokenizer, int(i)), "p": float(p)}
            for i, p in zip(top.indices, top.values)]


@dataclass
class Comparison:
    """qwenlab greedy vs HF transformers greedy on one prompt; positions count generated tokens from 0."""
    prompt_ids: list[int]
    qwenlab_ids: list[int]
    reference_ids: list[int]
    first_disagreement: int | None = None
    kind: str = ""  # "token", "top1" or "token+top1" at the first disagreement
    logits: dict = field(default_factory=dict)
    qwenlab_top: list[dict] = field(default_factory=list)
    reference_top: list[dict] = field(default_factory=list)

    @property
    def agree(self) -> bool:
        return self.first_disagreement is None

    def summary(self) -> str:
        n = len(self.reference_ids)
        kl = self.logits.get("kl_max", float("nan"))
        if self.agree:
            return f"qwenlab and the reference agree on all {n} greedy tokens (top-1 everywhere, KL max {kl:.2e})"
        j = self.first_disagreement
        return (f"first disagreement at generated token {j} (sequence position {len(self.prompt_ids) + j}): "
                f"{self.kind}; KL max {kl:.2e}")

    def to_json(self) -> dict:
        logits = {k: v for k, v in self.logits.items() if not k.endswith("per_position")}
        return {"agree": self.agree, "first_disagreement": self.first_disagreement, "kind": self.kind,
                "prompt_ids": self.prompt_ids, "qwenlab_ids": self.qwenlab_ids, "reference_ids": self.reference_ids,
                "logits": logits, "qwenlab_top": self.qwenlab_top, "reference_top": self.reference_top,
                "summary": self.summary()}


@torch.inference_mode()
def compare_with_reference(model, hf_model, tokenizer, ids: list[int], max_new_tokens: int) -> Comparison:
    """Both sides greedy from `ids`; both also scored teacher-forced on the reference's tokens, so the first
    position where the tokens or the top-1 disagree comes with both distributions there."""
    check_context(model, len(ids))
    n = max(1, min(max_new_tokens, model.config.max_position_embeddings - len(ids)))
    stop = tuple(tokenizer.stop_ids)
    cand = generate(model, ids, SamplingParams(max_new_tokens=n), stop_ids=stop, mode="kv").ids
    ref = reference_generate(hf_model, ids, n, stop)
    seq = torch.tensor(list(ids) + ref[:-1])
    start = len(ids) - 1
    c = model(seq.to(model.device))[0, start:].float().cpu()
    r = hf_model(input_ids=seq[None].to(hf_model.device), use_cache=False).logits[0, start:].float().cpu()
    out = Comparison(list(ids), cand, ref, logits=logits_metrics(c, r))
    for j in range(max(len(cand), len(ref))):
        token = j >= len(cand) or j >= len(ref) or cand[j] != ref[j]
        top1 = j < len(ref) and int(c[j].argmax()) != int(r[j].argmax())
        if token or top1:
            out.first_disagreement, out.kind = j, "+".join(k for k, v in (("token", token), ("top1", top1)) if v)
            break
    at = out.first_disagreement if out.first_disagreement is not None else 0
    if at < len(ref):
        out.qwenlab_top, out.reference_top = top_tokens(c[at], tokenizer), top_tokens(r[at], tokenizer)
    return out


def comparison_html(comp: Comparison, tokenizer) -> str:
    color = "#070" if comp.agree else "#b00"
    parts = [f"<div style='color:{color};font-weight:bold'>{html.escape(comp.summary())}</div>"]
    for name, ids in (("qwenlab", comp.qwenlab_ids), ("reference", comp.reference_ids)):
        text = html.escape(tokenizer.decode(ids))
        parts.append(f"<div><b>{name}</b> ({len(ids)} tokens): <code style='white-space:pre-wrap'>{text}</code></div>")
    if comp.qwenlab_top:
        where = "at the first disagreement" if not comp.agree else "at the first generated token"
        rows = "".join(
            f"<tr><td>{i + 1}</td><td>{html.escape(a['token'])} ({a['id']})</td><td>{a['p']:.4f}</td>"
            f"<td>{html.escape(b['token'])} ({b['id']})</td><td>{b['p']:.4f}</td></tr>"
            for i, (a, b) in enumerate(zip(comp.qwenlab_top, comp.reference_top)))
        parts.append(f"<div>top-{len(comp.qwenlab_top)} distributions {where}:</div><table class='qwenlab-compare'>"
                     f"<tr><th>#</th><th>qwenlab</th><th>p</th><th>reference</th><th>p</th></tr>{rows}</table>")
    return "".join(parts)


def inspect_layers(ckpt, hf_model, ids: list[int]):
    """Captures both implementations on `ids` and diffs them (-> DiffResult, first divergence in forward order)."""
    check_context(ckpt.model, len(ids))
    cand, cand_meta = capture(ckpt, ids, "qwenlab")
    ref, ref_meta = capture(ckpt, ids, "reference", reference_model=hf_model)
    floors_dtype = "bfloat16" if ckpt.model.quantization else None  # NVFP4: doc/nvfp4.md
    return diff_dumps(Dump(cand, cand_meta), Dump(ref, ref_meta), dtype=floors_dtype,
                      num_layers=ckpt.config.num_hidden_layers)


def heatmap_figure(result):
    """log10 rel_l2 per layer x stage; the first divergent tensor boxed in red. A pyplot-free Figure."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    grid = rel_l2_grid(result)
    values = np.log10(np.clip(grid.to_numpy(dtype=float), 1e-12, None))
    fig = Figure(figsize=(7.5, 1.4 + 0.28 * len(grid)))
    ax = fig.subplots()
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=-12, vmax=0)
    ax.set_xticks(range(len(grid.columns)), list(grid.columns), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(grid.index)), [f"layer {i}" for i in grid.index], fontsize=7)
    first = result.first_divergence
    title = f"rel_l2 qwenlab vs reference ({result.dtype}); first divergence: {first or 'none'}"
    if first:
        layer, point = split_name(first)
        if layer is not None and point in grid.columns:
            x, y = list(grid.columns).index(point), list(grid.index).index(layer)
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax, label="log10 rel_l2")
    fig.tight_layout()
    return fig


def layer_summary_html(result) -> str:
    first = result.first_divergence_row
    logits = result.logits or {}
    if first is None:
        head = (f"<div style='color:#070;font-weight:bold'>no tensor over its {result.dtype} floor "
                f"({result.compared} compared)</div>")
    else:
        head = (f"<div style='color:#b00;font-weight:bold'>first divergent tensor: {html.escape(first['name'])} "
                f"(rel_l2 {first['rel_l2']:.3g} &gt; floor {first['floor']:.3g}, status {first['status']})</div>")
    tail = ""
    if logits:
        tail = (f"<div>logits: KL mean {logits['kl_mean']:.3g}, max {logits['kl_max']:.3g}, "
                f"top-1 agreement {logits['top1_agreement']:.3f}</div>")
    return head + tail
