"""Layer-by-layer activation diffs (notebook 03): qwenlab (or a candidate dump) vs the reference on a few prompts,
merged into one table, a layer x point grid and the logits statistics."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from qwenlab.activations.capture import capture_qwenlab
from qwenlab.activations.diff import DiffResult, diff_dumps
from qwenlab.activations.dump import Dump, read_dump
from qwenlab.activations.names import sort_forward
from qwenlab.activations.reference import capture_reference
from qwenlab.checks.nbutil import check_max, check_min
from qwenlab.errors import QwenlabError
from qwenlab.model.probe import Probe

CHAT_PREFIX = "chat:"


def encode_prompt(tokenizer, prompt) -> list[int]:
    """A prompt is raw text, 'chat:<user text>' (one user turn, generation prompt on) or a list of chat messages."""
    if isinstance(prompt, list):
        return tokenizer.encode_chat(prompt, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise QwenlabError(f"prompt {prompt!r}: give a string, 'chat:<text>' or a list of messages")
    if prompt.startswith(CHAT_PREFIX):
        return tokenizer.encode_chat([{"role": "user", "content": prompt[len(CHAT_PREFIX):].strip()}])
    return tokenizer.encode(prompt)


def prompt_label(prompt, width: int = 40) -> str:
    text = prompt if isinstance(prompt, str) else f"chat({len(prompt)} messages): {prompt[-1].get('content', '')}"
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass
class PromptDiff:
    label: str
    ids: list[int]
    reference: dict
    result: DiffResult


def reference_tensors(ref_model, ids: list[int]) -> dict:
    return capture_reference(ref_model, ids, Probe(to_cpu=True))


def diff_prompts(model, ref_model, tokenizer, prompts, attention: str | None = None, floors=None,
                 dtype: str | None = None) -> list[PromptDiff]:
    """Captures qwenlab and the reference on each prompt and diffs them (reference tensors kept for reuse); dtype:
    whose floors (default the candidate's)."""
    out = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt)
        ref = reference_tensors(ref_model, ids)
        cand = capture_qwenlab(model, ids, attention=attention)
        out.append(PromptDiff(prompt_label(prompt), ids, ref, diff_dumps(cand, ref, dtype=dtype, floors=floors)))
    return out


def diff_candidate(path, ref_model, floors=None, allow_missing: bool = False) -> tuple[PromptDiff, dict]:
    """A dump written elsewhere vs a reference capture on the dump's own prompt_ids. -> (diff, candidate metadata).
    A candidate without a single canonical name is an error (nothing would be checked), not a regression."""
    dump = read_dump(path)
    ids = dump.prompt_ids
    if not ids:
        raise QwenlabError(f"{path}: the dump's metadata has no prompt_ids: nothing to run the reference on")
    ref = reference_tensors(ref_model, list(ids))
    result = diff_dumps(dump, Dump(ref, {"prompt_ids": list(ids)}), floors=floors, allow_missing=allow_missing)
    if result.verdict == "nothing_compared":
        hint = next(iter(result.coverage.suggestions.items()), None)
        raise QwenlabError(f"{path}: none of its {len(dump.tensors)} tensor names is a canonical name "
                           f"(doc/dump-format.md)" + (f"; e.g. {hint[0]} -> {hint[1]}" if hint else ""))
    return PromptDiff(f"candidate: {Path(path).name}", list(ids), ref, result), dump.metadata


def missing_reason(diffs: list[PromptDiff]) -> str | None:
    """Why a diff with reference tensors missing from the candidate (undeclared, not allowed) does not pass."""
    missing = sort_forward({n for d in diffs if not d.result.coverage.complete for n in d.result.coverage.missing})
    if not missing:
        return None
    return (f"candidate lacks {len(missing)} reference tensors (first: {missing[0]}); list them in its not_produced "
            "metadata or pass -p allow_missing=true")


def candidate_identity(metadata: dict, config) -> pd.Series:
    """Who wrote the dump and whether it was made for this checkpoint's config."""
    want = config.config_hash()
    got = metadata.get("config_hash")
    return pd.Series({"producer": metadata.get("producer", "?"), "model": metadata.get("model", "?"),
                      "dtype": metadata.get("dtype", "?"), "device": metadata.get("device", "?"),
                      "prompt tokens": len(metadata.get("prompt_ids") or []),
                      "config_hash": got or "(none)",
                      "same config as the reference": "unknown" if got is None else got == want})


def summary_frame(diffs: list[PromptDiff]) -> pd.DataFrame:
    rows = []
    for d in diffs:
        frame = d.result.to_frame()
        compared = frame[frame["rel_l2"].notna()]
        worst = (compared["rel_l2"] / compared["floor"]).idxmax() if not compared.empty else None
        logits = d.result.logits or {}
        rows.append({"prompt": d.label, "tokens": len(d.ids), "compared": d.result.compared,
                     "coverage": d.result.coverage.fraction, "verdict": d.result.verdict,
                     "first_divergence": d.result.first_divergence,
                     "max_rel_l2": compared["rel_l2"].max() if not compared.empty else float("nan"),
                     "closest_to_floor": worst, "kl_mean": logits.get("kl_mean"), "kl_max": logits.get("kl_max"),
                     "top1_agreement": logits.get("top1_agreement"), "delta_p_max": logits.get("delta_p_max"),
                     "passed": d.result.passed})
    return pd.DataFrame(rows).set_index("prompt")


