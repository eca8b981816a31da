"""How close can a decode step's chain of kernels come to the copy bandwidth, whatever the kernels compute? (CUDA)

Prints its numbers, asserts none. A Triton kernel that only reads a buffer (16-byte loads, every load of a program in
flight at once, an int32 sum written per program so nothing is skipped) stands in for each GEMV of a decode step:
one buffer per projection per layer, of the bytes that projection's weights take (Qwen3-4B: NVFP4 or bf16), 36
layers, in one CUDA graph, replayed. The same bytes are read in four arrangements:

    kernel per projection   q/k/v, o, gate/up, down: four kernels a layer, as the engine's layer runs its GEMVs
      + PDL, wait first     each launched with PDL, waiting for the kernel before it before reading (a GEMV's x)
      + PDL, wait last      each reading everything, then waiting (what a kernel could do whose inputs were all
                            known up front: the most a kernel boundary can be hidden)
    kernel per layer        the layer's four buffers as one kernel (a persistent layer kernel would read that way)
    one kernel              every layer's bytes in one launch: the bandwidth a step's bytes can reach at all

against the copy bandwidth (qwenlab.bench.measure.copy_bandwidth). Then, under the torch profiler, the four-kernel
arrangements split by projection as bench/decode_profile.py --timeline splits the decode step: each kernel's end
minus the end of the kernel before it, averaged by its place in the layer. The NVFP4 GEMVs' own shares are in
doc/performance.md ("x staged in one pass, and the step's critical path by kernel"): 43.2 us a layer.

    python bench/stream_chain.py [--layers 36] [--replays 20] [--rounds 5] [--dtype nvfp4|bf16|both]
        [--tile BLOCK,ITERS,WARPS]
"""
import argparse
import statistics

import torch
import triton
import triton.language as tl
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from qwenlab.bench.measure import copy_bandwidth, device_facts

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

# Qwen3-4B's projections per layer: (rows, K) of q/k/v, o, gate/up, down
SHAPES = [(6144, 2560), (2560, 4096), (19456, 2560), (2560, 9728)]
BYTES_PER_WEIGHT = {"nvfp4": 0.5625, "bf16": 2.0}  # NVFP4: a nibble and one E4M3 scale per 16
TILE = {"block": 1024, "iters": 4, "warps": 4}  # int32 a step, steps a program (all in flight), warps (--tile)


