"""How notebook 03 runs its models. The plan (qwenlab.memory.plan) is made before loading. The models then run in
phases, each capturing every prompt into host memory before it is freed:

    truth      transformers in float32 (skipped when the run is float32: the reference is then the truth)
    reference  transformers in the run dtype, plainly and teacher-forced from the truth
    qwenlab    qwenlab's model, plainly, teacher-forced from the truth, and with each planted bug

so no two models need the device at once (placement sequential or split). Under `resident`, qwenlab's model is
loaded first and stays (a quantized model must: its quantized reference is made from it). A model that does not fit
one device is split across the visible GPUs: qwenlab by layer ranges, transformers through accelerate.
A candidate dump (another runtime) replaces the qwenlab phase.
"""
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import pandas as pd
import torch

from qwenlab.activations import planted, planted_moe
from qwenlab.activations.capture import capture_qwenlab
from qwenlab.activations.forced_routing import capture_routing_forced, own_routing
from qwenlab.activations.diff import normalize_dtype
from qwenlab.activations.floors import EXACT_DTYPES, Gates
from qwenlab.activations.nvfp4_reference import reference_dir
from qwenlab.activations.reference import capture_reference, load_reference
from qwenlab.checks.layer_diffs import (
    Captures,
    PromptDiff,
    check_compared,
    encode_prompt,
    forcing,
    prompt_diff,
    prompt_label,
    read_candidate,
)
from qwenlab.errors import QwenlabError
from qwenlab.memory.device import empty_cache, settle
from qwenlab.memory.plan import Plan, plan
from qwenlab.model.config import read_config, read_generation_config
from qwenlab.model.dtypes import dtype_name
from qwenlab.model.loader import load, resolve_device, resolve_dtype
from qwenlab.model.spec import LoadSpec
from qwenlab.model.tiny import resolve_model_dir
from qwenlab.model.tokenizer import Tokenizer
from qwenlab.quant.configs import read_quant_config


@dataclass
class LayerDiffRun:
    plan: Plan
    diffs: list[PromptDiff]
    dtype: str
    candidate_meta: dict = field(default_factory=dict)
    localised: pd.DataFrame | None = None  # the planted bugs: expected vs found
    planted_results: dict = field(default_factory=dict)  # bug name -> DiffResult
    tokenizer: object = None
    seconds: dict = field(default_factory=dict)
    forced_routing: list = field(default_factory=list)  # per prompt: {layer: {token: experts}} forced (MoE)


def plan_for(spec: LoadSpec, prompts, placement: str = "auto") -> Plan:
    """The plan for capturing `prompts` with every model (the longest prompt sizes the KV cache and workspace)."""
    if spec.quant and placement not in ("auto", "resident"):
        raise QwenlabError(f"placement {placement!r} with quant {spec.quant!r}: only resident runs take a quantized "
                           "model")
    model_dir = resolve_model_dir(spec.model)
    cfg = read_config(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir, generation_config=read_generation_config(model_dir))
    longest = max(len(encode_prompt(tokenizer, p)) for p in prompts)
    dev = resolve_device(spec.device)
    name = dtype_name(resolve_dtype(spec.dtype, dev, cfg))
    result = plan(cfg, name, longest, str(dev), placement="resident" if spec.quant else placement,
                  quant=spec.quant.split("-")[0] if spec.quant else None)
    if spec.device_map and result.placement != "sequential":
        result.notes.append(f"qwenlab's layers as given: device_map {spec.device_map}")
    return result


def free(device):
    """Before the next model loads: the last one's memory collected and handed back to the driver."""
    settle(device)
    empty_cache(device)


class Phases:
    """Loads each model as the plan says and times the phases."""

    def __init__(self, spec: LoadSpec, the_plan: Plan):
        self.spec, self.plan, self.seconds = spec, the_plan, {}
        self.device = resolve_device(spec.device)

    @contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 3)

    def reference(self, folder, dtype: torch.dtype):
        split = self.plan.placement == "split"
        if split:
            return load_reference(folder, dtype, self.device, device_map="auto",
                                  max_memory=self.plan.reference_max_memory)
        return load_reference(folder, dtype, self.device)

    def qwenlab(self):
        layers = self.spec.device_map or (self.plan.layer_devices or None)
        return load(self.spec.with_(device_map=layers))

    def free(self):
        free(self.device)


