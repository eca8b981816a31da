"""Notebook 06: is my NVFP4 path right (against transformers on the same NVFP4 numbers), and what does NVFP4 cost
(against the unquantized model)? Per-weight error, activation diffs against both references, KL statistics over a
corpus, high-precision variants, planted interop bugs, memory. doc/nvfp4.md."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open

from qwenlab.activations.diff import diff_dumps
from qwenlab.activations.floors import Gates, logits_stats
from qwenlab.activations.nvfp4_reference import reference_dir, unquantized_dir
from qwenlab.activations.planted_nvfp4 import first_quantized_point, nvfp4_bugs
from qwenlab.activations.reference import load_reference
from qwenlab.checks.fit import load_if_fits, out_of_memory, reference_fit, release, several_gpus
from qwenlab.checks.layer_diffs import (
    PromptDiff,
    diff_prompts,
    encode_prompt,
    first_divergence,
    first_isolated,
    isolated_table,
    pooled_logits,
    pooled_noise,
    worst_frame,
)
from qwenlab.checks.nbutil import check_max, check_min
from qwenlab.checks.nvfp4_kl import Corpus
from qwenlab.errors import QwenlabError
from qwenlab.memory.device import cuda_requested
from qwenlab.memory.plan import visible_devices
from qwenlab.memory.predict import compare, measured_weight_bytes, quantized_weight_bytes
from qwenlab.model.dtypes import dtype_name
from qwenlab.model.loader import load, load_model, weight_files
from qwenlab.model.nvfp4_load import DEFAULT_KEEP
from qwenlab.quant import codec
from qwenlab.quant.configs import read_quant_config
from qwenlab.quant.linear import nvfp4_modules

QUANTIZED_REFERENCE_DTYPE = "bfloat16"  # the reference dequantizes through bfloat16: its floors are bfloat16's


def compare_dtype(model) -> str:
    """The dtype the quantized comparison runs in: the model's, except that a float32 run is compared in bfloat16
    (transformers dequantizes the NVFP4 weights through bfloat16, so its float32 run still has bf16 weights)."""
    name = dtype_name(model.dtype)
    return QUANTIZED_REFERENCE_DTYPE if name in ("float32", "float64") else name


def load_quantized(model_path, dtype, device, quant: str = "", device_map: str = ""):
    """The model under test: an NVFP4 checkpoint as it is, any other quantized at load (quant, default nvfp4)."""
    if device_map:
        raise QwenlabError(f"device_map {device_map!r}: notebook 06 runs the NVFP4 model and its references on one "
                           "device")
    is_nvfp4 = read_quant_config(model_path) is not None
    return load(model_path, dtype, device, quant=quant or (None if is_nvfp4 else "nvfp4"))


def not_applicable(ckpt) -> str | None:
    """Why notebook 06 has nothing to check on this checkpoint (no linear can be NVFP4), or None."""
    if ckpt.model.quantization is not None:
        return None
    return (f"{ckpt.path}: no linear can be NVFP4 (every one is excluded or has an input dimension that is not a "
            "multiple of 16): nothing to quantize")


def workspace_overhead(device) -> float:
    """Bytes cuBLAS's workspace holds once a matmul has run (a fixed cost of the device, not of the weights), as
    requested from the CUDA allocator: measured before the model loads, so a memory gate can allow for it. NaN off
    CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    before = cuda_requested(device)
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(64, 64, device=device, dtype=dtype)
        (a @ a).sum().item()
        del a
    torch.cuda.synchronize(device)
    return float(cuda_requested(device) - before)


def requested_now(device) -> float:
    """cuda_requested on a CUDA device (what notebook 06 counts a load's bytes from), NaN elsewhere."""
    return float(cuda_requested(device)) if torch.device(device).type == "cuda" else float("nan")


def source_dir(ckpt, unquantized_model: str = "") -> Path | None:
    """The unquantized checkpoint behind the model, or None (an NVFP4 checkpoint with no unquantized_model)."""
    try:
        return unquantized_dir(ckpt, unquantized_model or None)
    except QwenlabError:
        return None


FLOORS_MEASURED = ("floors measured: the quantized reference in the comparison dtype against itself in float32 on "
                   "these prompts")


