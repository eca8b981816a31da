"""`qwenlab quantize SRC DST`: a complete NVFP4 checkpoint (ModelOpt or compressed-tensors layout) from a bf16/fp32
Qwen3 checkpoint, or the other layout of an NVFP4 one. The codes and scales are exactly what `load(SRC,
quant="nvfp4")` computes, so re-loading DST gives identical dequantized weights. Activation (input) scales are
calibrated on the quantized model over a few texts of data/tokenizer_corpus.jsonl: amax of each linear's input
/ (6 x 448). Tensors that are not quantized are copied from SRC as stored; tokenizer and generation files too."""
import json
import math
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from qwenlab import __version__
from qwenlab.errors import QwenlabError, standalone_main
from qwenlab.model.files import is_inside, refuse_inside, weight_files
from qwenlab.model.hf_names import hf_shapes
from qwenlab.model.loader import load
from qwenlab.model.nvfp4_load import DEFAULT_KEEP, ROUTERS
from qwenlab.paths import DATA_DIR
from qwenlab.quant.codec import tensor_scale_from_amax
from qwenlab.quant.configs import HF_QUANT_CONFIG, compressed_tensors_config, modelopt_files
from qwenlab.quant.layouts import COMPRESSED_TENSORS, LAYOUTS, MODELOPT, get_layout
from qwenlab.quant.linear import nvfp4_modules
from qwenlab.quant.writer import DEFAULT_SHARD_BYTES, check_destination, write_checkpoint

CALIBRATION_SKIP = ("special_tokens", "edge")


def calibration_texts(n: int) -> list[str]:
    lines = (DATA_DIR / "tokenizer_corpus.jsonl").read_text(encoding="utf-8").split("\n")
    rows = [json.loads(line) for line in lines if line.strip()]
    rows = [r["text"] for r in rows if r["category"] not in CALIBRATION_SKIP]
    step = max(1, len(rows) // max(n, 1))
    return rows[::step][:n]


@torch.inference_mode()
def calibrate(ckpt, n_texts: int, max_tokens: int = 64) -> tuple[dict[str, torch.Tensor], int]:
    """Input scales for every NVFP4Linear that has none: amax of its input over the texts / 2688.
    -> ({module: scale}, tokens). The forward pre-hooks that watch the inputs are removed before returning."""
    modules = {name: m for name, m in nvfp4_modules(ckpt.model).items() if m.input_scale is None}
    amax = {name: torch.zeros((), device=ckpt.model.device) for name in modules}

    def record(name):
        def hook(module, args):
            amax[name] = torch.maximum(amax[name], args[0].detach().abs().amax().float())
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in modules.items()]
    tokens = 0
    try:
        for text in calibration_texts(n_texts) if modules else []:
            ids = ckpt.tokenizer.encode(text)[:max_tokens]
            if ids:
                ckpt.model(torch.tensor(ids, device=ckpt.model.device))
                tokens += len(ids)
    finally:
        for h in hooks:
            h.remove()
    return {name: tensor_scale_from_amax(amax[name]) for name in modules}, tokens


def input_scales(ckpt, calibrated: dict | None = None) -> dict[str, torch.Tensor]:
    """Each quantized linear's input scale: the checkpoint's own, else the calibrated one (absent: none)."""
    own = {name: m.input_scale for name, m in nvfp4_modules(ckpt.model).items() if m.input_scale is not None}
    return {**(calibrated or {}), **own}


