"""Is a prefill bound by the GPU or by the host? For the dense model and, with --quant nvfp4, the same model
quantized at load, one eager prefill of --tokens tokens (what `qwenlab bench` times) is measured three ways, side by
side in one process, repeated: the wall time with a synchronize, the host's time to issue every kernel (until the
forward returns, before the synchronize), and the GPU's time between two events around it; the caching allocator's
device allocations, frees and retries during those runs; then, under the torch profiler, the kernels' own time (the
GPU's busy time: far under the wall time, the GPU waits on Python), with --gaps the GPU's idle time before each
kind of kernel, and the host's operators by self time. With --quant, the quantized model also with its unfused projections multiplied one
by one (--one-by-one), or after gc.freeze() (--gc-freeze). --python N: the host's Python functions of one prefill
by their own time (cProfile, the N largest). A development tool: it prints numbers and asserts none.

    python bench/prefill_profile.py --model /tmp/q4b --device cuda --dtype bfloat16 [--quant nvfp4] [--tokens 2048]
        [--python 25] [--gaps]
"""
import argparse
import cProfile
import gc
import io
import pstats
import statistics
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from qwenlab.bench.measure import device_facts
from qwenlab.generation.engine import Engine
from qwenlab.model import projection
from qwenlab.model.loader import load
from qwenlab.model.tiny import resolve_model_dir


def one_prefill(model, ids, cache) -> tuple[float, float, float]:
    """(wall, host issue, GPU) seconds of one prefill."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    start.record()
    model(ids, cache=cache, last_only=True)
    end.record()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return t2 - t0, t1 - t0, start.elapsed_time(end) / 1e3


@torch.inference_mode()
def measure(model, tokens: int, repeats: int, label: str, python: int = 0, gaps: bool = False) -> None:
    ids = torch.randint(0, model.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(1)).to(
        model.device)
    engine = Engine(model, "eager")
    for _ in range(2):
        one_prefill(model, ids, engine.new_cache(tokens))
    collections, started = [], []  # (generation, seconds) of each cyclic garbage collection during the timed runs

    def timed_gc(phase, info):
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            collections.append((info["generation"], time.perf_counter() - started.pop()))
    gc.callbacks.append(timed_gc)
    stats = torch.cuda.memory_stats(model.device)
    try:
        runs = [one_prefill(model, ids, engine.new_cache(tokens)) for _ in range(repeats)]
    finally:
        gc.callbacks.remove(timed_gc)
    after = torch.cuda.memory_stats(model.device)
    allocator = {key: after.get(key, 0) - stats.get(key, 0) for key in
                 ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")}
    wall, host, gpu = (sorted(r[i] for r in runs) for i in range(3))
    print(f"{label}: {tokens}-token prefill over {repeats} runs (ms, min / median / max)")
    for name, xs in (("wall", wall), ("host issue", host), ("GPU", gpu)):
        print(f"  {name:<10} {xs[0] * 1e3:8.1f} {statistics.median(xs) * 1e3:8.1f} {xs[-1] * 1e3:8.1f}")
    print(f"  tok/s at the median wall: {tokens / statistics.median(wall):,.0f}; host issue / GPU at the medians: "
          f"{statistics.median(host) / statistics.median(gpu):.2f} (the host also waits once CUDA's launch queue "
          f"is full, so near 1.00 says little; the kernels' own time below does)")
    print(f"  garbage collections during the runs: {len(collections)} (generation 2: "
          f"{sum(g == 2 for g, _ in collections)}), {sum(s for _, s in collections) * 1e3:.1f} ms in all")
    print("  the caching allocator during the runs: " + ", ".join(f"{k} {v}" for k, v in allocator.items()))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(ids, cache=engine.new_cache(tokens), last_only=True)
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e3
    print(f"  kernels: {sum(e.count for e in kernels)}, their time {busy:.1f} ms (under the profiler); the largest:")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:6]:
        print(f"    {e.self_device_time_total / 1e3:7.2f} ms {e.count:5d}x  {e.key[:90]}")
    if gaps:
        print_gaps(prof)
    cpu = [e for e in events if e.device_type != DeviceType.CUDA]
    print("  host operators by self time (ms, calls): " + ", ".join(
        f"{e.key} {e.self_cpu_time_total / 1e3:.1f} ({e.count})"
        for e in sorted(cpu, key=lambda e: -e.self_cpu_time_total)[:8]))
    if python:
        cache = engine.new_cache(tokens)
        torch.cuda.synchronize()
        host = cProfile.Profile()
        host.enable()
        model(ids, cache=cache, last_only=True)
        torch.cuda.synchronize()
        host.disable()
        text = io.StringIO()
        pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(python)
        print(f"  the host's Python functions in one prefill, by own time (cProfile):\n{text.getvalue()}")


def print_gaps(prof) -> None:
    """Where the GPU waited, under the profiler: the idle time before each kernel (its start minus the previous
    kernel's end), summed by the kernel that waited."""
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA and e.time_range.elapsed_us() > 0),
                     key=lambda e: e.time_range.start)
    idle, count = {}, {}
    for before, kernel in zip(kernels, kernels[1:]):
        gap = max(kernel.time_range.start - before.time_range.end, 0)
        name = kernel.name[:60]
        idle[name] = idle.get(name, 0) + gap
        count[name] = count.get(name, 0) + 1
    total = sum(idle.values())
    print(f"  the GPU idle between kernels: {total / 1e3:.1f} ms in all; before which kernels (ms, kernels):")
    for name, us in sorted(idle.items(), key=lambda kv: -kv[1])[:8]:
        print(f"    {us / 1e3:7.2f} ms {count[name]:5d}x  {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quant", default=None)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--one-by-one", action="store_true", help="also the quantized model's q/k/v and gate/up one by one")
    p.add_argument("--gc-freeze", action="store_true", help="also after gc.freeze() (the collector skips the model)")
    p.add_argument("--python", type=int, default=0, help="print the N Python functions of most own time (cProfile)")
    p.add_argument("--gaps", action="store_true", help="where the GPU waited: idle time by the kernel after it")
    args = p.parse_args()
    print(device_facts(torch.device(args.device)))
    model_dir = resolve_model_dir(args.model)
    for quant in [None] + ([args.quant] if args.quant else []):
        model = load(str(model_dir), dtype=args.dtype, device=args.device, quant=quant).model
        measure(model, args.tokens, args.repeats, quant or args.dtype, args.python, args.gaps)
        if quant and args.gc_freeze:  # Python's cyclic collector told to skip every object that exists now
            gc.collect()
            gc.freeze()
            try:
                measure(model, args.tokens, args.repeats, f"{quant}, after gc.freeze()")
            finally:
                gc.unfreeze()
        if quant and args.one_by_one:  # the same with each projection multiplied on its own (before multiply_parts)
            real = projection.multiply_parts
            projection.multiply_parts = lambda linears, x: tuple(linear(x) for linear in linears)
            try:
                measure(model, args.tokens, args.repeats, f"{quant}, q/k/v and gate/up one by one")
            finally:
                projection.multiply_parts = real
        del model
        torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
