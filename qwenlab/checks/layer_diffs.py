"""Layer-by-layer activation diffs (notebook 03): qwenlab (or a candidate dump) vs the reference on a few prompts,
with floors measured from the reference's own precision noise (qwenlab.activations.floors), the isolated
(teacher-forced) error of every layer beside the accumulated one, merged into one table, the error over its
floor by layer, and the logits statistics against their measured limits."""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import pandas as pd

from qwenlab.activations.capture import capture_qwenlab
from qwenlab.activations.diff import DiffResult, diff_dumps, floor_for, normalize_dtype
from qwenlab.activations.dump import Dump, read_dump
from qwenlab.activations.forced_routing import capture_routing_forced, own_routing
from qwenlab.activations.floors import Gates, Noise, isolated_errors, logits_stats, measure  # noqa: F401
from qwenlab.activations.names import sort_forward, split_name
from qwenlab.activations.reference import capture_reference
from qwenlab.checks.nbutil import check_max, check_min
from qwenlab.errors import QwenlabError
from qwenlab.model.config import Qwen3Config, read_config
from qwenlab.model.dtypes import dtype_name
from qwenlab.model.tiny import resolve_model_dir

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
class Captures:
    """One prompt's captures: the candidate, the reference in the candidate's dtype, the float32 reference (the
    truth; None when the candidate is float32: the reference is then the truth) and the two teacher-forced runs
    (every layer fed the truth's input to it)."""
    label: str
    ids: list[int]
    cand: dict
    reference: dict
    truth: dict | None = None
    cand_isolated: dict | None = None
    ref_isolated: dict | None = None
    cand_meta: dict = field(default_factory=dict)
    cand_routing: dict | None = None  # a routing-forced candidate: its own router ids and logits (diff_dumps)


@dataclass
class PromptDiff:
    label: str
    ids: list[int]
    reference: dict
    result: DiffResult
    noise: Noise | None = None
    isolated: pd.DataFrame | None = None  # one row per tensor of the teacher-forced run


def prompt_diff(c: Captures, dtype: str, gates: Gates, overrides: dict | None = None,
                allow_missing: bool = False) -> PromptDiff:
    """The accumulated diff (candidate vs reference, floors from the reference's measured noise) and the isolated
    errors (teacher-forced candidate vs the truth, floors from the teacher-forced reference's noise)."""
    exact = dtype in ("float32", "float64")
    truth = c.reference if exact else c.truth
    noise = measure(c.reference, truth, dtype, c.ref_isolated)
    floors = gates.floors(noise, set(c.cand) | set(c.reference))
    floors = {name: floor_for(name, dtype, 0, overrides) if _overridden(name, overrides, dtype) else value
              for name, value in floors.items()}
    result = diff_dumps(Dump(c.cand, c.cand_meta), Dump(c.reference, {"prompt_ids": list(c.ids)}), dtype=dtype,
                        floors=floors, allow_missing=allow_missing, routing=c.cand_routing)
    isolated = None
    if c.cand_isolated is not None and truth is not None:
        errors = isolated_errors(c.cand_isolated, truth, gates.routing_margin.get(dtype, 0.0))
        limits = gates.isolated_floors(noise, errors)
        isolated = isolated_frame(errors, limits, noise)
    return PromptDiff(c.label, list(c.ids), c.reference, result, noise, isolated)


def _overridden(name: str, overrides: dict | None, dtype: str) -> bool:
    """A floor given in the thresholds (by name, glob or this dtype) replaces the measured one."""
    return bool(overrides) and any(key == name or normalize_dtype(key) == dtype or
                                   (normalize_dtype(key) is None and fnmatchcase(name, key)) for key in overrides)


def isolated_frame(errors: dict[str, float], floors: dict[str, float], noise: Noise) -> pd.DataFrame:
    rows = []
    for name in sort_forward(errors):
        layer, point = split_name(name)
        rows.append({"name": name, "layer": layer, "point": point, "rel_l2": errors[name],
                     "noise": noise.isolated.get(name, 0.0), "floor": floors[name],
                     "ratio": errors[name] / floors[name], "exceeds": not errors[name] <= floors[name]})
    frame = pd.DataFrame(rows, columns=["name", "layer", "point", "rel_l2", "noise", "floor", "ratio", "exceeds"])
    return frame.set_index("name")


def forcing(truth: dict) -> dict:
    """Replace hooks feeding every layer of qwenlab's model the truth's input to it (teacher forcing)."""
    def feed(x, name):
        return truth[name].to(x.device, x.dtype)[None]
    return {name: feed for name in truth if split_name(name)[1] == "input" and split_name(name)[0] is not None}


