"""Will one more transformers reference fit beside what is already loaded (notebooks 04 and 06)? Its bytes from the
memory model (qwenlab.memory.plan.model_bytes: weights, eager attention's workspace, all positions' logits) against
the free memory now, times HEADROOM: on the model's device, or on every visible GPU when there are several (the
reference is then spread over them by accelerate, device_map="auto"). A reference that does not fit is not loaded;
one whose load still runs out of memory is dropped. Either way the caller gets a one-line reason and falls back
(fixed limits, a skipped section) instead of stopping."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwenlab.memory.device import empty_cache, settle
from qwenlab.memory.plan import DeviceMemory, model_bytes, room

GIB = 2 ** 30


@dataclass(frozen=True)
class Fit:
    what: str  # "the float32 reference"
    need: int  # bytes
    free: float  # usable bytes where it would load
    spread: bool  # over several GPUs (device_map="auto")
    beside: str = "qwenlab's model"  # what is already loaded, for the reason

    @property
    def fits(self) -> bool:
        return self.need <= self.free

    def why_not(self) -> str:
        return f"{self.what} needs {self.need / GIB:.1f} GiB, {self.free / GIB:.1f} GiB free beside {self.beside}"

    def load_kwargs(self) -> dict:
        return {"device_map": "auto"} if self.spread else {}


def several_gpus(device) -> bool:
    """Whether a reference for a model on `device` is spread over the visible GPUs (more than one)."""
    return torch.device(device).type == "cuda" and torch.cuda.device_count() > 1


def reference_fit(what: str, cfg, dtype: str, tokens: int, devices: list[DeviceMemory], spread: bool,
                  beside: str = "qwenlab's model") -> Fit:
    """Does transformers' model of `cfg` in `dtype`, run on `tokens` tokens, fit in `devices`' free memory now?"""
    return Fit(what, model_bytes(cfg, dtype, tokens)[1], room(devices, spread), spread, beside)


def release(device):
    """After a model is dropped: garbage collected, kernels finished, the allocator's cached blocks handed back."""
    settle(device)
    empty_cache(device)


def held(device) -> str:
    """What this process itself still holds on a GPU `device` ("" elsewhere): tells a leak (allocated) from cached
    blocks the allocator could not hand back (reserved) when a reference does not fit."""
    if torch.device(device).type != "cuda":
        return ""
    return (f" (this process holds {torch.cuda.memory_allocated(device) / GIB:.1f} GiB allocated, "
            f"{torch.cuda.memory_reserved(device) / GIB:.1f} GiB reserved)")


def out_of_memory(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load_if_fits(fit: Fit, load: Callable[..., object], device) -> tuple[object | None, str | None]:
    """(model, None), or (None, why) when `fit` says it does not fit (nothing is loaded) or its load runs out of
    memory (what it had allocated is released). load is called with fit.load_kwargs()."""
    if not fit.fits:
        return None, fit.why_not() + held(device)
    try:
        return load(**fit.load_kwargs()), None
    except torch.OutOfMemoryError as e:
        why = f"{fit.what} does not fit ({out_of_memory(e)})"
    release(device)  # outside the except block: its traceback no longer holds the partly loaded model
    return None, why
