"""Where the time of a tensor-core NVFP4 layer GEMV goes, program by program (CUDA; prints its numbers, asserts none).

The graph engine's decode step on an NVFP4 model is captured with the probe on (the tile key PROBE: each program of
qwenlab.quant.pair_nvfp4's GEMV writes its SM and the global timer and cycle counter at its start, after the PDL
wait, after staging x, after its loop along K and at its end, each as it reads them, so it holds no register for
them: compiled for sm_90, gate/up keeps its 128 registers a thread) and replayed once after warm-up replays. Per kind of
GEMV probed (by default gate/up, the one on tensor cores; --set PAIRS=1 puts every kind there), over its 36
launches, medians of:

    ready       the first program's return from the PDL wait, from the first program's start: from then on the
                kernel's input is there (the wait returns once the kernel before has finished)
    span        the last program's end, from `ready`: the kernel's time on the step's critical path
    late        programs that started after `ready` + 1 us (a later wave: no SM had room for them before)
    wait        each program's start to its return from the wait (0 once input is ready)
    stage       the return from the wait to x staged (its loads, the norm, the store to shared memory)
    loop        x staged to the loop's end (the weights' loads in flight one step ahead)
    tail        the loop's end to the program's end (the sums over lanes and warps, the epilogue, the store)

and when, from `ready`, the programs pass each point (10th, 50th, 90th percentile, last). Times are the cycle
counter's (converted at the rate the global timer gives) where they lie within one program, the global timer's
across programs. The probe itself costs a few instructions and stores a program: the step is timed with and
without it. --csv writes every record of the probed replay.

    python bench/nvfp4_probe.py --model /tmp/q4b [--kinds glu] [--set PAIRS=1] [--try glu:KEY=V,...] [--csv F]
"""
import argparse
import statistics
import sys

import torch
from decode_profile import replay_ms

from qwenlab.bench.measure import device_facts
from qwenlab.generation.engine import Engine
from qwenlab.model.loader import load
from qwenlab.model.tiny import resolve_model_dir
from qwenlab.quant import triton_nvfp4

SLOTS = 16  # int64 a record (pair_nvfp4.PROBE_SLOTS)


def captured(model, context: int):
    engine = Engine(model, "graph")
    cache = engine.new_cache(context)
    model(torch.arange(128, device=model.device), cache=cache)
    step, _ = engine.captured(cache)
    cache.crop(128)
    return step


def records(buffer: torch.Tensor) -> list[list[int]]:
    """The records written (grid size nonzero), in the order of their places in the buffer."""
    rows = buffer.view(-1, SLOTS)
    return rows[rows[:, 2] > 0].tolist()


def launches(rows: list[list[int]]) -> list[list[list[int]]]:
    """The records split by launch: each launch writes one record a program, in a run of its own."""
    out, at = [], 0
    while at < len(rows):
        n = rows[at][2] * rows[at][3]
        out.append(rows[at:at + n])
        at += n
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summary(launch: list[list[int]]) -> dict:
    rate = statistics.median((r[14] - r[10]) / max(1, r[9] - r[5]) for r in launch)  # cycles per ns
    first = min(r[5] for r in launch)
    ready = min(r[6] for r in launch)
    ns = lambda r, a, b: (r[10 + b] - r[10 + a]) / rate  # noqa: E731 - cycles between points a and b, in ns
    out = {"programs": len(launch), "grid": f"{launch[0][2]}x{launch[0][3]}", "GHz": rate,
           "SMs": len({r[4] for r in launch}), "ready": ready - first,
           "span": max(r[9] for r in launch) - ready, "late": sum(r[5] > ready + 1000 for r in launch),
           **{name: statistics.median(ns(r, i, i + 1) for r in launch)
              for i, name in enumerate(("wait", "stage", "loop", "tail"))}}
    for name, point in (("staged", 2), ("looped", 3), ("ended", 4)):
        # the point's time from `ready`: the program's own return from the wait (global timer) plus cycles since
        times = [r[6] - ready + ns(r, 1, point) for r in launch]
        out[name] = [pct(times, q) for q in (0.1, 0.5, 0.9)] + [max(times)]
    return out


def report(rows: list[list[int]]) -> None:
    by_grid = {}
    for launch in launches(rows):
        by_grid.setdefault(f"{launch[0][2]}x{launch[0][3]}", []).append(summary(launch))
    for grid, items in by_grid.items():
        med = lambda key: statistics.median(i[key] for i in items)  # noqa: E731
        print(f"grid {grid} ({len(items)} launches, {items[0]['programs']} programs on {med('SMs'):.0f} SMs, "
              f"cycle counter {med('GHz'):.2f} GHz), medians over launches, us:")
        print(f"  ready {med('ready') / 1e3:.2f}  span {med('span') / 1e3:.2f}  late programs {med('late'):.0f}  | a "
              f"program: wait {med('wait') / 1e3:.2f}  stage {med('stage') / 1e3:.2f}  loop {med('loop') / 1e3:.2f}"
              f"  tail {med('tail') / 1e3:.2f}")
        for name in ("staged", "looped", "ended"):
            qs = [statistics.median(i[name][j] for i in items) / 1e3 for j in range(4)]
            print(f"  {name:<7} from ready: p10 {qs[0]:.2f}  p50 {qs[1]:.2f}  p90 {qs[2]:.2f}  last {qs[3]:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--kinds", default="glu", help="the kinds probed: norm (q/k/v), residual (o, down), glu")
    ap.add_argument("--set", default=[], action="append", help="KEY=V: an integer set on every default tile first")
    ap.add_argument("--try", dest="tries", default=[], action="append", help="KIND:KEY=V,...: keys over a kind's tile")
    ap.add_argument("--csv", default=None, help="write the probed replay's records here")
    args = ap.parse_args(argv)
    for item in args.set:
        key, value = item.split("=")
        for config in triton_nvfp4.LAYER_CONFIGS.values():
            config[key] = int(value)
    for item in args.tries:
        kind, keys = item.split(":")
        triton_nvfp4.LAYER_CONFIGS[kind].update({k: int(v) for k, v in (p.split("=") for p in keys.split(","))})
    model = load(resolve_model_dir(args.model), "bfloat16", "cuda", "nvfp4").model
    print(device_facts(model.device))
    print("tiles:", triton_nvfp4.LAYER_CONFIGS)
    plain = replay_ms(captured(model, args.context))
    for kind in args.kinds.split(","):
        triton_nvfp4.LAYER_CONFIGS[kind]["PROBE"] = 1
    step = captured(model, args.context)
    probed = replay_ms(step)
    print(f"decode step {plain:.3f} ms, with the probe {probed:.3f} ms")
    buffer = next(iter(triton_nvfp4.PROBES.values()))[0]
    with torch.inference_mode():  # the buffer was made under it, in the capture
        buffer.zero_()
    step.graph.replay()
    torch.cuda.synchronize()
    rows = records(buffer)
    print(f"{len(rows)} program records in one replay")
    report(rows)
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("pid0,pid1,grid0,grid1,sm,gt_start,gt_wait,gt_staged,gt_looped,gt_end,"
                    "clk_start,clk_wait,clk_staged,clk_looped,clk_end\n")
            for r in rows:
                f.write(",".join(map(str, r[:15])) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
