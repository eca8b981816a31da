"""Where a decode step's time goes: the graph engine's captured one-token step, built each way the engine can (fused:
decoder layers as qwenlab's fused kernels, the default, with programmatic dependent launch where the GPU has it;
fused-nopdl: the same without PDL, as QWENLAB_PDL=0; fused-pdl-MODE: PDL with another trigger placement, as
QWENLAB_PDL=MODE; fused-nine: NVFP4 layers in the nine kernels the engine runs with another NVFP4 GEMV than the
wide one, the wide GEMV kept; layer: one decoder layer compiled by torch.compile for all; step: the whole step
compiled; none),
timed by replays side by side in one process, also as greedy decoding replays them (each step's choice copied to the
host behind it), with its kernel launches per step and the first mode's kernels by the torch profiler. A development
tool beside `qwenlab bench`; it prints numbers and asserts none.

    python bench/decode_profile.py --model /tmp/q4b --device cuda --dtype bfloat16 [--quant nvfp4] [--context 512]
        [--modes fused,layer] [--timeline]
"""
import argparse
import os
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from qwenlab.bench.measure import copy_bandwidth, device_facts, weight_bytes
from qwenlab.generation.engine import COMPILES, Engine, layer_compiled
from qwenlab.generation.kernels import choose_kernels
from qwenlab.model.loader import load
from qwenlab.model.tiny import resolve_model_dir


def replay_ms(step, n: int = 100) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        step.graph.replay()
    start.record()
    for _ in range(n):
        step.graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def chained_ms(step, n: int = 100, side: bool = False) -> float:
    """Replays as greedy decoding runs them (qwenlab.generation.decode.ChainedGreedy): each step on the token the
    one before chose, its choice copied into pinned host memory behind it and waited for one step late. side: the
    copy on another stream, after an event (timing only: nothing then orders it before the next step's write)."""
    host = torch.empty(n + 5, dtype=torch.long, pin_memory=True)
    stream = torch.cuda.current_stream()
    copier = torch.cuda.Stream() if side else stream
    events = []
    for i in range(n + 5):
        if i == 5:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        step.graph.replay()
        if side:
            copier.wait_stream(stream)
        with torch.cuda.stream(copier):
            host[i:i + 1].copy_(step.token.view(1), non_blocking=True)
            events.append(torch.cuda.Event())
            events[-1].record(copier)
        if i:
            events[i - 1].synchronize()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / n


def profiled(step, replays: int = 10):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            step.graph.replay()
        torch.cuda.synchronize()
    launches = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA) / replays
    return prof, launches


def timeline(prof, replays: int) -> None:
    """Each kernel's share of the step's critical path, from the profiler's kernel timestamps: its end minus the end
    of the kernel before it (a kernel launched early by PDL waits inside, so its own duration overstates it), the
    layers' kernels averaged by their place around the attention kernel, the rest by name."""
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    per_step = len(kernels) // replays
    places = {-1: "q/k/v GEMV", 0: "attention", 1: "o GEMV", 2: "gate/up GEMV", 3: "down GEMV"}
    shares, spans, names = {}, {}, {}
    for r in range(replays):
        step = kernels[r * per_step:(r + 1) * per_step]
        attends = [i for i, e in enumerate(step) if "attend" in e.name]
        place = {}
        for a in attends:
            place.update({a + d: label for d, label in places.items() if 0 <= a + d < len(step)})
        for i, e in enumerate(step[1:], 1):
            key = place.get(i, e.name[:40])
            shares.setdefault(key, []).append(e.time_range.end - step[i - 1].time_range.end)
            spans.setdefault(key, []).append(e.time_range.end - e.time_range.start)
            names.setdefault(key, e.name[:30])
    steps_us = sum(sum(v) for v in shares.values()) / replays
    print(f"critical path per step (us, mean of {replays} replays; 'share': end minus the previous kernel's end, "
          f"'span': its own start to end): {steps_us:.1f} us")
    print(f"{'kernel':<42} {'per step':>8} {'share us':>9} {'span us':>8} {'total us':>9}  name")
    for key in sorted(shares, key=lambda k: -sum(shares[k])):
        n = len(shares[key]) / replays
        print(f"{key:<42} {n:>8.0f} {sum(shares[key]) / len(shares[key]):>9.2f} "
              f"{sum(spans[key]) / len(spans[key]):>8.2f} {sum(shares[key]) / replays:>9.1f}  {names[key]}")


