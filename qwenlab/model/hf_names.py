"""The model's tensors under Hugging Face checkpoint names, derived from the module tree in one place.

Shapes come from a model built on the meta device (no memory, no hand-written tables). Fused projections
(`qkv_proj`, `gate_up_proj`, made at load) map to the HF names they concatenate, in order, along dim 0.
A MoE layer's experts are stored one linear each (`mlp.experts.{e}.gate_proj.weight`, ...), as Qwen ships them and
as transformers' save_pretrained writes them (it fuses them into 3-D `mlp.experts.gate_up_proj` / `down_proj` only
in memory); its router is `mlp.gate.weight`.
"""
import functools

import torch
from torch import nn

from qwenlab.model.config import Qwen3Config
from qwenlab.model.qwen3 import Qwen3

PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def meta_model(cfg: Qwen3Config) -> Qwen3:
    with torch.device("meta"):
        return Qwen3(cfg)


def packed_sizes(cfg: Qwen3Config, fused: str) -> list[int]:
    if fused == "qkv_proj":
        return [cfg.q_size, cfg.kv_size, cfg.kv_size]
    return [cfg.intermediate_size, cfg.intermediate_size]


def split_name(name: str) -> tuple[str, str, str]:
    """`model.layers.0.self_attn.qkv_proj.weight` -> (`model.layers.0.self_attn`, `qkv_proj`, `weight`)."""
    module, _, leaf = name.rpartition(".")
    parent, _, child = module.rpartition(".")
    return parent, child, leaf


def hf_state_dict(model: Qwen3) -> dict[str, torch.Tensor]:
    """The model's state under HF names: fused parameters split back into views; a tied head left out (HF
    checkpoints store it once, as the embedding)."""
    out = {}
    for name, tensor in model.state_dict().items():
        parent, child, leaf = split_name(name)
        if child in PACKED:
            pieces = tensor.split(packed_sizes(model.config, child))
            out |= {f"{parent}.{part}.{leaf}": piece for part, piece in zip(PACKED[child], pieces)}
        else:
            out[name] = tensor
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def fused_state(state: dict[str, torch.Tensor], model: Qwen3) -> dict[str, torch.Tensor]:
    """HF-named tensors -> the names `model` has: the parts of each fused parameter concatenated (and dropped)."""
    out = dict(state)
    for name in model.state_dict():
        parent, child, leaf = split_name(name)
        if child in PACKED:
            parts = [f"{parent}.{part}.{leaf}" for part in PACKED[child]]
            out[name] = torch.cat([out.pop(p) for p in parts])
    return out


def hf_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this config holds, name -> shape, in the module tree's order."""
    return dict(_tables(cfg)[0])


def linear_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, int]]:
    """Every linear of the model, HF module name -> (out N, in K), forward order, lm_head last."""
    return dict(_tables(cfg)[1])


@functools.lru_cache(maxsize=8)
def _tables(cfg: Qwen3Config) -> tuple[tuple, tuple]:
    """Both tables from one meta model, once per config (a MoE model's tens of thousands of expert linears take
    seconds to build, and the planner asks many times)."""
    model = meta_model(cfg)
    shapes = tuple((name, tuple(t.shape)) for name, t in hf_state_dict(model).items())
    linears = tuple((name, (m.out_features, m.in_features)) for name, m in model.named_modules()
                    if isinstance(m, nn.Linear))
    return shapes, linears


def fused_experts_hint(name: str, shapes: dict) -> str:
    """For a missing per-expert tensor of a checkpoint that holds transformers' in-memory 3-D experts instead: why."""
    layer, sep, _ = name.partition(".mlp.experts.")
    fused = f"{layer}.mlp.experts.gate_up_proj"
    if not sep or fused not in shapes:
        return ""
    return (f" (it holds {fused} {list(shapes[fused])}: transformers' fused in-memory layout; qwenlab reads the "
            "per-expert layout that save_pretrained and Qwen's checkpoints store)")