@dataclass
class References:
    """The transformers model(s) one section of notebook 06 holds, each loaded only when it fits beside what is
    already loaded (qwenlab.checks.fit; on several GPUs spread over them), and why one is missing. release() frees
    them before the next section loads its own: the quantized references (section 2) and the unquantized one
    (sections 3-4) are never resident together."""
    device: object
    reference: object = None
    truth: object = None  # the float32 quantized reference that measures section 2's floors
    error: str | None = None  # did not load for another reason (e.g. compressed-tensors missing): a verdict reason
    skipped: str | None = None  # did not fit, or ran out of memory: its sections are skipped, not gated
    floors: str | None = None  # section 2: measured, or why the fixed limits apply

    def release(self):
        self.reference = self.truth = None
        release(self.device)

    def lines(self, what: str) -> list[str]:
        """What the notebook prints about this reference: why it is missing, how the floors were set."""
        out = [f"{what} did not load: {self.error}"] if self.error else []
        out += [f"{what} skipped: {self.skipped}"] if self.skipped else []
        return out + ([self.floors] if self.floors else [])


def longest(tokenizer, prompts, extra: list[list[int]] = ()) -> int:
    """Tokens of the longest prompt (and extra token sequences): what sizes a reference's workspace."""
    return max([len(encode_prompt(tokenizer, p)) for p in prompts] + [len(ids) for ids in extra] + [1])


def quantized_references(ckpt, dtype: str, tokens: int) -> References:
    """Section 2's references: transformers on the same NVFP4 numbers in the comparison `dtype` and, when it fits
    beside that one too, in float32 (the truth the floors are measured against; else the fixed limits apply and
    `floors` says why). The quantized checkpoint is written (or converted) once for both."""
    model = ckpt.model
    device, spread, refs = model.device, several_gpus(model.device), References(model.device)
    fit = reference_fit("the quantized reference", model.config, dtype, tokens, visible_devices(str(device)), spread)
    if not fit.fits:  # before writing the quantized checkpoint
        refs.skipped = fit.why_not()
        return refs
    try:
        with reference_dir(ckpt, "quantized") as folder:
            refs.reference, refs.skipped = load_if_fits(fit, partial(load_reference, folder, getattr(torch, dtype),
                                                                     device), device)
            if refs.reference is None:
                return refs
            truth = reference_fit("the float32 quantized reference", model.config, "float32", tokens,
                                  visible_devices(str(device)), spread, "qwenlab's model and the quantized reference")
            refs.truth, why = load_if_fits(truth, partial(load_reference, folder, torch.float32, device), device)
    except QwenlabError as e:  # e.g. compressed-tensors not installed: the verdict says so, the rest still runs
        refs.release()
        refs.error = str(e)
        return refs
    refs.floors = FLOORS_MEASURED if refs.truth is not None else f"floors not measured: {why}; the fixed limits apply"
    return refs


def quantized_diffs(model, refs: References, tokenizer, prompts, gates: Gates, dtype: str) -> list[PromptDiff] | None:
    """Section 2's layer diffs against refs (None: no reference). When they run out of memory with the float32
    reference resident, it is dropped and they run again with the fixed limits; when they still do, the section is
    skipped (refs.skipped says why)."""
    while refs.reference is not None:
        try:
            return diff_prompts(model, refs.reference, tokenizer, prompts, gates, truth_model=refs.truth, dtype=dtype)
        except torch.OutOfMemoryError as e:
            why = out_of_memory(e)
        if refs.truth is None:
            refs.release()
            refs.skipped = f"the layer diff against the quantized reference ran out of memory ({why})"
            return None
        refs.truth = None
        release(refs.device)
        refs.floors = (f"floors not measured: the layer diff with the float32 quantized reference resident ran out "
                       f"of memory ({why}); the fixed limits apply")
    return None


def unquantized_reference(model, source: Path | None, tokens: int) -> References:
    """Sections 3-4's reference: transformers on the unquantized checkpoint in the model's dtype, when it fits."""
    device, refs = model.device, References(model.device)
    if source is None:
        return refs
    spread = several_gpus(device)
    fit = reference_fit("the unquantized reference", model.config, dtype_name(model.dtype), tokens,
                        visible_devices(str(device)), spread)
    try:
        refs.reference, refs.skipped = load_if_fits(fit, partial(load_reference, source, model.dtype, device), device)
    except QwenlabError as e:
        refs.error = str(e)
    return refs