def run_layer_diffs(spec: LoadSpec, prompts, the_plan: Plan, gates: Gates, *, candidate: str = "",
                    allow_missing: bool = False, attention: str | None = None, overrides: dict | None = None,
                    quant_reference: str = "quantized", unquantized_model: str = "",
                    plant_bugs: bool = True) -> LayerDiffRun:
    """Captures and diffs `prompts` (or the candidate dump) under the plan."""
    model_dir = resolve_model_dir(spec.model)
    cfg = read_config(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir, generation_config=read_generation_config(model_dir))
    phases = Phases(spec, the_plan)
    cand_dump = read_candidate(candidate) if candidate else None
    if cand_dump is not None:
        cases = [(f"candidate: {candidate.rsplit('/', 1)[-1]}", list(cand_dump.prompt_ids))]
        declared = normalize_dtype(cand_dump.metadata.get("dtype") or "") or "float32"
        torch_dtype = getattr(torch, declared)
    else:
        cases = [(prompt_label(p), encode_prompt(tokenizer, p)) for p in prompts]
        torch_dtype = resolve_dtype(spec.dtype, phases.device, cfg)
    quantized = spec.quant in ("nvfp4", "nvfp4-w4a4") or (spec.quant is None and read_quant_config(model_dir))
    if quantized and quant_reference == "quantized" and torch_dtype in (torch.float32, torch.float64):
        # transformers dequantizes NVFP4 weights through bfloat16, so its float32 run still has bf16 weights: the
        # comparison runs the quantized reference in bfloat16 and measures its floors against its float32 run
        torch_dtype = torch.bfloat16
        the_plan.notes.append("a float32 NVFP4 run is compared in bfloat16: the quantized reference dequantizes its "
                              "weights through bfloat16, and its floors are measured against its float32 run")
    dtype = dtype_name(torch_dtype)
    exact = dtype in EXACT_DTYPES

    ckpt = None
    if the_plan.placement == "resident" and cand_dump is None or quantized:
        with phases.timed("qwenlab load"):
            ckpt = phases.qwenlab()
    source = reference_dir(ckpt, quant_reference, unquantized_model or None) if ckpt is not None else \
        nullcontext(model_dir)
    truths, refs, ref_forced = [None] * len(cases), [], [None] * len(cases)
    with source as folder:
        if not exact and the_plan.truth:
            with phases.timed("truth (reference, float32)"):
                truth_model = phases.reference(folder, torch.float32)
                truths = [capture_reference(truth_model, ids) for _, ids in cases]
                del truth_model
                phases.free()
        with phases.timed(f"reference ({dtype})"):
            ref_model = phases.reference(folder, torch_dtype)
            refs = [capture_reference(ref_model, ids) for _, ids in cases]
            if not exact and the_plan.truth:
                ref_forced = [capture_reference(ref_model, ids, inputs=t) for (_, ids), t in zip(cases, truths)]
            del ref_model
            phases.free()

    localised, planted_results = None, {}
    if cand_dump is not None:
        cands, cand_forced, owns, meta = [cand_dump.tensors], [None], [None], cand_dump.metadata
    else:
        meta = {}
        with phases.timed("qwenlab"):
            ckpt = ckpt or phases.qwenlab()
            model = ckpt.model
            cands = [capture_qwenlab(model, ids, attention=attention) for _, ids in cases]
            margin = gates.routing_margin.get(dtype, 0.0)
            forced_pairs = [capture_routing_forced(model, ids, cand, ref, margin, attention)
                            for (_, ids), cand, ref in zip(cases, cands, refs)]
            owns = [own_routing(c) if f else None for c, (_, f) in zip(cands, forced_pairs)]
            cands, forced = [c for c, _ in forced_pairs], [f for _, f in forced_pairs]
            cand_forced = [capture_qwenlab(model, ids, attention=attention,
                                           replace=forcing(t if t is not None else r))
                           for (_, ids), t, r in zip(cases, truths, refs)]
            bug_captures = {}
            if plant_bugs:
                bugs = planted.standard_bugs(model) + planted_moe.moe_bugs(model)
                bug_captures = {bug.name: bug.capture(model, cases[0][1], attention) for bug in bugs}
    if ckpt is not None:
        del ckpt
        phases.free()

    diffs = []
    for (label, ids), cand, ref, truth, cf, rf, own in zip(cases, cands, refs, truths, cand_forced, ref_forced,
                                                           owns):
        captures = Captures(label, ids, cand, ref, truth, cf, rf, meta, own)
        diffs.append(prompt_diff(captures, dtype, gates, overrides, allow_missing))
    if cand_dump is not None:
        check_compared(diffs[0].result, candidate, cand_dump)
    if cand_dump is None and plant_bugs:
        floors = {row["name"]: row["floor"] for row in diffs[0].result.rows}
        localised, planted_results = planted.localise(bugs, refs[0], capture=lambda bug: bug_captures[bug.name],
                                                      floors=floors, dtype=dtype)
    return LayerDiffRun(the_plan, diffs, dtype, meta, localised, planted_results, tokenizer, phases.seconds,
                        forced if cand_dump is None else [])


def reset_peaks():
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        torch.cuda.reset_peak_memory_stats(i)


def device_peaks() -> dict[str, float]:
    """Peak allocated GiB on each visible GPU since reset_peaks() (empty on the CPU)."""
    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": torch.cuda.max_memory_allocated(i) / 2 ** 30 for i in range(torch.cuda.device_count())}


def placement_metrics(run: LayerDiffRun) -> dict:
    """What notebook 03 records of where it ran: the plan, per-device peak memory, seconds per phase, and (MoE) the
    (layer, token) places whose near-tie flips were forced to the reference's experts (forced_routing)."""
    forced = [{"prompt": d.label, "layer": layer, "token": token, "experts": experts}
              for d, per_prompt in zip(run.diffs, run.forced_routing)
              for layer, rows in sorted(per_prompt.items()) for token, experts in sorted(rows.items())]
    return {"placement": run.plan.to_json(), "device_peak_gib": device_peaks(), "placement_seconds": run.seconds,
            "forced_routing": forced}
