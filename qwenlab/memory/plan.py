"""Before loading anything: will qwenlab's model and the references fit, and how should a comparison run?

From config.json and the memory model: bytes for qwenlab's model (weights, KV cache of the prompt, workspace), for
the reference in the run dtype and for the float32 reference that measures the floors (weights, eager-attention
workspace), against the free memory of each visible device (or the host's RAM on the CPU). The models run one
after the other (qwenlab.checks.placement); the choice, in order of preference:

    resident    qwenlab's model stays loaded while each reference loads beside it (a quantized model needs this)
    sequential  one device, one model at a time
    split       several GPUs: a model that does not fit one is split across them by layers
    impossible  an error before loading, with the numbers

When the float32 reference fits nowhere the comparison still runs, with the dtype's default floors instead of
measured ones, and the plan says so. A request may force a placement; it fails with the numbers when it cannot fit.
"""
from dataclasses import asdict, dataclass, field

import psutil
import torch

from qwenlab.errors import QwenlabError
from qwenlab.memory.predict import kv_cache_bytes, weight_bytes, workspace_bytes
from qwenlab.model.config import Qwen3Config

PLACEMENTS = ("auto", "resident", "sequential", "split")
GB = 1e9
HEADROOM = 0.92  # of the free bytes: the allocator's block rounding and CUDA context growth need the rest


@dataclass(frozen=True)
class DeviceMemory:
    name: str
    free: int
    total: int


@dataclass
class Plan:
    placement: str
    qwenlab_bytes: int
    reference_bytes: int
    devices: list[DeviceMemory]
    truth_bytes: int = 0  # the float32 reference (0: the run is float32, the reference is the truth)
    truth: bool = True  # False: the float32 reference fits nowhere, floors fall back to the dtype's defaults
    layer_devices: list[str] = field(default_factory=list)  # qwenlab's layer -> device, when split
    reference_max_memory: dict = field(default_factory=dict)  # accelerate's max_memory, when split
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        free = ", ".join(f"{d.name} {d.free / GB:.1f} GB free of {d.total / GB:.1f}" for d in self.devices)
        truth = f", the float32 reference {self.truth_bytes / GB:.2f} GB" if self.truth_bytes else ""
        lines = [f"placement: {self.placement} (qwenlab needs {self.qwenlab_bytes / GB:.2f} GB, the reference "
                 f"{self.reference_bytes / GB:.2f} GB{truth}; {free})"]
        if self.layer_devices:
            spans = ", ".join(f"{dev} {a}-{b}" for dev, (a, b) in _ranges(self.layer_devices))
            lines.append(f"qwenlab layers: {spans}")
        return "\n".join(lines + [f"  {n}" for n in self.notes])


def _ranges(layer_devices: list[str]) -> list[tuple[str, tuple[int, int]]]:
    out = []
    for i, dev in enumerate(layer_devices):
        if out and out[-1][0] == dev:
            out[-1] = (dev, (out[-1][1][0], i))
        else:
            out.append((dev, (i, i)))
    return out


def visible_devices(device: str) -> list[DeviceMemory]:
    """The memory that a run on `device` can use: every visible GPU for cuda (the named one first), else the
    host's available RAM."""
    dev = torch.device(device)
    if dev.type != "cuda":
        vm = psutil.virtual_memory()
        return [DeviceMemory("cpu", vm.available, vm.total)]
    first = dev.index or 0
    order = [first] + [i for i in range(torch.cuda.device_count()) if i != first]
    out = []
    for i in order:
        free, total = torch.cuda.mem_get_info(i)
        out.append(DeviceMemory(f"cuda:{i}", free, total))
    return out


def room(devices: list[DeviceMemory], spread: bool = False) -> float:
    """Usable bytes for one more model now: the first device's free bytes x HEADROOM, or every device's when the model
    is spread across them (several GPUs, accelerate's device_map="auto")."""
    return sum(d.free for d in (devices if spread else devices[:1])) * HEADROOM


def model_bytes(cfg: Qwen3Config, dtype: str, prompt_tokens: int, quant: str | None = None) -> tuple[int, int]:
    """(qwenlab, reference) bytes for one capture of a prompt: weights + KV + workspace for qwenlab; weights +
    the eager-attention workspace (all positions' logits kept) for the reference, which runs unquantized."""
    weights = weight_bytes(cfg, quant or dtype)["total"]
    ref_weights = weight_bytes(cfg, dtype)["total"]
    qwenlab = weights + kv_cache_bytes(cfg, dtype, prompt_tokens) + \
        workspace_bytes(cfg, dtype, prompt_tokens, logits_tokens=prompt_tokens)["total"]
    reference = ref_weights + workspace_bytes(cfg, dtype, prompt_tokens, logits_tokens=prompt_tokens,
                                              scores_materialised=True)["total"]
    return qwenlab, reference


