"""Runs one implementation on one prompt and writes a canonical activation dump."""
from fnmatch import fnmatchcase

import torch
from torch.func import functional_call

from qwenlab import __version__
from qwenlab.activations.dump import write_dump
from qwenlab.activations.names import canonical_names
from qwenlab.activations.nvfp4_reference import load_reference_for
from qwenlab.activations.reference import capture_reference, reference_name
from qwenlab.errors import QwenlabError
from qwenlab.model.dtypes import dtype_name
from qwenlab.model.hooks import hooks
from qwenlab.model.loader import Checkpoint
from qwenlab.versions import package_versions

IMPLS = ("qwenlab", "reference")


@torch.inference_mode()
def capture_qwenlab(model, ids: list[int], include=None, attention: str | None = None, replace: dict | None = None,
                    overrides: dict | None = None) -> dict:
    """qwenlab's canonical activations on one prompt. include: names or globs (None: all); attention: sdpa or
    eager for this call only; replace: {name: fn(tensor, name) -> tensor} patches (qwenlab.model.hooks);
    overrides: {parameter or buffer name: tensor} used in place of the model's for this call (torch.func)."""
    tokens = torch.tensor(ids, device=model.device)
    with hooks(model, read=include or ["*"], replace=replace) as recorder:
        if overrides:
            functional_call(model, overrides, (tokens,), {"attention": attention}, strict=False)
        else:
            model(tokens, attention=attention)
    return recorder.tensors


def capture(ckpt: Checkpoint, ids: list[int], impl: str, *, include=None, attention: str | None = None,
            reference_model=None, reference: str = "quantized", unquantized_model=None) -> tuple[dict, dict]:
    """-> (tensors, metadata) for `impl` on the checkpoint's weights, in the loaded model's dtype and device.
    For a quantized model, `reference` picks transformers' side (qwenlab.activations.nvfp4_reference)."""
    if impl not in IMPLS:
        raise QwenlabError(f"--impl {impl!r}: choose one of {', '.join(IMPLS)}")
    model = ckpt.model
    if impl == "qwenlab":
        tensors = capture_qwenlab(model, ids, include, attention)
        producer = f"qwenlab {__version__} ({attention or model.attention} attention)"
    else:
        ref = reference_model or load_reference_for(ckpt, reference, unquantized_model)
        tensors = capture_reference(ref, ids, include)
        producer = reference_name(ckpt.config)
    meta = {"producer": producer, "impl": impl, "model": ckpt.name, "model_path": str(ckpt.path.resolve()),
            "config_hash": ckpt.config.config_hash(), "dtype": dtype_name(model.dtype),
            "device": str(model.device), "prompt_ids": list(ids), "versions": package_versions()}
    if include is not None:
        meta["not_produced"] = [name for name in canonical_names(ckpt.config)
                                if not any(fnmatchcase(name, pattern) for pattern in include)]
    if model.quantization is not None:
        meta["quantization"] = model.quantization.summary()
        meta["quantized"] = "nvfp4"
        if impl == "reference":
            meta["reference"] = reference
    return tensors, meta


def capture_to_file(ckpt: Checkpoint, ids: list[int], impl: str, out, **kwargs):
    tensors, meta = capture(ckpt, ids, impl, **kwargs)
    return write_dump(out, tensors, meta)