def with_reference(refs: References, what: str, run):
    """run(refs.reference), or None when there is none or it runs out of memory (the reference is then released and
    refs.skipped says why: the later sections that need it are skipped too)."""
    if refs.reference is None:
        return None
    try:
        return run(refs.reference)
    except torch.OutOfMemoryError as e:
        why = f"{what} ran out of memory ({out_of_memory(e)})"
    refs.release()
    refs.skipped = why
    return None


def unquantized_diffs(model, refs: References, tokenizer, prompts, gates: Gates,
                      floor: float) -> list[PromptDiff] | None:
    """Section 3's layer diffs against the unquantized reference, one NVFP4 noise floor on every tensor."""
    return with_reference(refs, "the layer diff against the unquantized reference",
                          lambda ref: diff_prompts(model, ref, tokenizer, prompts, gates,
                                                   overrides=unquantized_floors(floor)))


def corpus_reference(refs: References, prompt_ids: list[list[int]], text_ids: list[int]) -> Corpus | None:
    """Section 4: the unquantized reference's side of the corpus (kept on the host, so the model can go)."""
    return with_reference(refs, "the corpus statistics of the unquantized reference",
                          lambda ref: Corpus.build(ref, prompt_ids, text_ids))


def reference_notes(quantized: References, unquantized: References) -> dict:
    """For the metrics: why a reference is missing and how section 2's floors were set (None where nothing to say)."""
    return {"quantized_reference_skipped": quantized.skipped, "quantized_floors": quantized.floors,
            "unquantized_reference_skipped": unquantized.skipped}


def read_source_tensor(name: str, files: dict, device) -> torch.Tensor:
    with safe_open(str(files[name]), framework="pt", device="cpu") as f:
        return f.get_tensor(name).to(device=device, dtype=torch.float32)


@torch.no_grad()
def weight_errors(model, folder: Path) -> pd.DataFrame:
    """Per quantized weight: its dequantized values against the unquantized checkpoint's (on the model's device,
    norms accumulated in float64)."""
    files, rows = weight_files(folder), []
    tied = model.config.tie_word_embeddings
    for name, module in nvfp4_modules(model).items():
        source = read_source_tensor("model.embed_tokens.weight" if name == "lm_head" and tied else f"{name}.weight",
                                    files, module.packed.device)
        delta = codec.dequantize(module.nvfp4()) - source
        rel_l2 = (torch.linalg.vector_norm(delta, dtype=torch.float64)
                  / torch.linalg.vector_norm(source, dtype=torch.float64)).item()
        rows.append({"module": name, "kind": name.rsplit(".", 1)[-1], "shape": list(source.shape), "rel_l2": rel_l2,
                     "nmse_db": 20 * math.log10(rel_l2) if rel_l2 > 0 else -math.inf,
                     "max_abs": delta.abs().max().item(), "amax": source.abs().max().item()})
    return pd.DataFrame(rows).set_index("module")


def unquantized_floors(floor: float) -> dict:
    return {"float32": floor, "bfloat16": floor, "float16": floor}


def variants(num_layers: int) -> dict:
    """name -> (quant, exclude): which linears stay in high precision."""
    last = num_layers - 1
    return {"all linears, lm_head kept": ("nvfp4", list(DEFAULT_KEEP)),
            "lm_head quantized too": ("nvfp4", []),
            "first and last layers kept": ("nvfp4", ["lm_head", "model.layers.0.*", f"model.layers.{last}.*"]),
            "W4A4 emulated (activations too)": ("nvfp4-w4a4", list(DEFAULT_KEEP))}


def variant_table(folder: Path, dtype, device, corpus, num_layers: int) -> pd.DataFrame:
    rows = []
    for name, (quant, exclude) in variants(num_layers).items():
        model = load_model(folder, dtype, device, quant=quant, exclude=exclude)
        stats = corpus.stats(model)
        quantized = model.quantization.quantized if model.quantization else []  # None: every linear was kept
        rows.append({"variant": name, "quantized_linears": len(quantized),
                     "weight_MiB": measured_weight_bytes(model) / 2**20,
                     **{k: stats[k] for k in ("kl_mean", "kl_p99", "same_top1_pct", "delta_p_rms", "ppl_ratio")}})
        del model
    return pd.DataFrame(rows).set_index("variant")


@dataclass
class PlantedResult:
    frame: pd.DataFrame
    results: dict = field(default_factory=dict)  # (bug, reference) -> DiffResult


