"""Does Programmatic Dependent Launch (PDL) make a chain of batch-1 decode GEMVs faster? (CUDA, sm_90+)

Prints its numbers, asserts none. Qwen3-4B's four projections per layer (q/k/v 6144x2560, o 2560x4096, gate/up
19456x2560, down 2560x9728) over 36 layers of random weights (7.3 GB bf16, 2.0 GB NVFP4: far over the L2 cache),
each GEMV reading a slice of the one before's output (o the first 4096 of q/k/v's 6144, gate/up o's 2560, down the
first 9728 of gate/up's 19456, the next layer's q/k/v down's 2560), captured in one CUDA graph and replayed.

    python bench/gemv_pdl.py [--layers 36] [--replays 10] [--rounds 7] [--out FILE.json]

Chains: bf16 cuBLAS (F.linear; the reference), the bf16 Triton GEMV (qwenlab.generation.gemv) and the NVFP4 one
(qwenlab.quant.triton_nvfp4: q/k/v and gate/up as one launch over their separate weights, o and down split-K plus
the finish pass, as the engine runs them), each with PDL off, on (launch_pdl: the next kernel launches while this one
finishes and reads its first weights before griddepcontrol.wait, x after it) and on with the wait first. Each shape's
tile is the autotuner's choice, pinned, so PDL on and off run the same tile; their outputs (all 4 per layer, NaN
before each checked replay) are compared bit for bit. Timed twice: CUDA graph replays, and plain stream launches
queued behind a sleep kernel (the CPU's launch time off the clock); where PDL launches cannot be captured in a graph,
that is printed and the stream rows stand alone. Median of --rounds, the chains interleaved.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

ORDER = ("qkv", "o", "gate_up", "down")
SHAPES = {"qkv": ((4096, 1024, 1024), 2560), "o": ((2560,), 4096), "gate_up": ((9728, 9728), 2560),
          "down": ((2560,), 9728)}  # the parts' rows (one launch over them), K
ON = {"PDL": True, "PDL_WAIT_FIRST": False, "launch_pdl": True}
WAIT_FIRST = {"PDL": True, "PDL_WAIT_FIRST": True, "launch_pdl": True}
VARIANTS = (("PDL off", None), ("PDL on", ON), ("PDL on, wait first", WAIT_FIRST))
STREAM_CHAINS = 2  # chains queued behind one sleep: ~430 launches, within the driver's queue


def nvfp4_bytes(n: int, k: int) -> int:
    return n * k // 2 + n * k // 16 + 4  # packed codes, E4M3 block scales, the tensor scale


def make_weights(layers: int, device):
    """Per layer {name: bf16 [N, K]} and {name: [(packed, block_scale, tensor_scale) per part]} (the NVFP4 parts
    quantized from the bf16 rows). Scaled by 1/sqrt(K), so that x keeps its size along the chain."""
    from qwenlab.quant import codec

    bf16, nvfp4 = [], []
    for _ in range(layers):
        lw, lq = {}, {}
        for name, (ns, k) in SHAPES.items():
            w = torch.randn(sum(ns), k, device=device, dtype=torch.bfloat16) / math.sqrt(k)
            lw[name], lq[name], row = w, [], 0
            for n in ns:
                q = codec.quantize(w[row:row + n])
                lq[name].append((q.packed, q.block_scale, q.tensor_scale))
                row += n
        bf16.append(lw)
        nvfp4.append(lq)
    return bf16, nvfp4


def tune(x0, bf16, nvfp4):
    """The autotuner's tile per shape (production path, PDL off), once: {name: triton.Config} for the bf16 GEMV
    and {name: config dict} for gemv_with_config."""
    from qwenlab.generation import gemv as g
    from qwenlab.quant import triton_nvfp4 as kernels

    bf16_cfg, fp4_cfg = {}, {}
    for name in ORDER:
        w = bf16[0][name]
        g.gemv(x0.new_ones(w.shape[1]), w)
        bf16_cfg[name] = g._gemv_kernel.best_config
        kernels._gemv(x0.new_ones(w.shape[1]), nvfp4[0][name], None, "gemv_pdl")
        c = kernels._gemv_kernel.best_config
        fp4_cfg[name] = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
    torch.cuda.synchronize()
    return bf16_cfg, fp4_cfg


def cublas_chain(bf16, x0):
    def run():
        x, outs = x0, []
        for lw in bf16:
            for name in ORDER:
                w = lw[name]
                x = F.linear(x[:w.shape[1]], w)
                outs.append(x)
        return outs
    return run


def triton_bf16_chain(bf16, x0, configs, extra):
    from qwenlab.generation import gemv as g

    outs = [torch.empty(lw[name].shape[0], dtype=x0.dtype, device=x0.device) for lw in bf16 for name in ORDER]
    extra = extra or {}

    def run():
        x, i = x0, 0
        for lw in bf16:
            for name in ORDER:
                w, y, c = lw[name], outs[i], configs[name]
                n, k = w.shape
                g._gemv_kernel.fn[(triton.cdiv(n, c.kwargs["BLOCK_N"]),)](
                    x[:k], w, y, y, n, k, w.stride(0), HAS_BIAS=False, num_warps=c.num_warps,
                    num_stages=c.num_stages, **c.kwargs, **extra)
                x, i = y, i + 1
        return outs
    return run


def nvfp4_chain(nvfp4, x0, configs, extra):
    from qwenlab.quant import triton_nvfp4 as kernels

    def run():
        x, outs = x0, []
        for lq in nvfp4:
            for name in ORDER:
                parts = lq[name]
                x = kernels.gemv_with_config(x[:parts[0][0].shape[1] * 2], parts, {**configs[name], **(extra or {})})
                outs.append(x)
        return outs
    return run


def capture(run):
    """(graph, its outputs) after an eager warm-up (every kernel compiled), or (None, the error)."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            outs = run()
        torch.cuda.synchronize()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - reported: PDL edges need CUDA 12.3+ in graphs
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001
            pass
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return graph, outs


