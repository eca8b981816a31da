"""What a benchmark needs besides the thing it times: the device and its versions, the copy bandwidth that sets
the decode floor, synchronised timers, peak memory, and the bytes a model's weights occupy."""
import subprocess
import time
from contextlib import contextmanager

import torch

from qwenlab.versions import package_versions

BENCH_PACKAGES = ("torch", "transformers", "triton", "safetensors", "qwenlab")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """-> (result, seconds), the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


def device_facts(device) -> dict:
    device = torch.device(device)
    facts = {"device": str(device), **package_versions(BENCH_PACKAGES, missing="not installed")}
    if device.type == "cuda":
        facts["name"] = torch.cuda.get_device_name(device)
        facts["cuda"] = torch.version.cuda
        facts["driver"] = _nvidia_smi("driver_version")
    else:
        facts["name"] = "cpu"
        facts["threads"] = torch.get_num_threads()
    return facts


def _nvidia_smi(field: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def copy_bandwidth(device, nbytes: int = 1 << 30, repeat: int = 10) -> float:
    """Device-to-device copy, bytes read + bytes written per second (median of `repeat`): the decode floor's rate."""
    device = torch.device(device)
    n = nbytes // 2 if device.type == "cuda" else nbytes // 16
    buffers = torch.randn(2, n, dtype=torch.bfloat16, device=device)
    buffers[1].copy_(buffers[0])
    times = sorted(timed(lambda: buffers[1].copy_(buffers[0]), device)[1] for _ in range(repeat))
    return 2 * n * 2 / times[len(times) // 2]


def weight_bytes(model) -> int:
    """Bytes of the distinct storages behind the parameters and buffers (a tied head counted once)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def read_bytes_per_token(model) -> int:
    """Weight bytes one batch-1 decode step reads: every weight, except an input embedding table not tied to the
    head (a step reads one row of it), and for a MoE model only num_experts_per_tok / num_experts of the experts'
    (each layer runs the k experts its token picked)."""
    total, cfg = weight_bytes(model), model.config
    # a tied head shares the embedding; NVFP4 linears keep their packed weights and scales as buffers
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    head = {t.untyped_storage().data_ptr() for name, t in params.items() if name.startswith("lm_head.")}
    embed = [t for name, t in params.items() if name.endswith("embed_tokens.weight")]
    if embed and embed[0].untyped_storage().data_ptr() not in head:
        total -= embed[0].untyped_storage().nbytes() - embed[0][0].nbytes
    if cfg.is_moe:
        experts = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                   for name, t in params.items() if ".experts." in name}
        expert_bytes = sum(experts.values())
        total -= expert_bytes - expert_bytes * cfg.num_experts_per_tok // cfg.num_experts
    return total


@contextmanager
def peak_allocated(device, out: dict, key: str = "peak_allocated_bytes"):
    """Records the CUDA allocator's peak allocated bytes over the block into out[key] (NaN on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield out
    finally:
        if device.type == "cuda":
            sync(device)
            out[key] = torch.cuda.max_memory_allocated(device)
        else:
            out[key] = float("nan")


def read_files(paths) -> int:
    """Reads every byte once so that both loaders start from the same (warm) page cache. -> bytes read."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 26):
                total += len(chunk)
    return total