@triton.jit
def _read_kernel(X, OUT, n, PDL: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Sums its BLOCK x ITERS int32 of X (every load issued before any is summed). PDL 1: launch the next kernel,
    then wait for the one before; 2: launch the next, read, then wait; 0: no PDL."""
    if PDL > 0:
        gdc_launch_dependents()
    if PDL == 1:
        gdc_wait()
    start = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros([BLOCK], tl.int32)
    for i in tl.static_range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(X + offs, mask=offs < n, other=0, eviction_policy="evict_first")
    if PDL == 2:
        gdc_wait()
    tl.store(OUT + tl.program_id(0), tl.sum(acc, 0))


def read(buffer: torch.Tensor, out: torch.Tensor, pdl: int) -> None:
    n = buffer.numel()
    grid = (triton.cdiv(n, TILE["block"] * TILE["iters"]),)
    kwargs = {"launch_pdl": True} if pdl else {}
    _read_kernel[grid](buffer, out, n, PDL=pdl, BLOCK=TILE["block"], ITERS=TILE["iters"], num_warps=TILE["warps"],
                       **kwargs)


def chains(layers: int, kind: str, device) -> dict:
    """name -> (callable that issues the chain, the bytes it reads)."""
    sizes = [int(r * k * BYTES_PER_WEIGHT[kind]) // 16 * 16 for r, k in SHAPES]
    per_layer = sum(sizes)
    flat = torch.zeros(layers * per_layer // 4, dtype=torch.int32, device=device)
    parts, start = [], 0
    for _ in range(layers):
        for size in sizes:
            parts.append(flat[start:start + size // 4])
            start += size // 4
    whole_layers = [flat[i * per_layer // 4:(i + 1) * per_layer // 4] for i in range(layers)]
    out = torch.empty(triton.cdiv(flat.numel(), TILE["block"] * TILE["iters"]), dtype=torch.int32, device=device)
    found = {"kernel per projection": lambda: [read(p, out, 0) for p in parts],
             "kernel per layer": lambda: [read(p, out, 0) for p in whole_layers],
             "one kernel": lambda: read(flat, out, 0)}
    if gdc_wait is not None and torch.cuda.get_device_capability(device) >= (9, 0):
        found["  + PDL, wait first"] = lambda: [read(p, out, 1) for p in parts]
        found["  + PDL, wait last"] = lambda: [read(p, out, 2) for p in parts]
    order = ["kernel per projection", "  + PDL, wait first", "  + PDL, wait last", "kernel per layer", "one kernel"]
    return {name: (found[name], layers * per_layer) for name in order if name in found}


def graph_of(issue) -> torch.cuda.CUDAGraph:
    issue()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        issue()
    return graph


def replay_seconds(graph, replays: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / replays


PROJECTIONS = ["q/k/v", "o", "gate/up", "down"]


def by_projection(graph, replays: int) -> list[float]:
    """The mean share (us) of each projection's kernel in the graph's chain: its end minus the previous kernel's end,
    the first kernel of each replay left out."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    per_replay = len(kernels) // replays
    shares = [[] for _ in PROJECTIONS]
    for r in range(replays):
        step = kernels[r * per_replay:(r + 1) * per_replay]
        for i in range(1, len(step)):
            shares[i % len(PROJECTIONS)].append(step[i].time_range.end - step[i - 1].time_range.end)
    return [statistics.mean(s) for s in shares]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", choices=["nvfp4", "bf16", "both"], default="both")
    p.add_argument("--tile", default="1024,4,4", help="the read kernel's int32 a step, steps a program, warps")
    args = p.parse_args()
    TILE.update(zip(("block", "iters", "warps"), map(int, args.tile.split(","))))
    device = torch.device("cuda")
    print(device_facts(device), "| triton", triton.__version__)
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; {args.layers} layers; read kernel {TILE['block']} int32 x "
          f"{TILE['iters']} steps a program, {TILE['warps']} warps")
    for kind in (["nvfp4", "bf16"] if args.dtype == "both" else [args.dtype]):
        found = chains(args.layers, kind, device)
        graphs = {name: graph_of(issue) for name, (issue, _) in found.items()}
        times = {name: [] for name in found}
        for _ in range(args.rounds):  # the chains interleaved, so that a drift of the clocks hits them all
            for name, graph in graphs.items():
                times[name].append(replay_seconds(graph, args.replays))
        total = next(iter(found.values()))[1]
        layer = total / args.layers
        print(f"\n{kind}: {layer / 1e6:.1f} MB a layer, its floor {layer / bandwidth * 1e6:.1f} us; median of "
              f"{args.rounds} rounds of {args.replays} replays")
        print(f"  {'arrangement':<24} {'us a layer':>10} {'% of copy bandwidth':>20}")
        for name, seconds in times.items():
            s = statistics.median(seconds)
            print(f"  {name:<24} {s / args.layers * 1e6:10.2f} {100 * total / s / bandwidth:19.1f}%")
        print("  by projection (us a layer: each kernel's end minus the previous kernel's end, under the profiler)")
        print(f"  {'arrangement':<24}" + "".join(f"{name:>9}" for name in PROJECTIONS))
        for name in [n for n in graphs if n.strip().startswith(("kernel per projection", "+ PDL"))]:
            shares = by_projection(graphs[name], replays=3)
            print(f"  {name:<24}" + "".join(f"{shares[i]:9.2f}" for i in range(len(PROJECTIONS))))
        del graphs, found
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