def planted(model, ids: list[int], quantized_ref: dict | None, unquantized_ref: dict | None, floor: float,
            honest_unquantized=None) -> PlantedResult:
    """Each bug against the quantized reference (bf16 floors: where does it start?) and the unquantized one (how far
    above honest NVFP4 noise does it stand at the first quantized tensor?). Either reference may be missing;
    `found` / `localised` come from the quantized one when it ran, else from the unquantized one's noise floor."""
    rows, results = [], {}
    for bug in nvfp4_bugs(model):
        cand = bug.capture(model, ids)
        row = {"bug": bug.name, "description": bug.description, "expected": bug.expected}
        if unquantized_ref is not None:
            u = results[(bug.name, "unquantized")] = diff_dumps(cand, unquantized_ref, floors=unquantized_floors(floor))
            honest = _rel_l2(honest_unquantized, bug.expected)
            row |= {"found": u.first_divergence, "found_vs_unquantized": u.first_divergence,
                    "rel_l2_vs_unquantized": _rel_l2(u, bug.expected), "honest_rel_l2_vs_unquantized": honest,
                    "times_honest_noise": _rel_l2(u, bug.expected) / honest if honest else float("nan"),
                    "logits_kl_mean_vs_unquantized": (u.logits or {}).get("kl_mean")}
        if quantized_ref is not None:
            q = results[(bug.name, "quantized")] = diff_dumps(cand, quantized_ref, dtype=QUANTIZED_REFERENCE_DTYPE)
            row |= {"found": q.first_divergence, "rel_l2_vs_quantized": _rel_l2(q, bug.expected)}
        row["localised"] = bug.localised(row.get("found"))
        rows.append(row)
    return PlantedResult(pd.DataFrame(rows).set_index("bug"), results)


def _rel_l2(result, name: str) -> float:
    if result is None:
        return float("nan")
    row = next((r for r in result.rows if r["name"] == name), None)
    return float(row["rel_l2"]) if row else float("nan")


def memory_check(model, rel_threshold: float, cuda_requested: float = float("nan"),
                 overhead: float = float("nan")) -> pd.DataFrame:
    """The memory model's NVFP4 estimate against the parameter + buffer storage of the loaded model and, on CUDA,
    the bytes its load left requested from the allocator (cuda_requested, counted from before the workspace was made;
    the allocator's rounding is not the load's and is left out: qwenlab.memory.device.cuda_requested) against the
    estimate plus the workspace `overhead` measured on the same device before the load."""
    predicted = quantized_weight_bytes(model)
    rows = [compare("weights: parameter + buffer storage", measured_weight_bytes(model), predicted, rel_threshold)]
    if cuda_requested == cuda_requested:
        extra = overhead if overhead == overhead else 0.0
        rows.append(compare("weights + measured workspace: CUDA bytes requested after load", cuda_requested,
                            predicted + extra, rel_threshold) | {"workspace_bytes": extra})
    return pd.DataFrame(rows)


def expected_first(model) -> str | None:
    return first_quantized_point(model)


def diff_summary(diffs: list[PromptDiff] | None, gates: Gates | None = None) -> dict:
    """First divergence (forward order, worst over prompts), divergent prompts, largest rel_l2, pooled logits; with
    the isolated (teacher-forced) errors and the logits limits measured from the reference's noise when gated."""
    if not diffs:
        return {"ran": False}
    table = worst_frame(diffs)
    out = {"ran": True, "first_divergence": first_divergence(table),
           "divergent_prompts": sum(not d.result.passed for d in diffs), "max_rel_l2": float(table["rel_l2"].max()),
           "max_ratio_to_floor": float((table["rel_l2"] / table["floor"]).max()), "logits": pooled_logits(diffs)}
    isolated = isolated_table(diffs)
    if isolated is not None:
        out |= {"isolated_first_divergence": first_isolated(isolated),
                "isolated_max_ratio": float(isolated["ratio"].max())}
    if gates is not None:
        noise = pooled_noise(diffs)
        measured = all(d.noise is None or d.noise.measured for d in diffs)
        out["logits_limits"] = gates.logits_limits(logits_stats(noise) if noise else {}, diffs[0].noise.dtype
                                                   if diffs[0].noise else "float32", measured)
        out["logits_noise"] = noise
    return out