def split_layers(cfg: Qwen3Config, dtype: str, devices: list[DeviceMemory], share: float = 1.0,
                 quant: str | None = None) -> list[str]:
    """Layers over the devices in order, each device filled up to `share` of its usable bytes, the embedding on the
    first and the final norm and head on the last counted where they live."""
    w = weight_bytes(cfg, quant or dtype)
    per_layer = (w["attn_proj"] + w["attn_bias"] + w["mlp_proj"] + w["norms"]) / cfg.num_hidden_layers
    room = [d.free * HEADROOM * share for d in devices]
    room[0] -= w["embed_tokens"]
    room[-1] -= w["lm_head"]
    total_room = sum(max(r, 0) for r in room)
    layers, out = cfg.num_hidden_layers, []
    for i, (d, r) in enumerate(zip(devices, room)):
        left = layers - len(out)
        if i == len(devices) - 1:
            count = left
        else:
            count = min(left, int(round(layers * max(r, 0) / total_room)) if total_room > 0 else 0)
            count = min(count, int(max(r, 0) // per_layer))
        out += [d.name] * count
    return out


def truth_bytes(cfg: Qwen3Config, dtype: str, prompt_tokens: int) -> int:
    """Bytes of the float32 reference that measures the floors; 0 for a float32 run (its reference is the truth)."""
    return 0 if dtype in ("float32", "float64") else model_bytes(cfg, "float32", prompt_tokens)[1]


def plan(cfg: Qwen3Config, dtype: str, prompt_tokens: int, device: str = "cpu", *, placement: str = "auto",
         devices: list[DeviceMemory] | None = None, quant: str | None = None) -> Plan:
    """The placement for comparing qwenlab with the references on `device` (devices: fake sizes for tests)."""
    if placement not in PLACEMENTS:
        raise QwenlabError(f"placement {placement!r}: choose one of {', '.join(PLACEMENTS)}")
    devices = devices if devices is not None else visible_devices(device)
    q, r = model_bytes(cfg, dtype, prompt_tokens, quant)
    t = truth_bytes(cfg, dtype, prompt_tokens)
    usable = devices[0].free * HEADROOM
    total = sum(d.free for d in devices) * HEADROOM if len(devices) > 1 and devices[0].name != "cpu" else usable
    result = Plan("impossible", q, r, devices, t)
    if placement in ("auto", "resident") and q + r <= usable and (q + t <= usable or quant or t > usable
                                                                   or placement == "resident"):
        result.placement = "resident"
        result.truth = q + t <= usable
    elif placement in ("auto", "sequential") and max(q, r) <= usable:
        result.placement = "sequential"
        result.truth = t <= usable
        result.notes.append("one model at a time: " + (
            "as asked" if placement == "sequential" else
            f"qwenlab and the reference together need {(q + r) / GB:.1f} GB, {usable / GB:.1f} GB usable on "
            f"{devices[0].name}"))
    elif placement in ("auto", "split") and total > usable and max(q, r) <= total:
        result.placement = "split"
        result.truth = t <= total
        if q > usable or placement == "split":
            result.layer_devices = split_layers(cfg, dtype, devices, 1.0, quant)
        result.reference_max_memory = {int(d.name.split(":")[1]): int(d.free * HEADROOM) for d in devices}
        result.notes.append(f"{len(devices)} GPUs: one model at a time, each split by layers when it needs to be")
    if placement == "auto" and result.placement in ("resident", "sequential") and not result.truth and \
            usable < t <= total:
        result.placement, result.truth = "split", True  # the float32 reference needs the other GPUs: split it
        result.reference_max_memory = {int(d.name.split(":")[1]): int(d.free * HEADROOM) for d in devices}
        if q > usable:
            result.layer_devices = split_layers(cfg, dtype, devices, 1.0, quant)
        result.notes.append(f"the float32 reference ({t / GB:.1f} GB) is split across {len(devices)} GPUs")
    if result.placement != "impossible" and not result.truth:
        result.notes.append(f"the float32 reference ({t / GB:.1f} GB) fits nowhere: floors fall back to the dtype's "
                            "defaults instead of measured ones")
    if result.placement == "impossible":
        free = ", ".join(f"{d.free / GB:.1f} GB free on {d.name}" for d in devices)
        asked = "" if placement == "auto" else f" (placement {placement})"
        raise QwenlabError(f"does not fit{asked}: qwenlab needs {q / GB:.1f} GB and the reference {r / GB:.1f} GB; "
                           f"{free}")
    return result