def worst_frame(diffs: list[PromptDiff]) -> pd.DataFrame:
    """One row per tensor: the prompt where it came closest to (or furthest over) its floor. Forward order."""
    frames = []
    for d in diffs:
        frame = d.result.to_frame().reset_index()
        frame.insert(1, "prompt", d.label)
        frames.append(frame)
    merged = pd.concat(frames, ignore_index=True)
    merged["_score"] = (merged["rel_l2"] / merged["floor"]).fillna(-1.0)
    merged.loc[merged["exceeds"], "_score"] = float("inf")
    merged = merged.sort_values("_score", ascending=False, kind="stable").drop_duplicates("name")
    order = sort_forward(merged["name"])
    merged = merged.set_index("name").loc[order].drop(columns="_score")
    merged["layer"] = merged["layer"].astype("Int64")
    return merged


def exceeds_grid(frame: pd.DataFrame) -> pd.DataFrame:
    """Layer x point booleans: which cells of rel_l2_grid(frame) are over their floor."""
    layered = frame[frame["layer"].notna()]
    flags = layered.pivot_table(index="layer", columns="point", values="exceeds", aggfunc="any")
    flags.index = flags.index.astype(int)
    return flags.astype(bool)


def first_divergence(frame: pd.DataFrame) -> str | None:
    bad = frame[frame["exceeds"]]
    return bad.index[0] if not bad.empty else None


def closest_to_floor(frame: pd.DataFrame) -> str | None:
    """The tensor with the highest rel_l2 / floor: the first to go red if things get worse."""
    ratio = (frame["rel_l2"] / frame["floor"]).dropna()
    return ratio.idxmax() if not ratio.empty else None


def pooled_logits(diffs: list[PromptDiff]) -> dict:
    """KL / top-1 / delta-p statistics pooled over every position of every prompt."""
    kl, top1 = [], []
    delta_max, delta_sum, positions = 0.0, 0.0, 0
    for d in diffs:
        lg = d.result.logits
        if not lg:
            continue
        kl += lg["kl_per_position"]
        top1 += lg["top1_match_per_position"]
        delta_max = max(delta_max, lg["delta_p_max"])
        delta_sum += lg["delta_p_mean"] * lg["positions"]
        positions += lg["positions"]
    if not positions:
        return {}
    s = pd.Series(kl)
    return {"positions": positions, "kl_mean": s.mean(), "kl_max": s.max(), "kl_p50": s.quantile(0.5),
            "kl_p90": s.quantile(0.9), "kl_p99": s.quantile(0.99), "top1_agreement": sum(top1) / len(top1),
            "delta_p_mean": delta_sum / positions, "delta_p_max": delta_max}


def verdict(thresholds: dict, *, dtype: str, diffs: list[PromptDiff], summary: pd.DataFrame, table: pd.DataFrame,
            logits: dict, localised: pd.DataFrame, plant_bugs: bool = True, candidate: str = "",
            candidate_meta: dict | None = None, config_hash: str | None = None,
            limit_dtype: str | None = None) -> tuple[dict, list[str]]:
    """Notebook 03's metrics and the thresholds they exceed (an empty list passes). `candidate_meta` and
    `config_hash` (this checkpoint's) tell whether a candidate dump was made for another config."""
    first = first_divergence(table)
    metrics = {
        "candidate": candidate,
        "dtype": dtype,
        "prompts": len(diffs),
        "prompt_tokens": [len(d.ids) for d in diffs],
        "compared_tensors": int(summary["compared"].sum()),
        "divergent_prompts": int((summary["verdict"] == "diverged").sum()),
        "first_divergence": first,
        "max_rel_l2": float(table["rel_l2"].max()),
        "closest_to_floor": closest_to_floor(table),
        "only_in_candidate": sorted({n for d in diffs for n in d.result.only_in_candidate}),
        "only_in_reference": sorted({n for d in diffs for n in d.result.only_in_reference}),
        "coverage": float(summary["coverage"].min()),
        "logits": logits,
        "per_prompt": summary.reset_index().to_dict(orient="records"),
        "planted": localised.to_dict(orient="index"),
        "planted_total": len(localised),
        "planted_localised": int(localised["localised"].sum()),
    }
    reasons: list[str] = []
    check_max(reasons, "prompts with a divergent tensor", metrics["divergent_prompts"],
              thresholds["max_divergent_prompts"])
    if first:
        reasons.append(f"first divergent tensor: {first}")
    if missing_reason(diffs):
        reasons.append(missing_reason(diffs))
    dumped_for = (candidate_meta or {}).get("config_hash")
    if candidate and dumped_for not in (None, config_hash):
        reasons.append(f"candidate was dumped for config {dumped_for}, not this checkpoint's {config_hash}")
    kl_limit = thresholds["max_kl_mean"].get(limit_dtype or dtype, thresholds["max_kl_mean"]["float32"])
    check_max(reasons, "logits KL mean", logits.get("kl_mean", float("nan")), kl_limit)
    if plant_bugs:
        check_min(reasons, "planted bugs localised (fraction)",
                  metrics["planted_localised"] / max(metrics["planted_total"], 1),
                  thresholds["min_planted_localised_fraction"])
    return metrics, reasons
