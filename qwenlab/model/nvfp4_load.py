"""NVFP4 at load time: which linears of a Qwen3 checkpoint become NVFP4Linear, from an NVFP4 checkpoint (either
layout, recognised from its config, no flag needed) or by quantizing a bf16/fp32 checkpoint's weights (quant="nvfp4").

quant: None/"" = what the checkpoint is; "none" = dense (an NVFP4 checkpoint is dequantized into nn.Linear);
"nvfp4" = NVFP4 weights, activations in the run dtype (W4A16); "nvfp4-w4a4" = activations quantized too.
exclude: when quantizing at load, the linears kept in high precision (globs, exact names or re:<regex>); default
lm_head. Embeddings and norms are never quantized. An NVFP4 checkpoint's own exclusions decide for it.
"""
from dataclasses import dataclass, field

import torch

from qwenlab.errors import QwenlabError
from qwenlab.model.config import Qwen3Config
from qwenlab.quant import codec
from qwenlab.quant.configs import QuantConfig, read_quant_config
from qwenlab.quant.layouts import LAYOUTS, check_patterns, is_excluded
from qwenlab.quant.linear import NVFP4Linear, QuantInfo, set_activations
from qwenlab.quant.reader import QuantizedModule, quantized_modules, read_module, tensor_dtypes

QUANT_MODES = ("none", "nvfp4", "nvfp4-w4a4")
DEFAULT_KEEP = ("lm_head",)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def parse_quant(quant: str | None) -> str | None:
    if quant in (None, ""):
        return None
    if quant not in QUANT_MODES:
        raise QwenlabError(f"--quant {quant!r}: choose one of {', '.join(QUANT_MODES)}")
    return quant


def linear_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, int]]:
    """Every linear a Qwen3 has, module name -> (out N, in K), forward order, lm_head last."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    per_layer = dict(zip(PROJECTIONS, [(cfg.q_size, H), (cfg.kv_size, H), (cfg.kv_size, H), (H, cfg.q_size),
                                       (I, H), (I, H), (H, I)]))
    shapes = {f"model.layers.{i}.{p}": s for i in range(cfg.num_hidden_layers) for p, s in per_layer.items()}
    return shapes | {"lm_head": (cfg.vocab_size, H)}


@dataclass
class QuantPlan:
    mode: str | None
    config: QuantConfig | None  # the checkpoint's, when it is NVFP4
    stored: dict[str, QuantizedModule] = field(default_factory=dict)  # quantized in the file
    at_load: list[str] = field(default_factory=list)  # to quantize now
    exclude: list[str] = field(default_factory=list)

    @property
    def replaced_weights(self) -> set[str]:
        """Dense `.weight` names the file does not hold (or the model must not get) for these modules."""
        return {f"{m}.weight" for m in [*self.stored, *self.at_load]}

    @property
    def file_names(self) -> set[str]:
        """The file's tensors of the modules stored quantized (packed codes and scales)."""
        return {name for m in self.stored.values() for name in m.names()}


def plan(checkpoint_dir, cfg: Qwen3Config, shapes: dict, files, quant: str | None, exclude=None) -> QuantPlan:
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
        return QuantPlan(mode, config, stored, [], list(config.exclude))
    if mode not in ("nvfp4", "nvfp4-w4a4"):
        return QuantPlan(mode, None)
    exclude = list(DEFAULT_KEEP if exclude is None else exclude)
    check_patterns(exclude)
    for module, shape in linears.items():
        if not is_excluded(module, exclude):
            codec.check_shape(shape, f"{checkpoint_dir}: {module}.weight")
    return QuantPlan(mode, None, {}, [m for m in linears if not is_excluded(m, exclude)], exclude)


def build(model, p: QuantPlan, get, device, dtype: torch.dtype, state: dict) -> QuantInfo | None:
    """Puts the quantized linears into the meta-built model and their tensors into `state` (the rest of the state
    is the loader's). get(name) -> the file's tensor. Returns the QuantInfo, None when the model stays dense."""
    if p.mode == "none":
        for module, names in p.stored.items():  # dense on request: the checkpoint's values, dequantized exactly
            weight, _ = read_module(get, names, LAYOUTS[p.config.layout], device)
            state[f"{module}.weight"] = codec.dequantize(weight, dtype)
        return None
    if not p.stored and not p.at_load:
        return None
    for module, names in p.stored.items():
        weight, input_scale = read_module(get, names, LAYOUTS[p.config.layout], device)
        _install(model, module, NVFP4Linear.from_weight(weight, input_scale=input_scale), state)
    for module in p.at_load:
        source = get("model.embed_tokens.weight" if module == "lm_head" and model.config.tie_word_embeddings
                     else f"{module}.weight")
        weight = codec.quantize(source.to(device), where=f"{module}.weight")
        _install(model, module, NVFP4Linear.from_weight(weight), state)
    quantized = [*p.stored, *p.at_load]
    kept = [m for m in linear_shapes(model.config) if m not in quantized]
    source, layout = ("checkpoint", p.config.layout) if p.config else ("quantized at load", None)
    info = QuantInfo("nvfp4", source, layout, p.exclude, quantized, kept)
    info.activations = "w4a4" if p.mode == "nvfp4-w4a4" else "w4a16"
    info.kernel = set_activations(model, info.activations)
    return info


def _install(model, name: str, module: NVFP4Linear, state: dict):
    model.set_submodule(name, module)
    state |= {f"{name}.{k}": v for k, v in module.state_dict().items()}