def same_bits(outs, ref) -> bool:
    return all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(outs, ref, strict=True))


def graph_outputs(graph, outs):
    """The graph's outputs after one replay, NaN before it (an output the replay did not write stays NaN)."""
    for t in outs:
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    return outs


def sleep_rate() -> float:
    """torch.cuda._sleep cycles per microsecond on this GPU."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    end.synchronize()
    return 20_000_000 / (start.elapsed_time(end) * 1e3)


def time_graph(graph, replays: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def time_stream(run, chains: int, sleep_cycles: int) -> tuple[float, bool]:
    """us per chain of plain launches, queued behind a sleep; True where the sleep ended before the last launch was
    queued (the GPU may have waited for the CPU: the time is then an upper bound)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(sleep_cycles)
    start.record()
    for _ in range(chains):
        run()
    end.record()
    starved = start.query()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / chains, starved


def tile_name(c) -> str:
    if isinstance(c, dict):
        return (f"{c['BLOCK_N']}x{c['GROUPS']} w{c['num_warps']}{' x_vec' if c['X_VEC'] else ''}"
                f"{' flat' if c['FLAT'] else ''}")
    return f"{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']} w{c.num_warps} s{c.num_stages}"


def pdl_kernels(jit) -> tuple[int, int]:
    """(compiled variants launched with launch_pdl, those of them whose PTX has griddepcontrol.wait)."""
    launched = waiting = 0
    for cache in jit.device_caches.values():
        for kernel in cache[0].values():
            kernel = kernel.result() if hasattr(kernel, "result") else kernel
            if getattr(kernel.metadata, "launch_pdl", False):
                launched += 1
                waiting += "griddepcontrol.wait" in kernel.asm.get("ptx", "")
    return launched, waiting


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=36, help="decoder layers in the chain (default 36)")
    parser.add_argument("--replays", type=int, default=10, help="graph replays per timing")
    parser.add_argument("--rounds", type=int, default=7, help="timings per chain, interleaved; the median is shown")
    parser.add_argument("--out", help="write every number to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemv_pdl: needs a CUDA GPU (Hopper or newer: PDL is sm_90+); none is visible to torch "
              f"{torch.__version__}", file=sys.stderr)
        return 2
    if torch.cuda.get_device_capability() < (9, 0):
        major, minor = torch.cuda.get_device_capability()
        print(f"gemv_pdl: PDL needs compute capability 9.0 or newer, {torch.cuda.get_device_name()} is "
              f"{major}.{minor}", file=sys.stderr)
        return 2
    from qwenlab.generation import gemv as g
    from qwenlab.quant import triton_nvfp4 as kernels

    if g.gdc_wait is None or kernels.gdc_wait is None:
        print(f"gemv_pdl: Triton {triton.__version__} has no triton.language.extra.cuda.gdc_wait (PDL needs Triton "
              "3.4 or newer)", file=sys.stderr)
        return 2
    asked = os.environ.get("QWENLAB_NVFP4_GEMV", "wide")
    if asked != "fma":
        print(f"note: QWENLAB_NVFP4_GEMV={asked} set aside: this bench times the Triton FMA NVFP4 GEMV, the one with "
              "a PDL switch")
    os.environ["QWENLAB_NVFP4_GEMV"] = "fma"  # make_weights tunes the FMA GEMV through the default path
    from nvfp4_kernels import open_cuda

    started = time.perf_counter()
    device, facts, copy_bw = open_cuda("gemv_pdl")
    torch.manual_seed(0)
    bf16, nvfp4 = make_weights(args.layers, device)
    x0 = torch.randn(SHAPES["qkv"][1], device=device, dtype=torch.bfloat16)
    layer_bytes = {"bf16": sum(2 * sum(ns) * k for ns, k in SHAPES.values()),
                   "nvfp4": sum(nvfp4_bytes(n, k) for ns, k in SHAPES.values() for n in ns)}
    print(f"{args.layers} layers x ({', '.join(f'{n} {sum(ns)}x{k}' for n, (ns, k) in SHAPES.items())}): weights "
          f"{args.layers * layer_bytes['bf16'] / 1e9:.2f} GB bf16, {args.layers * layer_bytes['nvfp4'] / 1e9:.2f} GB "
          f"NVFP4 (made in {time.perf_counter() - started:.0f} s)", flush=True)
    t0 = time.perf_counter()
    bf16_cfg, fp4_cfg = tune(x0, bf16, nvfp4)
    splits = {n: kernels.gemv_split(ns[0], k) if len(ns) == 1 else 1 for n, (ns, k) in SHAPES.items()}
    print(f"tiles (the autotuner's choice, pinned; {time.perf_counter() - t0:.0f} s): bf16 "
          + ", ".join(f"{n} {tile_name(c)}" for n, c in bf16_cfg.items()) + "; NVFP4 "
          + ", ".join(f"{n} {tile_name(c)}" + (f" split-K {splits[n]}" if splits[n] > 1 else "")
                      for n, c in fp4_cfg.items()), flush=True)

    chains = [("cuBLAS bf16 (F.linear)", "cublas", "bf16", None, cublas_chain(bf16, x0))]
    chains += [(f"Triton bf16 GEMV, {label}", "bf16", "bf16", extra, triton_bf16_chain(bf16, x0, bf16_cfg, extra))
               for label, extra in VARIANTS]
    chains += [(f"NVFP4 GEMV, {label}", "nvfp4", "nvfp4", extra, nvfp4_chain(nvfp4, x0, fp4_cfg, extra))
               for label, extra in VARIANTS]
    rows = [{"chain": label, "family": family, "pdl": extra is not None, "wait_first": bool(extra and
             extra["PDL_WAIT_FIRST"]), "bytes": args.layers * layer_bytes[kind]}
            for label, family, kind, extra, _ in chains]

    t0 = time.perf_counter()
    graphs, capture_errors = [], {}
    for row, (label, family, kind, extra, run) in zip(rows, chains):
        graph, outs = capture(run)
        if graph is None:
            capture_errors[label] = outs
            row["graph_error"] = outs
        graphs.append((graph, outs))
    print(f"captured {sum(gr is not None for gr, _ in graphs)} of {len(graphs)} chains as CUDA graphs "
          f"({time.perf_counter() - t0:.0f} s, compiling included)", flush=True)
    launched, waiting = (sum(v) for v in zip(*(pdl_kernels(jit) for jit in (
        g._gemv_kernel.fn, kernels._gemv_kernel.fn.fn, kernels._gemv_finish_kernel))))
    print(f"compiled kernels launched with launch_pdl: {launched}, with griddepcontrol.wait in their PTX: {waiting}")
    if any(r["pdl"] for r, (gr, _) in zip(rows, graphs) if gr is None):
        failed = [label for label in capture_errors]
        print(f"\n*** PDL launches could NOT be captured in a CUDA graph here (torch {torch.__version__}, CUDA "
              f"{torch.version.cuda}, driver {facts.get('driver')}): {capture_errors[failed[0]]}\n*** graph rows of "
              f"{', '.join(failed)} are missing; see the stream rows (plain launches) for PDL off / on.\n", flush=True)

    # bit for bit: each PDL chain against its family's PDL-off chain, every output NaN before the replay
    refs = {}
    for row, (graph, outs) in zip(rows, graphs):
        if graph is None:
            continue
        got = graph_outputs(graph, outs)
        row["graph_finite"] = all(bool(torch.isfinite(t).all()) for t in got)
        if not row["pdl"]:
            refs[row["family"]] = [t.clone() for t in got]
            continue
        row["graph_bit_identical"] = refs.get(row["family"]) is not None and all(
            same_bits(graph_outputs(graph, outs), refs[row["family"]]) for _ in range(3))
    if "cublas" in refs and "bf16" in refs:
        a, b = refs["bf16"][-1].double(), refs["cublas"][-1].double()
        print(f"final output, Triton bf16 chain vs cuBLAS chain: rel L2 {((a - b).norm() / b.norm()).item():.1e} "
              "(rounding differences compounded over the chain)")

    # timings, interleaved: graph replays, then plain stream launches behind a sleep
    cycles_per_us = sleep_rate()
    enqueue_s = []  # the CPU's time to queue one chain: the sleep covers STREAM_CHAINS of them, with a margin
    for label, family, kind, extra, run in chains:
        run()
        torch.cuda.synchronize()
        t = time.perf_counter()
        run()
        enqueue_s.append(time.perf_counter() - t)
        torch.cuda.synchronize()
    graph_us = [[] for _ in rows]
    stream_us = [[] for _ in rows]
    starved = [False] * len(rows)
    for _ in range(args.rounds):
        for i, (graph, _) in enumerate(graphs):
            if graph is not None:
                graph_us[i].append(time_graph(graph, args.replays) / args.layers)
        for i, (label, family, kind, extra, run) in enumerate(chains):
            sleep = int((1.5 * STREAM_CHAINS * enqueue_s[i] + 0.005) * 1e6 * cycles_per_us)
            us, slow = time_stream(run, STREAM_CHAINS, sleep)
            stream_us[i].append(us / args.layers)
            starved[i] |= slow
    for i, (label, family, kind, extra, run) in enumerate(chains):  # stream outputs bit for bit too
        if family == "cublas":
            continue
        for t in graphs[i][1] if graphs[i][0] is not None else []:
            t.fill_(float("nan"))
        outs = run()
        torch.cuda.synchronize()
        if not rows[i]["pdl"]:
            refs[("stream", family)] = [t.clone() for t in outs]
        elif ("stream", family) in refs:
            rows[i]["stream_bit_identical"] = same_bits(outs, refs[("stream", family)])

    for i, row in enumerate(rows):
        row["graph_us_per_layer"] = statistics.median(graph_us[i]) if graph_us[i] else None
        row["stream_us_per_layer"] = statistics.median(stream_us[i])
        row["stream_cpu_bound"] = starved[i]
        row["graph_us_all"], row["stream_us_all"] = graph_us[i], stream_us[i]
    base = {(r["family"], mode): r[f"{mode}_us_per_layer"]
            for r in rows if not r["pdl"] for mode in ("graph", "stream")}
    layers = args.layers
    print(f"\n{'mode':<7}{'chain':<38}{'us/layer':>9}{f'ms/{layers} layers':>15}{'TB/s':>7}{'vs PDL off':>11}  "
          "output vs PDL off")
    for mode in ("graph", "stream"):
        for row in rows:
            us = row[f"{mode}_us_per_layer"]
            if us is None:
                print(f"{mode:<7}{row['chain']:<38}{'capture failed':>42}")
                continue
            off = base.get((row["family"], mode))
            speedup = f"{off / us:.3f}x" if row["pdl"] and off else ""
            row[f"{mode}_speedup"] = off / us if row["pdl"] and off else None
            check = ""
            if row["pdl"]:
                same = row.get(f"{mode}_bit_identical")
                check = "bit-identical" if same else ("DIFFERENT" if same is not None else "not compared")
            elif row["family"] != "cublas" and mode == "graph":
                check = "reference" + ("" if row.get("graph_finite") else " (NOT all finite)")
            note = " (CPU-bound: an upper bound)" if mode == "stream" and row["stream_cpu_bound"] else ""
            print(f"{mode:<7}{row['chain']:<38}{us:>9.2f}{us * layers / 1e3:>15.3f}"
                  f"{row['bytes'] / layers / us / 1e6:>7.2f}{speedup:>11}  {check}{note}")
    print(f"\ncopy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write); TB/s above: weight bytes / time. "
          f"Ran {time.perf_counter() - started:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "facts": facts, "copy_bandwidth": copy_bw, "layers": layers, "shapes": SHAPES,
            "tiles": {"bf16": {n: tile_name(c) for n, c in bf16_cfg.items()}, "nvfp4": fp4_cfg},
            "graph_capture_errors": capture_errors, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