def quantized_tensors(ckpt, layout_name: str, scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layout = LAYOUTS[layout_name]
    out = {}
    for name, m in nvfp4_modules(ckpt.model).items():
        out[f"{name}.{layout.packed}"] = m.packed.cpu()
        out[f"{name}.{layout.block_scale}"] = m.block_scale.cpu()
        out[f"{name}.{layout.tensor_scale}"] = layout.scale_to_file(m.tensor_scale).cpu()
        if name in scales:
            out[f"{name}.{layout.input_scale}"] = layout.scale_to_file(scales[name]).cpu()
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().cpu()
    return out


def export(ckpt, dst, layout: str = COMPRESSED_TENSORS, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
           calibrated: dict | None = None) -> dict:
    """A loaded NVFP4 model written as a checkpoint: its quantized linears as they are (input scales its own or
    `calibrated`), every other tensor copied from the checkpoint it was loaded from (as stored there), the quant
    config of `layout`."""
    get_layout(layout)
    info, modules = ckpt.model.quantization, nvfp4_modules(ckpt.model)
    scales = input_scales(ckpt, calibrated)
    if layout == MODELOPT and any(name not in scales for name in modules):
        raise QwenlabError("--format modelopt: ModelOpt NVFP4 checkpoints carry input_scale: calibrate (--calibrate N, "
                           "N > 0) or write --format compressed-tensors")
    raw = json.loads((ckpt.path / "config.json").read_text())
    raw.pop("quantization_config", None)
    tensors = quantized_tensors(ckpt, layout, scales)
    replaced = {f"{m}.weight" for m in info.quantized}
    files = weight_files(ckpt.path)
    for name in hf_shapes(ckpt.config):
        if name not in replaced:
            with safe_open(str(files[name]), framework="pt", device="cpu") as f:
                tensors[name] = f.get_tensor(name)
    if raw.get("tie_word_embeddings") and "lm_head" in info.quantized:
        raw["tie_word_embeddings"] = False  # the head is its own (quantized) tensor now
    extra = {}
    if layout == MODELOPT:
        raw["quantization_config"], extra[HF_QUANT_CONFIG] = modelopt_files(info.kept, __version__)
    else:
        activations = all(name in scales for name in modules)
        raw["quantization_config"] = compressed_tensors_config(info.kept, activations)
    write_checkpoint(dst, ckpt.path, raw, dict(sorted(tensors.items())), extra, max_shard_bytes,
                     may_read=lambda path: is_inside(path, ckpt.path))
    return {"dst": str(dst), "format": layout, "source": info.source, "quantized": len(info.quantized),
            "kept": list(info.kept),
            "bytes": sum(p.stat().st_size for p in Path(dst).iterdir() if p.name.endswith(".safetensors"))}


def export_dequantized(ckpt, dst, dtype: torch.dtype = torch.bfloat16,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """A loaded NVFP4 model written as a plain (unquantized) checkpoint of the numbers it computes with: each
    quantized linear's weight dequantized by qwenlab's codec (bit-exact with torchao) and rounded to `dtype`
    (bfloat16: what compressed-tensors' decompression gives), every other tensor copied as stored. The quantized
    reference for a model whose NVFP4 numbers transformers cannot decode itself (MoE experts, doc/moe.md)."""
    info, tensors = ckpt.model.quantization, {}
    for name, module in nvfp4_modules(ckpt.model).items():
        tensors[f"{name}.weight"] = module.dequantize_weight(dtype).cpu()
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().cpu()
    raw = json.loads((ckpt.path / "config.json").read_text())
    raw.pop("quantization_config", None)
    if raw.get("tie_word_embeddings") and "lm_head" in info.quantized:
        raw["tie_word_embeddings"] = False  # the head is its own (quantized) tensor
    files = weight_files(ckpt.path)
    for name in hf_shapes(ckpt.config):
        if name not in tensors:
            with safe_open(str(files[name]), framework="pt", device="cpu") as f:
                tensors[name] = f.get_tensor(name)
    return write_checkpoint(dst, ckpt.path, raw, dict(sorted(tensors.items())), max_shard_bytes=max_shard_bytes,
                            may_read=lambda path: is_inside(path, ckpt.path))


def check_paths(src: Path, dst: Path, force: bool = False):
    """DST is never SRC; inside SRC (or the HF cache blobs it links to) only with force."""
    if dst.resolve() == src.resolve():
        raise QwenlabError(f"{dst}: the destination is the source checkpoint")
    if not force:
        refuse_inside(dst, src, flag="DST")
    check_destination(dst)


def quantize_checkpoint(src, dst, layout: str = COMPRESSED_TENSORS, exclude=None, calibration_texts_n: int = 32,
                        device: str | None = None, dtype: str | None = None,
                        max_shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False) -> dict:
    src, dst = Path(src), Path(dst)
    get_layout(layout)
    check_paths(src, dst, force)
    if max_shard_bytes < 1:
        raise QwenlabError(f"max_shard_bytes={max_shard_bytes}: must be >= 1")
    ckpt = load(src, dtype, device, quant="nvfp4", exclude=exclude)
    scales, tokens = calibrate(ckpt, calibration_texts_n) if calibration_texts_n > 0 else ({}, 0)
    return export(ckpt, dst, layout, max_shard_bytes, scales) | {"src": str(src), "calibration_tokens": tokens}


SIZE_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}


def parse_size(text: str) -> int:
    """'2GiB', '500MB', '1e9' or plain bytes -> bytes (>= 1)."""
    t = text.strip().upper()
    unit = next((u for u in SIZE_UNITS if t.endswith(u)), "")
    try:
        value = float(t[:len(t) - len(unit)]) * SIZE_UNITS.get(unit, 1)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 1:
        raise QwenlabError(f"--max-shard-size {text!r}: give a positive size in bytes or like 2GB, 500MB, 1GiB")
    return int(value)


def cmd_quantize(args) -> int:
    summary = quantize_checkpoint(args.src, args.dst, args.format, args.exclude, args.calibrate, args.device,
                                  args.dtype, parse_size(args.max_shard_size), args.force)
    print(f"wrote {summary['format']} NVFP4 checkpoint to {summary['dst']}: {summary['quantized']} linears quantized "
          f"({summary['source']}), kept {', '.join(summary['kept']) or 'none'}, "
          f"{summary['calibration_tokens']} calibration tokens, {summary['bytes'] / 2**20:.1f} MiB of weights")
    return 0


def register(subparsers):
    p = subparsers.add_parser("quantize", help="write an NVFP4 checkpoint (ModelOpt or compressed-tensors layout)",
                              description=__doc__)
    p.add_argument("src", type=Path, help="bf16/fp16/fp32 Qwen3 checkpoint, or an NVFP4 one (converted)")
    p.add_argument("dst", type=Path, help="new folder (must not exist or be empty)")
    p.add_argument("--format", choices=(COMPRESSED_TENSORS, MODELOPT), default=COMPRESSED_TENSORS)
    p.add_argument("--exclude", nargs="*", default=None, metavar="PATTERN",
                   help=f"linears kept in high precision: module names, globs or re:<regex> (default: "
                        f"{' '.join(DEFAULT_KEEP)}, and {ROUTERS} for a MoE model; --exclude with no pattern "
                        "quantizes lm_head too)")
    p.add_argument("--calibrate", type=int, default=32, metavar="N",
                   help="texts for the activation input scales (default 32; 0: none, compressed-tensors only)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="dtype of the calibration forward (default auto)")
    p.add_argument("--max-shard-size", default="2GiB", help="safetensors shard size (default 2GiB)")
    p.add_argument("--force", action="store_true", help="allow DST inside SRC (never DST = SRC)")
    p.set_defaults(func=cmd_quantize)


def main(argv=None) -> int:
    return standalone_main("quantize", register, argv)


if __name__ == "__main__":
    sys.exit(main())