def capture_prompt(model, ref_model, truth_model, ids: list[int], label: str, attention=None,
                   replace: dict | None = None, routing_margin: float | None = None) -> Captures:
    """Every capture of one prompt with the models resident (notebook 06, tests). replace: patches applied to
    qwenlab's runs (e.g. a planted bug's hooks). routing_margin (a MoE model, no replace): the candidate is captured
    again with its near-tie expert flips forced to the reference's experts, as notebook 03 does
    (qwenlab.activations.forced_routing); its routing rows stay its own."""
    reference = capture_reference(ref_model, ids)
    truth = capture_reference(truth_model, ids) if truth_model is not None else None
    forced = truth if truth is not None else reference
    cand = own = capture_qwenlab(model, ids, attention=attention, replace=replace)
    flipped = None
    if routing_margin is not None and not replace:
        cand, flipped = capture_routing_forced(model, ids, own, reference, routing_margin, attention)
    return Captures(label, ids, cand, reference, truth,
                    capture_qwenlab(model, ids, attention=attention, replace=forcing(forced) | (replace or {})),
                    capture_reference(ref_model, ids, inputs=truth) if truth is not None else None,
                    cand_routing=own_routing(own) if flipped else None)


def diff_prompts(model, ref_model, tokenizer, prompts, gates: Gates, truth_model=None, attention: str | None = None,
                 overrides=None, dtype: str | None = None) -> list[PromptDiff]:
    """Captures and diffs each prompt with the models resident; dtype: the floors' (default the candidate's)."""
    dtype = dtype or dtype_name(model.dtype)
    margin = gates.routing_margin.get(dtype, 0.0)
    return [prompt_diff(capture_prompt(model, ref_model, truth_model, encode_prompt(tokenizer, prompt),
                                       prompt_label(prompt), attention, routing_margin=margin), dtype, gates,
                        overrides)
            for prompt in prompts]


def read_candidate(path) -> Dump:
    """A dump written elsewhere, checked: it must say which prompt it ran (prompt_ids)."""
    dump = read_dump(path)
    if not dump.prompt_ids:
        raise QwenlabError(f"{path}: the dump's metadata has no prompt_ids: nothing to run the reference on")
    return dump


def diff_candidate(path, ref_model, gates: Gates, truth_model=None, allow_missing: bool = False) -> PromptDiff:
    """A dump written elsewhere against the reference (in the dump's dtype: `ref_model`) on the dump's own
    prompt_ids, floors measured against `truth_model` (float32) unless the dump is float32."""
    dump = read_candidate(path)
    ids = list(dump.prompt_ids)
    dtype = normalize_dtype(dump.metadata.get("dtype") or "") or "float32"
    truth = capture_reference(truth_model, ids) if truth_model is not None else None
    captures = Captures(f"candidate: {Path(path).name}", ids, dump.tensors, capture_reference(ref_model, ids), truth,
                        cand_meta=dump.metadata)
    diff = prompt_diff(captures, dtype, gates, allow_missing=allow_missing)
    check_compared(diff.result, path, dump)
    return diff


def check_compared(result: DiffResult, path, dump: Dump):
    """A candidate without a single canonical name is an error (nothing would be checked), not a regression."""
    if result.verdict == "nothing_compared":
        hint = next(iter(result.coverage.suggestions.items()), None)
        raise QwenlabError(f"{path}: none of its {len(dump.tensors)} tensor names is a canonical name "
                           f"(doc/dump-format.md)" + (f"; e.g. {hint[0]} -> {hint[1]}" if hint else ""))


def missing_reason(diffs: list[PromptDiff]) -> str | None:
    """Why a diff with reference tensors missing from the candidate (undeclared, not allowed) does not pass."""
    missing = sort_forward({n for d in diffs if not d.result.coverage.complete for n in d.result.coverage.missing})
    if not missing:
        return None
    return (f"candidate lacks {len(missing)} reference tensors (first: {missing[0]}); list them in its not_produced "
            "metadata or pass -p allow_missing=true")


def checkpoint_config(spec) -> Qwen3Config:
    return read_config(resolve_model_dir(spec.model))


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
                     "isolated_first_divergence": first_isolated(d.isolated), "passed": d.result.passed})
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


def pool(metrics: list[dict]) -> dict:
    """KL / top-1 / delta-p statistics pooled over every position of several logits_metrics() results."""
    metrics = [m for m in metrics if m]
    positions = sum(m["positions"] for m in metrics)
    if not positions:
        return {}
    kl = pd.Series([k for m in metrics for k in m["kl_per_position"]])
    top1 = [t for m in metrics for t in m["top1_match_per_position"]]
    return {"positions": positions, "kl_mean": kl.mean(), "kl_max": kl.max(), "kl_p50": kl.quantile(0.5),
            "kl_p90": kl.quantile(0.9), "kl_p99": kl.quantile(0.99), "top1_agreement": sum(top1) / len(top1),
            "delta_p_mean": sum(m["delta_p_mean"] * m["positions"] for m in metrics) / positions,
            "delta_p_max": max(m["delta_p_max"] for m in metrics)}


