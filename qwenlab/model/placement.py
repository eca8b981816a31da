"""A model split across devices by layer ranges: the embedding on the first device, each decoder layer on its own,
the final norm and an untied head on the last. The loader reads each tensor straight to its device (device_of);
the forward moves the residual, RoPE tables and mask when the next layer lives elsewhere, and each layer's KV cache
is allocated on that layer's device. Captures and dumps gather to the CPU as always.

A device map is a list of one device per layer, or a spec: `balanced` (equal layer counts over the visible GPUs)
or ranges such as `0:0-31,1:32-63` (GPU index or any torch device, then first-last layer; every layer once).
"""
import torch

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


def device_of(name: str, layer_devices: list[str], tied: bool) -> torch.device:
    """The device of an HF-named tensor in a split model: a decoder layer's tensors on that layer's device, the
    embedding (and a tied head) on the first layer's, the final norm and an untied head on the last layer's."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return torch.device(layer_devices[int(parts[2])])
    if parts[0] == "lm_head" and not tied or name.startswith("model.norm."):
        return torch.device(layer_devices[-1])
    return torch.device(layer_devices[0])
