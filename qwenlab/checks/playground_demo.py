"""Playground in a report: the demo's verdict (notebook 07) and its per-token figure."""
from __future__ import annotations

import pandas as pd

from qwenlab.checks.nbutil import check_min
from qwenlab.model.dtypes import dtype_name


def token_prob_figure(frame: pd.DataFrame):
    """Per generated token: p of the chosen token and of the model's top-1 (a sampled token below top-1 is visible)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 2.2))
    ax = fig.subplots()
    if not frame.empty:
        steps = list(frame.index)
        ax.plot(steps, [p[0] for p in frame["top5_probs"]], color="#bbb", label="top-1 p", marker=".")
        ax.plot(steps, list(frame["p"]), color="#1f77b4", label="chosen token p", marker=".")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("generated token", fontsize=8)
    ax.set_ylabel("p (temperature 1)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _per_dtype(value, dtype: str):
    return value.get(dtype, False) if isinstance(value, dict) else bool(value)


def verdict(pg, thresholds: dict) -> tuple[dict, list[str]]:
    """Notebook 07's verdict: the demo generation streamed exactly what generate() returns for the same settings;
    in the dtypes the thresholds name, the reference comparison and the layer diff must agree too."""
    reasons: list[str] = []
    if pg.result is None:
        return {"demo_ran": False}, [f"demo generation failed: {pg.status}"]
    check = pg.check_against_generate()
    dtype = dtype_name(pg.ckpt.model.dtype)
    quantization = pg.ckpt.model.quantization
    metrics = {"demo_ran": True, "dtype": dtype, "device": str(pg.ckpt.model.device),
               "tokens": len(pg.result.ids), "stop_reason": pg.result.stop_reason,
               "text_equal": check["text_equal"], "ids_equal": check["ids_equal"],
               "decode_tok_s": pg.result.decode_tok_s, "prefill_s": pg.result.prefill_s,
               "elapsed_s": pg.readouts.get("elapsed_s"), "rss_bytes": pg.readouts.get("rss_bytes")}
    if quantization is not None:  # against the quantized reference (bfloat16 rounding): judged as bfloat16
        metrics["quantization"], dtype = quantization.summary(), "bfloat16"
    if thresholds.get("require_text_equal", True) and not (check["text_equal"] and check["ids_equal"]):
        reasons.append("streamed text/ids differ from generate() with the same settings")
    check_min(reasons, "tokens", metrics["tokens"], thresholds.get("min_tokens", 1))
    if metrics["stop_reason"] not in thresholds.get("allowed_stop_reasons", ["stop_token", "max_new_tokens"]):
        reasons.append(f"stop_reason = {metrics['stop_reason']!r} is not an allowed end of the demo")
    check_min(reasons, "decode tok/s", metrics["decode_tok_s"], thresholds.get("min_decode_tok_s", 0.0))
    if pg.comparison is not None:
        comp = pg.comparison
        metrics |= {"reference_agree": comp.agree, "reference_first_disagreement": comp.first_disagreement,
                    "reference_top1_agreement": comp.logits.get("top1_agreement"),
                    "reference_kl_max": comp.logits.get("kl_max")}
        if not comp.agree and _per_dtype(thresholds.get("require_reference_agreement", {}), dtype):
            reasons.append(f"reference comparison ({dtype}): {comp.summary()}")
    if pg.layer_diff is not None:
        metrics |= {"layer_first_divergence": pg.layer_diff.first_divergence, "layers_passed": pg.layer_diff.passed}
        if not pg.layer_diff.passed and _per_dtype(thresholds.get("require_layers_within_floor", {}), dtype):
            reasons.append(f"layer diff ({dtype}): first divergent tensor {pg.layer_diff.first_divergence}")
    return metrics, reasons