def pooled_logits(diffs: list[PromptDiff]) -> dict:
    """The candidate's logits statistics pooled over every position of every prompt."""
    return pool([d.result.logits for d in diffs])


def pooled_noise(diffs: list[PromptDiff]) -> dict:
    """The reference's own logits noise (its dtype vs float32), pooled the same way."""
    return pool([d.noise.logits for d in diffs if d.noise is not None])


def logits_table(logits: dict, noise: dict, limits: dict) -> pd.DataFrame:
    """One row per gated statistic: the candidate's value, the reference's noise, the limit, within?"""
    cand, ref = logits_stats(logits) if logits else {}, logits_stats(noise) if noise else {}
    rows = [{"statistic": stat, "candidate": cand.get(stat, float("nan")), "reference_noise": ref.get(stat, 0.0),
             "limit": limit, "within": cand.get(stat, float("nan")) <= limit} for stat, limit in limits.items()]
    return pd.DataFrame(rows).set_index("statistic")


def isolated_table(diffs: list[PromptDiff]) -> pd.DataFrame | None:
    """One row per tensor of the teacher-forced runs: the prompt where it came closest to (or over) its floor."""
    frames = [d.isolated.reset_index().assign(prompt=d.label) for d in diffs if d.isolated is not None]
    if not frames:
        return None
    merged = pd.concat(frames, ignore_index=True).sort_values("ratio", ascending=False, kind="stable")
    merged = merged.drop_duplicates("name").set_index("name")
    merged = merged.loc[sort_forward(merged.index)]
    merged["layer"] = merged["layer"].astype("Int64")
    return merged


def ratio_by_layer(table: pd.DataFrame, isolated: pd.DataFrame | None) -> pd.DataFrame:
    """Per layer, the largest error over its floor among the layer's tensors: accumulated (the candidate's run as
    is) and isolated (teacher-forced). Below 1 everywhere: inside the precision budget."""
    layered = table[table["layer"].notna() & table["rel_l2"].notna()]
    out = pd.DataFrame({"accumulated": (layered["rel_l2"] / layered["floor"]).groupby(layered["layer"]).max()})
    if isolated is not None and not isolated.empty:
        out["isolated"] = isolated.groupby("layer")["ratio"].max()
    out.index = out.index.astype(int)
    return out.rename_axis("layer")


def first_isolated(isolated: pd.DataFrame | None) -> str | None:
    if isolated is None:
        return None
    bad = isolated[isolated["exceeds"]]
    return bad.index[0] if not bad.empty else None


def routing_flips(diffs: list[PromptDiff]) -> pd.DataFrame:
    """One row per token of a MoE layer whose chosen experts differ from the reference's (doc/moe.md): the two sets,
    the reference's margin at that choice, the limit precision explains, explained?"""
    rows = [{"prompt": d.label, "layer": split_name(name)[0], **flip}
            for d in diffs for name, routing in d.result.routing.items() for flip in routing["flips"]]
    columns = ["prompt", "layer", "token", "reference", "candidate", "margin", "cutoff_gap", "logit_error", "limit",
               "explained"]
    return pd.DataFrame(rows, columns=columns)


def routing_table(diffs: list[PromptDiff]) -> pd.DataFrame | None:
    """One row per MoE layer, pooled over the prompts: choices compared, agreement, tokens flipped, how many at a
    near-tie (explained by precision) and at a clear margin (a bug), the largest margin of a flip. None: no MoE."""
    layers: dict[int, dict] = {}
    for d in diffs:
        for name, routing in d.result.routing.items():
            row = layers.setdefault(split_name(name)[0], {"choices": 0, "agreeing": 0.0, "flips": 0, "near_tie": 0,
                                                           "clear_margin": 0, "max_flip_margin": float("nan")})
            choices = routing["tokens"] * routing["top_k"]
            row["choices"] += choices
            row["agreeing"] += routing["agreement"] * choices
            for flip in routing["flips"]:
                row["flips"] += 1
                row["near_tie" if flip["explained"] else "clear_margin"] += 1
                row["max_flip_margin"] = max(flip["margin"], row["max_flip_margin"]) \
                    if row["max_flip_margin"] == row["max_flip_margin"] else flip["margin"]
    if not layers:
        return None
    frame = pd.DataFrame.from_dict(layers, orient="index").rename_axis("layer").sort_index()
    frame.insert(1, "agreement", frame.pop("agreeing") / frame["choices"].clip(lower=1))
    return frame


