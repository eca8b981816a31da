"""Where notebook 03 puts its two models. The plan (qwenlab.memory.plan) is made before loading; then either both
are resident (on one device, or each split across GPUs: qwenlab by layer ranges, the reference through
accelerate), or they run one at a time: qwenlab captures every prompt into dumps on disk and is freed, then the
reference loads and captures, and the diff reads the two sets of dumps. A candidate dump needs only the reference."""
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenlab.activations.capture import capture_qwenlab
from qwenlab.activations.diff import diff_dumps
from qwenlab.activations.dump import read_dump, write_dump
from qwenlab.activations.nvfp4_reference import load_reference_for
from qwenlab.activations.reference import capture_reference, load_reference
from qwenlab.checks.layer_diffs import PromptDiff, diff_candidate, diff_prompts, encode_prompt, prompt_label
from qwenlab.errors import QwenlabError
from qwenlab.memory.device import empty_cache, settle
from qwenlab.memory.plan import Plan, plan
from qwenlab.model.config import read_config, read_generation_config
from qwenlab.model.loader import load, resolve_device, resolve_dtype
from qwenlab.model.probe import Probe
from qwenlab.model.tokenizer import Tokenizer


@dataclass
class LayerDiffRun:
    plan: Plan
    diffs: list
    dtype: str
    candidate_meta: dict = field(default_factory=dict)
    ckpt: object = None  # qwenlab's Checkpoint while resident (the planted bugs need it), else None
    reference: object = None
    tokenizer: object = None
    seconds: dict = field(default_factory=dict)


def plan_for(model_dir, dtype: str, device: str, prompts, placement: str = "auto", device_map: str = "",
             quant: str = "") -> Plan:
    """The plan for capturing `prompts` with both models (the longest prompt sizes the KV cache and workspace)."""
    if quant and placement not in ("auto", "resident"):
        raise QwenlabError(f"placement {placement!r} with quant {quant!r}: only resident runs take a quantized model")
    cfg = read_config(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir, generation_config=read_generation_config(model_dir))
    longest = max(len(encode_prompt(tokenizer, p)) for p in prompts)
    dev = resolve_device(device)
    name = str(resolve_dtype(dtype, dev, cfg)).removeprefix("torch.")
    result = plan(cfg, name, longest, str(dev), placement="resident" if quant else placement,
                  quant=quant.split("-")[0] if quant else None)
    if device_map and result.placement != "sequential":
        result.notes.append(f"qwenlab's layers as given: device_map {device_map}")
    return result


def free(device):
    """Before the next model loads: the last one's memory collected and handed back to the driver."""
    settle(device)
    empty_cache(device)


def run_layer_diffs(model_dir, dtype: str, device: str, prompts, the_plan: Plan, dump_dir, *, candidate: str = "",
                    allow_missing: bool = False, attention: str | None = None, floors=None, quant: str = "",
                    quant_reference: str = "quantized", unquantized_model: str = "",
                    device_map: str = "") -> LayerDiffRun:
    """Captures and diffs `prompts` (or the candidate dump) under the plan."""
    if the_plan.placement == "sequential":
        return _sequential(model_dir, dtype, device, prompts, the_plan, dump_dir, candidate, allow_missing,
                           attention, floors)
    t0 = time.perf_counter()
    split = the_plan.placement == "split"
    ckpt = load(model_dir, dtype, device, quant or None, device_map=device_map or the_plan.layer_devices or None)
    model = ckpt.model
    if split:
        reference = load_reference(model_dir, model.dtype, model.device, device_map="auto",
                                   max_memory=the_plan.reference_max_memory)
    else:
        reference = load_reference_for(ckpt, quant_reference, unquantized_model or None)
    floors_dtype = "bfloat16" if getattr(model, "quantization", None) else None  # NVFP4: doc/nvfp4.md
    if candidate:
        diff, meta = diff_candidate(candidate, reference, floors=floors, allow_missing=allow_missing)
        diffs = [diff]
    else:
        meta = {}
        diffs = diff_prompts(model, reference, ckpt.tokenizer, prompts, attention=attention, floors=floors,
                             dtype=floors_dtype)
    return LayerDiffRun(the_plan, diffs, _dtype_name(model.dtype), meta, ckpt, reference, ckpt.tokenizer,
                        {"load_capture_diff": time.perf_counter() - t0})


def _sequential(model_dir, dtype, device, prompts, the_plan, dump_dir, candidate, allow_missing, attention,
                floors) -> LayerDiffRun:
    """One model at a time, through dumps on disk."""
    dump_dir = Path(dump_dir)
    dump_dir.mkdir(parents=True, exist_ok=True)
    seconds, cases, meta = {}, [], {}
    cfg = read_config(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir, generation_config=read_generation_config(model_dir))
    torch_dtype = resolve_dtype(dtype, resolve_device(device), cfg)
    t0 = time.perf_counter()
    if not candidate:
        ckpt = load(model_dir, dtype, device)
        for i, prompt in enumerate(prompts):
            ids = encode_prompt(tokenizer, prompt)
            tensors = capture_qwenlab(ckpt.model, ids, attention=attention)
            path = write_dump(dump_dir / f"qwenlab_{i}.safetensors", tensors,
                              {"impl": "qwenlab", "model": ckpt.name, "config_hash": cfg.config_hash(),
                               "dtype": _dtype_name(torch_dtype), "prompt_ids": ids})
            cases.append((prompt_label(prompt), ids, path))
        del ckpt
        free(device)
        seconds["qwenlab"] = time.perf_counter() - t0
        t0 = time.perf_counter()
    reference = load_reference(model_dir, torch_dtype, device, direct_to_device=True)
    if candidate:
        diff, meta = diff_candidate(candidate, reference, floors=floors, allow_missing=allow_missing)
        diffs = [diff]
    else:
        ref_paths = [write_dump(dump_dir / f"reference_{i}.safetensors",
                                capture_reference(reference, ids, Probe(to_cpu=True)),
                                {"impl": "reference", "dtype": _dtype_name(torch_dtype), "prompt_ids": ids})
                     for i, (_, ids, _) in enumerate(cases)]
        diffs = []
        for (label, ids, cand), ref in zip(cases, ref_paths):
            ref_dump = read_dump(ref)
            diffs.append(PromptDiff(label, ids, ref_dump.tensors, diff_dumps(read_dump(cand), ref_dump,
                                                                             floors=floors)))
    del reference
    free(device)
    seconds["reference"] = time.perf_counter() - t0
    for path in [c for _, _, c in cases] + (ref_paths if not candidate else []):
        Path(path).unlink(missing_ok=True)  # the diff holds what it needs; a 32B run's dumps are gigabytes
    return LayerDiffRun(the_plan, diffs, _dtype_name(torch_dtype), meta, None, None, tokenizer, seconds)


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def reset_peaks():
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        torch.cuda.reset_peak_memory_stats(i)


def device_peaks() -> dict[str, float]:
    """Peak allocated GiB on each visible GPU since reset_peaks() (empty on the CPU)."""
    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": torch.cuda.max_memory_allocated(i) / 2 ** 30 for i in range(torch.cuda.device_count())}


def placement_metrics(run: LayerDiffRun) -> dict:
    """What notebook 03 records of where it ran: the plan, per-device peak memory, seconds per phase."""
    return {"placement": run.plan.to_json(), "device_peak_gib": device_peaks(), "placement_seconds": run.seconds}