def verdict(thresholds: dict, *, info, weights: pd.DataFrame | None, quantized: list[PromptDiff] | None,
            unquantized: list[PromptDiff] | None, corpus_stats: dict | None, variant_frame: pd.DataFrame | None,
            planted_frame: pd.DataFrame | None, memory: pd.DataFrame,
            notes: dict | None = None) -> tuple[dict, list[str]]:
    """Notebook 06's metrics and the reasons it regressed (empty: pass). Sections that did not run (no
    unquantized checkpoint, a reference that did not fit, plant_bugs off) are recorded as such and not gated.
    notes: reference_notes(), kept in the metrics (`notes`, and beside each reference's summary)."""
    reasons: list[str] = []
    notes = {k: v for k, v in (notes or {}).items() if v}
    q, u = diff_summary(quantized, Gates.from_thresholds(thresholds["quantized_reference"])), \
        diff_summary(unquantized)
    for summary, key in ((q, "quantized_reference_skipped"), (u, "unquantized_reference_skipped")):
        if key in notes:
            summary["skipped"] = notes[key]
    if q["ran"] and "quantized_floors" in notes:
        q["floors"] = notes["quantized_floors"]
    metrics = {"quantization": info.to_json(), "summary": info.summary(), "quantized_reference": q,
               "unquantized_reference": u, "notes": notes}
    if weights is not None and not weights.empty:
        metrics["weights"] = {"tensors": len(weights), "max_rel_l2": float(weights["rel_l2"].max()),
                              "mean_nmse_db": float(weights["nmse_db"].mean()),
                              "worst": str(weights["rel_l2"].idxmax())}
        check_max(reasons, "per-weight rel_l2 (max)", metrics["weights"]["max_rel_l2"], thresholds["max_weight_rel_l2"])
    if q["ran"]:
        limits = thresholds["quantized_reference"]
        check_max(reasons, "prompts diverging from the quantized reference", q["divergent_prompts"],
                  limits["max_divergent_prompts"])
        if q["first_divergence"]:
            reasons.append(f"against the quantized reference, first divergent tensor: {q['first_divergence']}")
        if q.get("isolated_first_divergence"):
            reasons.append(f"against the quantized reference, isolated (teacher-forced) error over its floor: "
                           f"{q['isolated_first_divergence']}")
        for stat, value in (logits_stats(q["logits"]) if q["logits"] else {}).items():
            check_max(reasons, f"logits {stat} vs the quantized reference", value, q["logits_limits"][stat])
    if u["ran"]:
        check_max(reasons, "prompts over the NVFP4 noise floor vs the unquantized reference", u["divergent_prompts"],
                  thresholds["unquantized_reference"]["max_divergent_prompts"])
    if corpus_stats:
        limits = thresholds["unquantized_reference"]
        metrics["corpus"] = {k: v for k, v in corpus_stats.items() if k != "kl_per_position"}
        check_max(reasons, "corpus KL mean vs unquantized", corpus_stats["kl_mean"], limits["max_kl_mean"])
        check_min(reasons, "corpus same top-1 % vs unquantized", corpus_stats["same_top1_pct"],
                  limits["min_same_top1_pct"])
        check_max(reasons, "perplexity ratio NVFP4 / unquantized", corpus_stats["ppl_ratio"], limits["max_ppl_ratio"])
    if variant_frame is not None:
        metrics["variants"] = variant_frame.to_dict(orient="index")
    if planted_frame is not None and not planted_frame.empty:
        metrics["planted"] = planted_frame.to_dict(orient="index")
        metrics["planted_total"] = len(planted_frame)
        metrics["planted_localised"] = int(planted_frame["localised"].sum())
        check_min(reasons, "planted NVFP4 bugs localised (fraction)", metrics["planted_localised"] / len(planted_frame),
                  thresholds["min_planted_localised_fraction"])
        if "times_honest_noise" in planted_frame:
            metrics["planted_min_times_honest"] = float(planted_frame["times_honest_noise"].min())
            check_min(reasons, "planted bug / honest NVFP4 rel_l2 at the first quantized tensor (min)",
                      metrics["planted_min_times_honest"], thresholds["min_planted_times_honest"])
    metrics["memory"] = memory.to_dict(orient="records")
    for row in metrics["memory"]:
        check_max(reasons, f"{row['quantity']} rel error", row["rel_error"], thresholds["weights_rel_error_max"])
    return metrics, reasons
