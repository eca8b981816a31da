"""Runs one implementation on one prompt and writes a canonical activation dump."""
from fnmatch import fnmatchcase

import torch

from qwenlab import __version__
from qwenlab.activations.dump import write_dump
from qwenlab.activations.names import canonical_names
from qwenlab.activations.nvfp4_reference import load_reference_for, quantization
from qwenlab.activations.reference import capture_reference, reference_name, versions
from qwenlab.errors import QwenlabError
from qwenlab.model.loader import Checkpoint
from qwenlab.model.probe import Probe

IMPLS = ("qwenlab", "reference")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def capture_qwenlab(model, ids: list[int], include=None, attention: str | None = None) -> dict:
    if attention:
        model.set_attention(attention)
    probe = Probe(include=include, to_cpu=True)
    model(torch.tensor(ids, device=model.device), probe=probe)
    return probe.tensors


def capture(ckpt: Checkpoint, ids: list[int], impl: str, *, include=None, attention: str | None = None,
            reference_model=None, reference: str = "quantized", unquantized_model=None) -> tuple[dict, dict]:
    """-> (tensors, metadata) for `impl` on the checkpoint's weights, in the loaded model's dtype and device.
    For a quantized model, `reference` picks transformers' side (qwenlab.activations.nvfp4_reference)."""
    if impl not in IMPLS:
        raise QwenlabError(f"--impl {impl!r}: choose one of {', '.join(IMPLS)}")
    model = ckpt.model
    if impl == "qwenlab":
        tensors = capture_qwenlab(model, ids, include, attention)
        producer = f"qwenlab {__version__} ({attention or model.model.layers[0].self_attn.impl} attention)"
    else:
        ref = reference_model or load_reference_for(ckpt, reference, unquantized_model)
        tensors = capture_reference(ref, ids, Probe(include=include, to_cpu=True))
        producer = reference_name()
    meta = {"producer": producer, "impl": impl, "model": ckpt.name, "model_path": str(ckpt.path),
            "config_hash": ckpt.config.config_hash(), "dtype": dtype_name(model.dtype),
            "device": str(model.device), "prompt_ids": list(ids), "versions": versions()}
    if include is not None:
        meta["not_produced"] = [name for name in canonical_names(ckpt.config.num_hidden_layers)
                                if not any(fnmatchcase(name, pattern) for pattern in include)]
    info = quantization(model)
    if info is not None:
        meta["quantization"] = info.summary()
        if impl == "reference":
            meta["reference"] = reference
    return tensors, meta


def capture_to_file(ckpt: Checkpoint, ids: list[int], impl: str, out, **kwargs):
    tensors, meta = capture(ckpt, ids, impl, **kwargs)
    return write_dump(out, tensors, meta)


