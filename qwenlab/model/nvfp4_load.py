"""NVFP4 at load time: which linears of a Qwen3 checkpoint are NVFP4Linear, from an NVFP4 checkpoint (either layout,
recognised from its config, no flag needed) or by quantizing a bf16/fp32 checkpoint's weights (quant="nvfp4").

quant: None = what the checkpoint is; "none" = dense (an NVFP4 checkpoint is dequantized into nn.Linear);
"nvfp4" = NVFP4 weights, activations in the run dtype (W4A16); "nvfp4-w4a4" = activations quantized too.
exclude: when quantizing at load, the linears kept in high precision (globs, exact names or re:<regex>); default
lm_head, and a MoE model's routers (`*.mlp.gate`, as ModelOpt and llm-compressor keep them); its experts are
quantized one linear each. Embeddings and norms are never quantized. A linear whose input dimension is not a
multiple of 16 cannot be NVFP4 (blocks of 16 along K): it stays in high precision and the summary says so. An
NVFP4 checkpoint's own exclusions decide for it (what it stores quantized is what loads quantized).
"""
from dataclasses import dataclass, field

import torch

from qwenlab.errors import QwenlabError
from qwenlab.model.config import Qwen3Config
from qwenlab.model.hf_names import linear_shapes
from qwenlab.quant import codec
from qwenlab.quant.configs import QuantConfig, read_quant_config
from qwenlab.quant.layouts import LAYOUTS, check_patterns, is_excluded
from qwenlab.quant.linear import QuantInfo, choose_kernel, module_state
from qwenlab.quant.reader import QuantizedModule, quantized_modules, read_module, tensor_dtypes

QUANT_MODES = ("none", "nvfp4", "nvfp4-w4a4")
DEFAULT_KEEP = ("lm_head",)
ROUTERS = "*.mlp.gate"  # a MoE layer's router: a few logits decide which experts run, kept in high precision


def default_keep(cfg: Qwen3Config) -> tuple[str, ...]:
    return (*DEFAULT_KEEP, ROUTERS) if cfg.is_moe else DEFAULT_KEEP


def parse_quant(quant: str | None) -> str | None:
    if quant in (None, ""):
        return None
    if quant not in QUANT_MODES:
        raise QwenlabError(f"--quant {quant!r}: choose one of {', '.join(QUANT_MODES)}")
    return quant


@dataclass
class QuantSelection:
    """Which linears load as NVFP4 and where their numbers come from."""
    mode: str | None
    config: QuantConfig | None  # the checkpoint's, when it is NVFP4
    stored: dict[str, QuantizedModule] = field(default_factory=dict)  # quantized in the file
    at_load: list[str] = field(default_factory=list)  # to quantize now
    exclude: list[str] = field(default_factory=list)
    unquantizable: list[str] = field(default_factory=list)  # K not a multiple of 16: kept in high precision

    @property
    def replaced_weights(self) -> set[str]:
        """Dense `.weight` names the file does not hold (or the model must not get) for these modules."""
        return {f"{m}.weight" for m in [*self.stored, *self.at_load]}

    @property
    def quantized(self) -> list[str]:
        return [*self.stored, *self.at_load]

    @property
    def file_names(self) -> set[str]:
        """The file's tensors of the modules stored quantized (packed codes and scales)."""
        return {name for m in self.stored.values() for name in m.names()}


def select(checkpoint_dir, cfg: Qwen3Config, shapes: dict, files, quant: str | None, exclude=None) -> QuantSelection:
    mode = parse_quant(quant)
    config = read_quant_config(checkpoint_dir)
    linears = linear_shapes(cfg)
    if config is not None:
        dtypes = {}
        for path in sorted(set(files.values())):
            dtypes |= tensor_dtypes(path)
        stored = quantized_modules(shapes, dtypes, LAYOUTS[config.layout], linears, checkpoint_dir)
        if not stored:
            raise QwenlabError(f"{config.source}: says NVFP4 ({config.layout}) but no linear is stored quantized "
                               f"in that layout")
        return QuantSelection(mode, config, stored, [], list(config.exclude))
    if mode not in ("nvfp4", "nvfp4-w4a4"):
        return QuantSelection(mode, None)
    exclude = list(default_keep(cfg) if exclude is None else exclude)
    check_patterns(exclude)
    wanted = [m for m in linears if not is_excluded(m, exclude)]
    unquantizable = [m for m in wanted if linears[m][1] % codec.BLOCK]
    return QuantSelection(mode, None, {}, [m for m in wanted if m not in unquantizable], exclude, unquantizable)


def quant_info(sel: QuantSelection, cfg: Qwen3Config, device) -> QuantInfo | None:
    """What the loader tells the model's constructor: None when the model stays dense."""
    if sel.mode == "none" or not sel.quantized:
        return None
    activations = "w4a4" if sel.mode == "nvfp4-w4a4" else "w4a16"
    source, layout = ("checkpoint", sel.config.layout) if sel.config else ("quantized at load", None)
    kept = [m for m in linear_shapes(cfg) if m not in sel.quantized]
    return QuantInfo("nvfp4", source, layout, sel.exclude, sel.quantized, kept,
                     input_scales=[m for m, names in sel.stored.items() if names.input_scale],
                     unquantizable=list(sel.unquantizable), activations=activations,
                     kernel=choose_kernel(activations, device))


def quantized_state(sel: QuantSelection, get, device, dtype: torch.dtype, tied: bool) -> dict[str, torch.Tensor]:
    """The tensors of the quantized linears, under the model's names. get(name) -> the file's tensor. With quant
    "none" an NVFP4 checkpoint's linears come back dense (dequantized exactly) under `<module>.weight`."""
    state = {}
    for module, names in sel.stored.items():
        weight, input_scale = read_module(get, names, LAYOUTS[sel.config.layout], device)
        if sel.mode == "none":
            state[f"{module}.weight"] = codec.dequantize(weight, dtype)
        else:
            state |= {f"{module}.{k}": v for k, v in module_state(weight, input_scale=input_scale).items()}
    for module in sel.at_load:
        source = get("model.embed_tokens.weight" if module == "lm_head" and tied else f"{module}.weight")
        weight = codec.quantize(source.to(device), where=f"{module}.weight")
        state |= {f"{module}.{k}": v for k, v in module_state(weight).items()}
    return state