def gemv_table(model):
    """cuBLAS (F.linear) against the Triton GEMV on the decode step's projection shapes, weights rotated past L2."""
    from qwenlab.generation.gemv import linear_timings

    cfg, dtype = model.config, model.dtype
    shapes = {"qkv": (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size), "o_proj": (cfg.hidden_size, cfg.q_size),
              "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size), "down": (cfg.hidden_size, cfg.intermediate_size),
              "lm_head": (cfg.vocab_size, cfg.hidden_size)}
    print(f"{'matmul':<8} {'N x K':>14} {'cuBLAS us':>10} {'GB/s':>6} {'Triton us':>10} {'GB/s':>6}")
    for name, (n, k) in shapes.items():
        cublas, triton_us = linear_timings(torch.randn(n, k, dtype=dtype, device=model.device))
        gb = n * k * torch.finfo(dtype).bits / 8 / 1e3
        print(f"{name:<8} {f'{n}x{k}':>14} {cublas:>10.1f} {gb / cublas:>6.0f} {triton_us:>10.1f} "
              f"{gb / triton_us:>6.0f}")


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", default=None, help="nvfp4: quantize at load (as qwenlab bench --quant)")
    ap.add_argument("--context", type=int, default=512, help="static cache length (attention covers all of it)")
    ap.add_argument("--modes", default="fused,layer", help="the engine's modes to capture, in order: fused (its "
                    "default), fused-nopdl (QWENLAB_PDL=0), fused-pdl-MODE (QWENLAB_PDL=MODE: start, after-wait, "
                    "after-loop), fused-nine (NVFP4 layers in nine kernels), or one of its compile modes without the "
                    f"fused layers ({', '.join(COMPILES)})")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--timeline", action="store_true", help="each kernel's share of the first mode's step (its end "
                    "minus the previous kernel's end), by its place in the layer")
    args = ap.parse_args()
    model = load(resolve_model_dir(args.model), args.dtype, args.device, args.quant).model
    bandwidth, wbytes = copy_bandwidth(model.device), weight_bytes(model)
    print(device_facts(model.device))
    print(f"weights {wbytes / 1e9:.3f} GB, copy bandwidth {bandwidth / 1e9:.0f} GB/s, floor "
          f"{wbytes / bandwidth * 1e3:.3f} ms")
    if args.quant is None:
        gemv_table(model)
    table = None  # the first mode's kernels, from the same profile that counted its launches
    for mode in args.modes.split(","):
        fused = mode.startswith("fused")
        engine = Engine(model, "graph", compile="layer" if fused else mode, fused=fused)
        cache = engine.new_cache(args.context)
        model(torch.arange(128, device=model.device), cache=cache)
        asked = os.environ.pop("QWENLAB_PDL", None)
        # read when the engine chooses its kernels: fused its default, fused-nopdl QWENLAB_PDL=0, fused-pdl-MODE
        # QWENLAB_PDL=MODE
        if mode == "fused-nopdl":
            os.environ["QWENLAB_PDL"] = "0"
        elif mode.startswith("fused-pdl-"):
            os.environ["QWENLAB_PDL"] = mode.removeprefix("fused-pdl-")
        if mode == "fused-nine":  # the NVFP4 layers' norms, SiLU and residual adds as their own kernels
            engine.kernels = layer_compiled(choose_kernels(model, engine.timings, True))
            engine.kernels.fused.nvfp4_layer_gemv = None
        try:
            step, _ = engine.captured(cache)
        finally:
            os.environ.pop("QWENLAB_PDL", None)
            if asked is not None:
                os.environ["QWENLAB_PDL"] = asked
        capture = engine.captures[-1]
        layers = engine.kernels.describe()["layers"] or COMPILES[engine.compile]
        timings = []
        for measure in (replay_ms, chained_ms, lambda s: chained_ms(s, side=True)):
            cache.crop(128)  # each from the same 128 cached tokens (a replay moves the device's pos)
            timings.append(measure(step))
        ms, chained, side = timings
        cache.crop(128)
        prof, launches = profiled(step)
        print(f"graph replay, {mode}: {ms:.3f} ms/token ({1e3 / ms:.1f} tok/s, {wbytes / ms / 1e6:.0f} GB/s, "
              f"{100 * wbytes / bandwidth * 1e3 / ms:.1f}% of floor), {launches:.0f} kernels per step; capture "
              f"{capture['seconds']:.1f} s (first call {capture['first_call_s']:.1f} s, "
              f"{capture['graphs_compiled']} graphs compiled); layers: {layers}\n"
              f"  as greedy decoding replays it (each choice copied to the host behind its step, read one step late): "
              f"{chained:.3f} ms/token; with that copy on another stream: {side:.3f}", flush=True)
        if args.timeline and table is None:
            timeline(prof, 10)
        table = table or prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows,
                                                   max_name_column_width=70)
    print(table)


if __name__ == "__main__":
    main()
