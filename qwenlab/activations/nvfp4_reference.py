"""The two references of an NVFP4 model (doc/nvfp4.md):

    quantized     transformers running the same NVFP4 numbers: a compressed-tensors checkpoint, decompressed at load
                  (through bfloat16, so the floors against it are bfloat16's). Answers "is my NVFP4 path right?".
                  A compressed-tensors checkpoint is used as it is; a ModelOpt one goes through compressed-tensors'
                  own converter first; a model quantized at load is exported (qwenlab.model.quantize.export). Both
                  into a temp folder, never into the model's folder, removed once transformers has loaded it.
                  Quantized MoE experts transformers cannot decompress (EXPERTS_GAP): the model's dequantized numbers
                  are written as a plain bf16 checkpoint instead (qwenlab.model.quantize.export_dequantized).
    unquantized   transformers on the bf16/fp32 checkpoint the quantized one came from. Answers "what does NVFP4
                  cost?"; for a checkpoint that is already NVFP4 it must be given (unquantized_model).
"""
from contextlib import contextmanager
from pathlib import Path

from qwenlab.activations.reference import load_reference
from qwenlab.atomic import scratch_dir
from qwenlab.errors import QwenlabError
from qwenlab.model.config import read_config
from qwenlab.model.quantize import export, export_dequantized
from qwenlab.quant.layouts import COMPRESSED_TENSORS, MODELOPT

REFERENCES = ("quantized", "unquantized")
# transformers (5.23) decompresses a compressed-tensors NVFP4 checkpoint's MoE experts (its fused 3-D experts are not
# nn.Linear) in CompressedTensorsDequantize with a stand-in module holding only weight_packed, weight_scale and
# weight_shape: the per-tensor global scale is never applied, every expert comes out 1 / scale too large.
EXPERTS_GAP = ("transformers decompresses NVFP4 MoE experts without their per-tensor global scale "
               "(integrations/compressed_tensors.py CompressedTensorsDequantize), so its quantized reference is "
               "transformers on qwenlab's dequantized numbers (a plain bf16 checkpoint), not its own reading of the "
               "NVFP4 tensors")


def quantized_reference_gap(ckpt) -> str | None:
    """Why transformers cannot read this model's NVFP4 numbers itself (quantized MoE experts), or None."""
    info = ckpt.model.quantization
    if info is not None and any(".mlp.experts." in name for name in info.quantized):
        return f"{ckpt.path}: {EXPERTS_GAP}"
    return None


def check_reference(reference: str):
    if reference not in REFERENCES:
        raise QwenlabError(f"--reference {reference!r}: choose one of {', '.join(REFERENCES)}")


def unquantized_dir(ckpt, unquantized_model=None) -> Path:
    """The bf16/fp32 checkpoint behind ckpt: the one given, or ckpt's own folder when it was quantized at load."""
    info = ckpt.model.quantization
    if unquantized_model:
        path = Path(unquantized_model)
        if read_config(path).config_hash() != ckpt.config.config_hash():
            raise QwenlabError(f"--unquantized-model {path}: its config.json describes another architecture than "
                               f"{ckpt.path} (config hash {read_config(path).config_hash()} != "
                               f"{ckpt.config.config_hash()})")
        return path
    if info is None or info.source != "checkpoint":
        return ckpt.path
    raise QwenlabError(f"{ckpt.path} is already NVFP4 ({info.layout}): the unquantized reference needs the bf16/fp32 "
                       "checkpoint it came from (--unquantized-model DIR / parameter unquantized_model)")


def convert_modelopt(src: Path, dst: Path, kept: list[str]):
    """compressed-tensors' ModelOpt -> compressed-tensors converter (its own code: an independent reading)."""
    try:
        from compressed_tensors.entrypoints.convert import ModelOptNvfp4Converter, convert_checkpoint
    except ImportError:
        raise QwenlabError(f"{src}: a ModelOpt checkpoint's quantized reference needs the compressed-tensors package "
                           "(pip install compressed-tensors)") from None
    convert_checkpoint(str(src), str(dst), ModelOptNvfp4Converter(ignore=list(kept), targets=["Linear"]),
                       max_workers=1, device="cpu")


@contextmanager
def quantized_checkpoint(ckpt):
    """Yields a compressed-tensors NVFP4 checkpoint folder holding ckpt's quantized numbers."""
    info = ckpt.model.quantization
    if info is None:
        raise QwenlabError(f"{ckpt.path}: the model is not quantized (load it with quant='nvfp4'), there is no "
                           "quantized reference")
    gap = quantized_reference_gap(ckpt)
    if info.source == "checkpoint" and info.layout == COMPRESSED_TENSORS and not gap:
        yield ckpt.path
        return
    with scratch_dir("nvfp4-reference") as tmp:
        folder = tmp / f"{ckpt.name}-compressed-tensors"
        if gap:
            folder = export_dequantized(ckpt, tmp / f"{ckpt.name}-dequantized")
        elif info.source == "checkpoint" and info.layout == MODELOPT:
            convert_modelopt(ckpt.path, folder, info.kept)
        else:
            export(ckpt, folder, COMPRESSED_TENSORS)
        yield folder


@contextmanager
def reference_dir(ckpt, reference: str = "quantized", unquantized_model=None):
    """The folder transformers loads as ckpt's reference: the checkpoint itself for an unquantized model, else the
    one `reference` names (a converted or exported NVFP4 folder lives only inside the block)."""
    check_reference(reference)
    if ckpt.model.quantization is None:
        yield ckpt.path
    elif reference == "unquantized":
        yield unquantized_dir(ckpt, unquantized_model)
    else:
        with quantized_checkpoint(ckpt) as folder:
            yield folder


def load_reference_for(ckpt, reference: str = "quantized", unquantized_model=None, dtype=None, device=None, **kw):
    """transformers' model for ckpt: the plain reference for an unquantized model, else the one `reference` names.
    dtype/device default to the model's; keyword arguments go to load_reference (device_map, max_memory)."""
    dtype, device = dtype or ckpt.model.dtype, device or ckpt.model.device
    with reference_dir(ckpt, reference, unquantized_model) as folder:
        return load_reference(folder, dtype, device, **kw)