def declared_absent(diffs: list[PromptDiff], name: str) -> bool:
    """The candidate said it does not produce `name` (its not_produced metadata), or allow_missing was given."""
    return any(name in d.result.coverage.not_produced or (name in d.result.coverage.missing and
                                                            d.result.coverage.allow_missing) for d in diffs)


def verdict(thresholds: dict, *, dtype: str, diffs: list[PromptDiff], summary: pd.DataFrame, table: pd.DataFrame,
            logits: dict, localised: pd.DataFrame, gates: Gates, isolated: pd.DataFrame | None = None,
            plant_bugs: bool = True, candidate: str = "", candidate_meta: dict | None = None,
            config_hash: str | None = None) -> tuple[dict, list[str]]:
    """Notebook 03's metrics and the reasons it regressed (an empty list passes). Every tensor is gated at its
    measured floor, the logits statistics at their measured limits, the isolated errors at theirs."""
    first = first_divergence(table)
    noise = pooled_noise(diffs)
    measured = all(d.noise is None or d.noise.measured for d in diffs)
    limits = gates.logits_limits(logits_stats(noise) if noise else {}, dtype, measured)
    metrics = {
        "candidate": candidate,
        "dtype": dtype,
        "floors": "float32 fallbacks" if dtype in ("float32", "float64") else
                  "measured (the reference in this dtype vs float32)" if measured else
                  "the dtype's defaults (no float32 reference could run)",
        "prompts": len(diffs),
        "prompt_tokens": [len(d.ids) for d in diffs],
        "compared_tensors": int(summary["compared"].sum()),
        "divergent_prompts": int((summary["verdict"] == "diverged").sum()),
        "first_divergence": first,
        "max_rel_l2": float(table["rel_l2"].max()),
        "max_ratio_to_floor": float((table["rel_l2"] / table["floor"]).max()),
        "closest_to_floor": closest_to_floor(table),
        "only_in_candidate": sorted({n for d in diffs for n in d.result.only_in_candidate}),
        "only_in_reference": sorted({n for d in diffs for n in d.result.only_in_reference}),
        "coverage": float(summary["coverage"].min()),
        "logits": logits,
        "logits_noise": noise,
        "logits_limits": limits,
        "per_prompt": summary.reset_index().to_dict(orient="records"),
        "planted": localised.to_dict(orient="index"),
        "planted_total": len(localised),
        "planted_localised": int(localised["localised"].sum()) if len(localised) else 0,
    }
    reasons: list[str] = []
    check_max(reasons, "prompts with a divergent tensor", metrics["divergent_prompts"],
              thresholds["max_divergent_prompts"])
    if first:
        rel, floor = table.loc[first, "rel_l2"], table.loc[first, "floor"]
        status, note = table.loc[first, "status"], table.loc[first, "note"]
        why = f"rel_l2 {rel:.3g}, {rel / floor:.3g}x its floor {floor:.3g}" if rel == rel else note or status
        reasons.append(f"first divergent tensor: {first} ({why})")
    if isolated is not None:
        bad = first_isolated(isolated)
        metrics |= {"isolated_first_divergence": bad, "isolated_max_ratio": float(isolated["ratio"].max()),
                    "isolated_worst": str(isolated["ratio"].idxmax())}
        if bad:
            reasons.append(f"isolated (teacher-forced) error over its floor: {bad} "
                           f"({isolated.loc[bad, 'ratio']:.1f}x)")
    if missing_reason(diffs):
        reasons.append(missing_reason(diffs))
    dumped_for = (candidate_meta or {}).get("config_hash")
    if candidate and dumped_for not in (None, config_hash):
        reasons.append(f"candidate was dumped for config {dumped_for}, not this checkpoint's {config_hash}")
    if logits:
        for stat, value in logits_stats(logits).items():
            check_max(reasons, f"logits {stat}", value, limits[stat])
    elif not declared_absent(diffs, "logits"):
        reasons.append("logits were not compared: the candidate has none (declare them in not_produced if it does "
                       "not produce them)")
    routing = routing_table(diffs)
    if routing is not None:
        metrics["routing"] = {"agreement_min": float(routing["agreement"].min()), "flips": int(routing["flips"].sum()),
                              "clear_margin_flips": int(routing["clear_margin"].sum()),
                              "layers": routing.reset_index().to_dict(orient="records")}
        check_max(reasons, "routing: tokens whose experts flipped at a clear margin",
                  metrics["routing"]["clear_margin_flips"], thresholds.get("routing", {}).get("max_clear_flips", 0))
    if plant_bugs:
        check_min(reasons, "planted bugs localised (fraction)",
                  metrics["planted_localised"] / max(metrics["planted_total"], 1),
                  thresholds["min_planted_localised_fraction"])
    return metrics, reasons
