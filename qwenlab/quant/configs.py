"""Which NVFP4 layout a checkpoint uses, read from its config files, and the config files qwenlab writes.

ModelOpt: hf_quant_config.json {"quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": [...]}}
and/or config.json "quantization_config" {"quant_method": "modelopt", "quant_algo": "NVFP4", ...}.
compressed-tensors: config.json "quantization_config" {"quant_method": "compressed-tensors",
"format": "nvfp4-pack-quantized", "config_groups": {...}, "ignore": [...]}.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

from qwenlab.errors import QwenlabError
from qwenlab.quant.codec import BLOCK
from qwenlab.quant.layouts import COMPRESSED_TENSORS, MODELOPT

NVFP4_FORMAT = "nvfp4-pack-quantized"
HF_QUANT_CONFIG = "hf_quant_config.json"


@dataclass
class QuantConfig:
    layout: str
    exclude: list[str] = field(default_factory=list)
    source: str = ""
    activations: bool = True  # the checkpoint's scheme quantizes activations too (W4A4: input scales present)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QwenlabError(f"{path}: not valid JSON ({e})") from None


def _check_group_size(value, where: str):
    if value is not None and int(value) != BLOCK:
        raise QwenlabError(f"{where}: group_size {value} is not NVFP4's {BLOCK}")


def _modelopt(q: dict, where: str) -> QuantConfig:
    inner = q.get("quantization") or {}
    algo = q.get("quant_algo") or inner.get("quant_algo")
    if str(algo).upper() != "NVFP4":
        raise QwenlabError(f"{where}: quant_algo {algo!r} is not NVFP4 (qwenlab reads NVFP4 checkpoints only)")
    _check_group_size(q.get("group_size", inner.get("group_size")), where)
    exclude = q.get("exclude_modules") or inner.get("exclude_modules") or q.get("ignore") or []
    return QuantConfig(MODELOPT, list(exclude), where)


def _compressed_tensors(q: dict, where: str) -> QuantConfig:
    groups = q.get("config_groups") or {}
    if not groups:
        raise QwenlabError(f"{where}: compressed-tensors quantization_config has no config_groups")
    activations = False
    for name, group in groups.items():
        fmt = group.get("format") or q.get("format")
        weights = group.get("weights") or {}
        if fmt != NVFP4_FORMAT or weights.get("num_bits") != 4 or weights.get("type") != "float":
            raise QwenlabError(f"{where}: config group {name!r} (format {fmt!r}, {weights.get('num_bits')}-bit "
                               f"{weights.get('type')}) is not NVFP4 ({NVFP4_FORMAT!r}, 4-bit float)")
        _check_group_size(weights.get("group_size"), f"{where}: config group {name!r}")
        activations = activations or bool(group.get("input_activations"))
    return QuantConfig(COMPRESSED_TENSORS, list(q.get("ignore") or []), where, activations)


def read_quant_config(checkpoint_dir) -> QuantConfig | None:
    """The checkpoint's NVFP4 description, None for an unquantized checkpoint; QwenlabError for any other
    quantization method and for config files that contradict each other."""
    checkpoint_dir = Path(checkpoint_dir)
    found = []
    config_path = checkpoint_dir / "config.json"
    if config_path.is_file():
        q = _read_json(config_path).get("quantization_config")
        if q:
            where = f"{config_path}: quantization_config"
            method = q.get("quant_method")
            if method == "compressed-tensors":
                found.append(_compressed_tensors(q, where))
            elif method == "modelopt":
                found.append(_modelopt(q, where))
            else:
                raise QwenlabError(f"{where}: quant_method {method!r} is not NVFP4 (qwenlab reads 'modelopt' NVFP4 "
                                   f"and 'compressed-tensors' {NVFP4_FORMAT})")
    hf_path = checkpoint_dir / HF_QUANT_CONFIG
    if hf_path.is_file():
        found.append(_modelopt(_read_json(hf_path), str(hf_path)))
    layouts = {c.layout for c in found}
    if len(layouts) > 1:
        raise QwenlabError(f"{checkpoint_dir}: the checkpoint mixes both conventions: "
                           + " and ".join(f"{c.source} says {c.layout}" for c in found))
    return found[0] if found else None


def modelopt_files(exclude: list[str], producer: str) -> tuple[dict, dict]:
    """(config.json quantization_config, hf_quant_config.json) for a ModelOpt-layout NVFP4 checkpoint."""
    quantization = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": BLOCK,
                    "exclude_modules": list(exclude)}
    hf = {"producer": {"name": "qwenlab", "version": producer}, "quantization": quantization}
    return {"quant_method": "modelopt", **quantization}, hf


def _fp4_args(dynamic, observer: str | None = None) -> dict:
    args = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": BLOCK, "strategy": "tensor_group",
            "dynamic": dynamic, "scale_dtype": "torch.float8_e4m3fn"}
    return args | ({"observer": observer} if observer else {})


def compressed_tensors_config(ignore: list[str], activations: bool) -> dict:
    """config.json quantization_config as llm-compressor writes it: scheme NVFP4 (weights and activations, with the
    calibrated input_global_scale) or, without activation scales, NVFP4A16."""
    group = {"targets": ["Linear"], "weights": _fp4_args(False),
             "input_activations": _fp4_args("local", "static_minmax") if activations else None,
             "output_activations": None, "format": NVFP4_FORMAT}
    return {"config_groups": {"config_group_0": group}, "quant_method": "compressed-tensors",
            "kv_cache_scheme": None, "format": NVFP4_FORMAT, "quantization_status": "compressed",
            "global_compression_ratio": None, "ignore": list(ignore)}
