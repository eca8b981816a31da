"""What torch and the OS say and do about memory: one host or CUDA allocator sample, settling before a baseline,
and the allocator policies (emptying its cache, expandable_segments, recording its history). The tracker
(qwenlab.memory) samples through this module; the stress matrix and notebook 05 apply its policies."""
import gc
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from torch._subclasses.fake_tensor import is_fake

NAN = float("nan")
ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"


def read_hwm() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return NAN


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def cuda_requested(device) -> int:
    """Bytes the live tensors on a CUDA device asked the caching allocator for: memory_allocated without the
    allocator's rounding (a large block keeps the rest of its segment when that is under 1 MiB: an NVFP4 load of the
    Qwen3-4B shape leaves 68 MiB of it). What a load's own tensors hold, for a gate that looks for leaked ones."""
    s = torch.cuda.memory_stats(device)
    return int(s.get("requested_bytes.all.current", s.get("allocated_bytes.all.current", 0)))


def cuda_sample(device) -> dict:
    """The allocator's counters for one device (no synchronisation: they are host-side bookkeeping)."""
    s = torch.cuda.memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    return {"cuda_allocated": s.get("allocated_bytes.all.current", 0),
            "cuda_reserved": s.get("reserved_bytes.all.current", 0),
            "cuda_active": s.get("active_bytes.all.current", 0),
            "cuda_inactive_split": s.get("inactive_split_bytes.all.current", 0),
            "cuda_peak_allocated": s.get("allocated_bytes.all.peak", 0),
            "cuda_peak_reserved": s.get("reserved_bytes.all.peak", 0),
            "cuda_num_alloc_retries": s.get("num_alloc_retries", 0),
            "cuda_num_ooms": s.get("num_ooms", 0),
            "cuda_device_used": total - free, "cuda_device_total": total}


def host_sample(uss: bool = True) -> dict:
    proc = psutil.Process()
    if uss:
        info = proc.memory_full_info()
        return {"rss": info.rss, "uss": info.uss}
    return {"rss": proc.memory_info().rss, "uss": NAN}


def live_tensor_bytes(device_type: str = "cpu") -> int:
    """Bytes of every distinct tensor storage on `device_type` that Python objects still reach (a gc walk): the CPU's
    counterpart of CUDA's allocated bytes. RSS cannot serve as the leak baseline on the CPU: the C allocator hands
    freed memory to new tensors, so a kept 8 MB tensor may not raise RSS at all (seen in CI)."""
    seen, total = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:  # a dead weak proxy raises on any attribute; fake and functional tensors (kept by torch.compile's
                # caches) have no storage or no data pointer
                if (not isinstance(obj, torch.Tensor) or obj.device.type != device_type or obj.is_meta
                        or is_fake(obj)):
                    continue
                storage = obj.untyped_storage()
                pointer, nbytes = storage.data_ptr(), storage.nbytes()
            except (ReferenceError, RuntimeError, NotImplementedError):
                continue
            if pointer and pointer not in seen:
                seen.add(pointer)
                total += nbytes
    return total


def settle(device):
    """What a baseline is taken after: garbage collected and, on CUDA, every kernel finished."""
    gc.collect()
    if is_cuda(device):
        torch.cuda.synchronize(device)


def empty_cache(device) -> bool:
    """torch.cuda.empty_cache(): hands the allocator's unused cached blocks back to the driver. Returns whether
    anything could be done: on CPU nothing (the host allocator is glibc malloc, not torch's caching allocator)."""
    if is_cuda(device):
        torch.cuda.empty_cache()
        return True
    return False


def allocator_config(expandable_segments: bool) -> str:
    """The PYTORCH_CUDA_ALLOC_CONF value for the policy (any other options already set are kept)."""
    parts = [p for p in os.environ.get(ALLOC_CONF_ENV, "").split(",") if p and not p.startswith("expandable_segments")]
    return ",".join(parts + [f"expandable_segments:{'True' if expandable_segments else 'False'}"])


def apply_allocator_config(expandable_segments: bool | None) -> str:
    """Sets PYTORCH_CUDA_ALLOC_CONF for this process. Honoured only when CUDA has not initialised yet, so in
    practice only in a fresh process (qwenlab stress --fresh-process passes it to each child). Returns one of
    'default' (None asked), 'set', 'already' (the running allocator has it), 'not honoured (CUDA already
    initialised)', 'n/a (no CUDA)'."""
    if expandable_segments is None:
        return "default"
    if not torch.cuda.is_available():
        return "n/a (no CUDA)"
    want = allocator_config(expandable_segments)
    if torch.cuda.is_initialized():
        return "already" if os.environ.get(ALLOC_CONF_ENV, "") == want else "not honoured (CUDA already initialised)"
    os.environ[ALLOC_CONF_ENV] = want
    return "set"


@contextmanager
def record_history(path, max_entries: int = 20_000, stacks: str = "python", device=None):
    """Records the last max_entries CUDA allocator events with their stacks ('python' keeps the pickle small and
    the dump fast; 'all' adds C++ frames) while the block runs, then writes a snapshot pickle to open at
    https://pytorch.org/memory_viz. On CPU it records nothing and says so. Yields the path (None on CPU)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        print("record_history: CUDA is not available, no allocator history to record (CPU run)")
        yield None
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks=stacks)
    try:
        yield path
    finally:
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)

