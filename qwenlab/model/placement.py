"""A model split across devices by layer ranges: the embedding on the first device, each decoder layer on its own,
the final norm and an untied head on the last. The forward is not touched: a pre-hook on each module that lives
elsewhere than the embedding moves its tensor inputs (the residual, RoPE tables, mask) to its device, and each
layer's KV cache is allocated on that layer's device. Probes and dumps gather to the CPU as always.

A device map is a list of one device per layer, or a spec: `balanced` (equal layer counts over the visible GPUs)
or ranges such as `0:0-31,1:32-63` (GPU index or any torch device, then first-last layer; every layer once).
"""
import torch
from torch import nn

from qwenlab.errors import QwenlabError


def parse_device_map(spec, num_layers: int) -> list[str]:
    """A spec or a per-layer list -> one device name per layer."""
    if isinstance(spec, (list, tuple)):
        layers = [str(torch.device(d)) for d in spec]
    elif spec == "balanced":
        count = torch.cuda.device_count()
        if count == 0:
            raise QwenlabError("--device-map balanced: no CUDA device is visible")
        layers = [f"cuda:{i * count // num_layers}" for i in range(num_layers)]
    else:
        layers = [None] * num_layers
        for part in str(spec).split(","):
            device, _, span = part.strip().rpartition(":")
            first, _, last = span.partition("-")
            try:
                device = torch.device(f"cuda:{device}" if device.isdigit() else device)
                first, last = int(first), int(last or first)
            except (RuntimeError, ValueError):
                raise QwenlabError(f"--device-map {spec!r}: {part.strip()!r} is not DEVICE:FIRST-LAST "
                                   "(e.g. 0:0-31,1:32-63)") from None
            if not 0 <= first <= last < num_layers:
                raise QwenlabError(f"--device-map {spec!r}: layers {first}-{last} outside 0-{num_layers - 1}")
            for i in range(first, last + 1):
                if layers[i] is not None:
                    raise QwenlabError(f"--device-map {spec!r}: layer {i} is mapped twice")
                layers[i] = str(device)
        if None in layers:
            raise QwenlabError(f"--device-map {spec!r}: layer {layers.index(None)} is not mapped")
    if len(layers) != num_layers:
        raise QwenlabError(f"device map has {len(layers)} entries for {num_layers} layers")
    for name in set(layers):
        device = torch.device(name)
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.type == "cuda" and (device.index or 0) >= visible:
            raise QwenlabError(f"device map names {name}, which is not visible on this machine")
    return layers


def _inputs_to(device: torch.device):
    def hook(module, args):
        return tuple(a.to(device, non_blocking=True) if isinstance(a, torch.Tensor) else a for a in args)
    return hook


def place(model: nn.Module, layer_devices: list[str]) -> nn.Module:
    """Moves the model's parts to their devices (from wherever they were loaded) and installs the input moves."""
    first, last = torch.device(layer_devices[0]), torch.device(layer_devices[-1])
    backbone = model.model
    tied = model.lm_head.weight.data_ptr() == backbone.embed_tokens.weight.data_ptr()
    backbone.embed_tokens.to(first)
    for layer, name in zip(backbone.layers, layer_devices):
        layer.to(torch.device(name))
        layer.register_forward_pre_hook(_inputs_to(torch.device(name)))
    backbone.norm.to(last)
    backbone.norm.register_forward_pre_hook(_inputs_to(last))
    if tied:  # .to() copies; the head keeps sharing the embedding's (moved) weight
        model.lm_head.weight = backbone.embed_tokens.weight
    else:
        model.lm_head.to(last)
    model.lm_head.register_forward_pre_hook(_inputs_to(model.lm_head.weight.device))
    model.layer_devices = list(layer_devices)
    return model


def layer_devices(model) -> list[str] | None:
    """The per-layer devices of a placed model, or None for a model on one device."""
    return getattr(model, "layer_devices", None)


def is_split(model) -> bool:
    devices = layer_devices(model)
    return devices is not None and len(set(devices)) > 1
