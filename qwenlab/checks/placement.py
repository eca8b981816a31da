"""Where notebook 03 puts its two models: the plan (qwenlab.memory.plan) made before loading, then either both
resident (on one device, or each split across GPUs: qwenlab by layer ranges, the reference through accelerate),
or one at a time: qwenlab captures every prompt into dumps on disk and is freed, then the reference loads and
captures, and the diff reads the two sets of dumps."""
import gc
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qwenlab.activations.capture import capture_qwenlab
from qwenlab.activations.diff import diff_dumps
from qwenlab.activations.dump import read_dump, write_dump
from qwenlab.activations.reference import capture_reference, load_reference
from qwenlab.checks.layer_diffs import PromptDiff, encode_prompt, prompt_label
from qwenlab.memory.plan import Plan, plan
from qwenlab.model.config import read_config, read_generation_config
from qwenlab.model.loader import load, resolve_device, resolve_dtype
from qwenlab.model.probe import Probe
from qwenlab.model.tokenizer import Tokenizer


@dataclass
class Placed:
    plan: Plan
    ckpt: object = None  # qwenlab's Checkpoint, when resident
    reference: object = None  # the transformers model, when resident
    diffs: list | None = None  # the sequential path's result


def plan_for(model_dir, dtype: str, device: str, prompts, placement: str = "auto", device_map: str = "") -> Plan:
    """The plan for capturing `prompts` with both models (the longest prompt sizes the KV cache and workspace)."""
    cfg = read_config(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir, generation_config=read_generation_config(model_dir))
    longest = max(len(encode_prompt(tokenizer, p)) for p in prompts)
    dev = resolve_device(device)
    name = str(resolve_dtype(dtype, dev, cfg)).removeprefix("torch.")
    result = plan(cfg, name, longest, str(dev), placement="split" if device_map and placement == "auto" else placement)
    if device_map and result.placement == "split":
        result.notes.append(f"qwenlab layers as given: --device-map {device_map}")
    return result


def free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def load_resident(model_dir, dtype: str, device: str, the_plan: Plan, device_map: str = "") -> Placed:
    """Both models at once: on `device`, or split across GPUs as the plan (or an explicit device map) says."""
    split = the_plan.placement == "split"
    ckpt = load(model_dir, dtype, device, device_map=(device_map or the_plan.layer_devices) if split else None)
    model = ckpt.model
    if split:
        reference = load_reference(model_dir, model.dtype, model.device, device_map="auto",
                                   max_memory=the_plan.reference_max_memory)
    else:
        reference = load_reference(model_dir, model.dtype, model.device)
    return Placed(the_plan, ckpt, reference)


def diff_sequential(model_dir, dtype: str, device: str, prompts, dump_dir, *, attention: str | None = None,
                    floors=None) -> tuple[list[PromptDiff], dict]:
    """One model at a time through dumps on disk. -> (the diffs, seconds per phase)."""
    dump_dir = Path(dump_dir)
    dump_dir.mkdir(parents=True, exist_ok=True)
    seconds, t0 = {}, time.perf_counter()
    ckpt = load(model_dir, dtype, device)
    model, tokenizer, torch_dtype = ckpt.model, ckpt.tokenizer, ckpt.model.dtype
    meta = {"model": ckpt.name, "config_hash": ckpt.config.config_hash(), "dtype": str(torch_dtype)[6:]}
    cases = []
    for i, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, prompt)
        path = write_dump(dump_dir / f"qwenlab_{i}.safetensors", capture_qwenlab(model, ids, attention=attention),
                          {**meta, "impl": "qwenlab", "prompt_ids": ids})
        cases.append((prompt_label(prompt), ids, path))
    del ckpt, model
    free(device)
    seconds["qwenlab"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = load_reference(model_dir, torch_dtype, device, direct_to_device=True)
    ref_paths = []
    for i, (_, ids, _) in enumerate(cases):
        tensors = capture_reference(reference, ids, Probe(to_cpu=True))
        ref_paths.append(write_dump(dump_dir / f"reference_{i}.safetensors", tensors,
                                    {**meta, "impl": "reference", "prompt_ids": ids}))
    del reference
    free(device)
    seconds["reference"] = time.perf_counter() - t0
    diffs = []
    for (label, ids, cand), ref in zip(cases, ref_paths):
        ref_dump = read_dump(ref)
        diffs.append(PromptDiff(label, ids, ref_dump.tensors, diff_dumps(read_dump(cand), ref_dump, floors=floors)))
    return diffs, seconds


def device_peaks() -> dict[str, float]:
    """Peak allocated GiB on each visible GPU since the last reset (empty on the CPU)."""
    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": torch.cuda.max_memory_allocated(i) / 2 ** 30 for i in range(torch.cuda.device_count())}


def reset_peaks():
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        torch.cuda.reset_peak_memory_stats(i)

