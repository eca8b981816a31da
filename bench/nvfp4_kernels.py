"""NVFP4 Triton kernels (qwenlab.quant.triton_nvfp4) against bf16 cuBLAS on the Qwen3-4B projection shapes. CUDA
only; prints its numbers, never asserts them.

    python bench/nvfp4_kernels.py [--quick] [--out FILE.json]

Decode (one row): bf16 F.linear, dequantize-then-matmul (codec.dequantize + F.linear, NVFP4Linear's path today) and
nvfp4_gemv (the GEMV QWENLAB_NVFP4_GEMV picks, the wide-load one by default on CUDA; each row's `engine` says
which). Each is timed as a CUDA graph of many calls over rotated weight copies larger than the L2 cache; GB/s
counts the bytes the method must read and write (the NVFP4 weight = packed + block scales, or the bf16 weight; x; y)
against the measured copy bandwidth. Prefill (M rows, 2048 by default): bf16 F.linear, nvfp4_gemm, and
dequantize_into one reused bf16 buffer + F.linear. Every output is compared with a float64 matmul of the same
dequantized weight in this run (rel L2, and the largest error relative to the largest output).
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from qwenlab.bench.measure import copy_bandwidth, device_facts
from qwenlab.quant import codec

SHAPES = {"q": (4096, 2560), "k/v": (1024, 2560), "qkv": (6144, 2560), "o": (2560, 4096), "gate/up": (9728, 2560),
          "gate_up": (19456, 2560), "down": (2560, 9728), "lm_head": (151936, 2560)}
LAYERS = 36
FUSED_LAYER = {"qkv": 1, "o": 1, "gate_up": 1, "down": 1}
SPLIT_LAYER = {"q": 1, "k/v": 2, "o": 1, "gate/up": 2, "down": 1}
QUICK_SHAPES = ("qkv", "o", "gate_up", "down", "lm_head")
ROTATE_BYTES = 512 << 20  # each method's rotated weights: many times the H200's 60 MB L2
MAX_COPIES = 32  # prefill: at most this many weight copies per graph


def graph_us(calls, replays: int = 5) -> float:
    """Microseconds per call: the calls captured once in a CUDA graph (after an eager warm-up), then replayed."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(calls))


def errors(y: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = y.double().reshape(ref.shape) - ref
    return {"rel_l2": (diff.norm() / ref.norm()).item(), "max_rel": (diff.abs().max() / ref.abs().max()).item(),
            "finite": bool(torch.isfinite(y).all())}


def copies(q: codec.NVFP4Weight, nbytes: int) -> list:
    return [q] + [codec.NVFP4Weight(q.packed.clone(), q.block_scale.clone(), q.tensor_scale.clone())
                  for _ in range(math.ceil(ROTATE_BYTES / nbytes) - 1)]


def nvfp4_bytes(n: int, k: int) -> int:
    return n * k // 2 + n * k // 16


def decode_row(name, n, k, kernels, copy_bw, device) -> dict:
    w = torch.randn(n, k, device=device) * 0.02
    q = codec.quantize(w)
    del w
    weight = codec.dequantize(q, torch.float32).double()
    bf16 = codec.dequantize(q, torch.bfloat16)
    x = torch.randn(1, k, device=device).bfloat16()
    ref = x.double() @ weight.T
    del weight
    io = 2 * k + 2 * n
    moved = {"bf16": 2 * n * k + io, "dequant": nvfp4_bytes(n, k) + io, "gemv": nvfp4_bytes(n, k) + io}
    bf16s = [bf16] + [bf16.clone() for _ in range(math.ceil(ROTATE_BYTES / bf16.nbytes) - 1)]
    qs = copies(q, nvfp4_bytes(n, k))
    t0 = time.perf_counter()
    y = kernels.nvfp4_gemv(x, q.packed, q.block_scale, q.tensor_scale)
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - t0
    out = {"bf16": F.linear(x, bf16), "dequant": F.linear(x, codec.dequantize(q, x.dtype)), "gemv": y}
    us = {"bf16": graph_us([lambda b=b: F.linear(x, b) for b in bf16s]),
          "dequant": graph_us([lambda q=q: F.linear(x, codec.dequantize(q, x.dtype)) for q in qs[:8]], replays=2),
          "gemv": graph_us([lambda q=q: kernels.nvfp4_gemv(x, q.packed, q.block_scale, q.tensor_scale) for q in qs])}
    engine = kernels.gemv_engine(x)  # the GEMV nvfp4_gemv runs here (QWENLAB_NVFP4_GEMV; the wide one by default)
    config = {"fma": lambda: best_config(kernels._gemv_kernel), "mma": lambda: f"mma {kernels.MMA_CONFIG}",
              "wide": lambda: f"wide {kernels.wide_config(n)}"}[engine]()
    row = {"shape": name, "n": n, "k": k, "first_call_s": first_call_s, "engine": engine, "config": config,
           "tuning_ms": tuning(kernels._gemv_kernel) if engine == "fma" else {}}
    for method in us:
        row[method] = {"us": us[method], "bytes": moved[method], "gb_s": moved[method] / us[method] / 1e3,
                       "pct_copy_bw": 100 * moved[method] / us[method] / 1e-6 / copy_bw, **errors(out[method], ref)}
    row["floor_us"] = moved["gemv"] / copy_bw * 1e6
    return row


def prefill_row(name, n, k, m, kernels, buffer, device) -> dict:
    w = torch.randn(n, k, device=device) * 0.02
    q = codec.quantize(w)
    del w
    bf16 = codec.dequantize(q, torch.bfloat16)
    x = torch.randn(m, k, device=device).bfloat16()
    ref = x.double() @ codec.dequantize(q, torch.float32).double().T
    scratch = buffer[:n * k].view(n, k)
    scratch.fill_(float("nan"))
    exact = torch.equal(kernels.dequantize_into(scratch, q.packed, q.block_scale, q.tensor_scale), bf16)
    t0 = time.perf_counter()
    y = kernels.nvfp4_gemm(x, q.packed, q.block_scale, q.tensor_scale)
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - t0
    bf16s = [bf16] + [bf16.clone() for _ in range(min(MAX_COPIES, math.ceil(ROTATE_BYTES / bf16.nbytes)) - 1)]
    qs = copies(q, nvfp4_bytes(n, k))[:MAX_COPIES]

    def dequant_then_cublas(q):
        return F.linear(x, kernels.dequantize_into(scratch, q.packed, q.block_scale, q.tensor_scale))

    out = {"bf16": F.linear(x, bf16), "gemm": y, "dequant_into": dequant_then_cublas(q)}
    us = {"bf16": graph_us([lambda b=b: F.linear(x, b) for b in bf16s], replays=3),
          "gemm": graph_us([lambda q=q: kernels.nvfp4_gemm(x, q.packed, q.block_scale, q.tensor_scale) for q in qs],
                           replays=3),
          "dequant_into": graph_us([lambda q=q: dequant_then_cublas(q) for q in qs], replays=3)}
    dequant_us = graph_us([lambda q=q: kernels.dequantize_into(scratch, q.packed, q.block_scale, q.tensor_scale)
                           for q in qs], replays=3)
    row = {"shape": name, "m": m, "n": n, "k": k, "first_call_s": first_call_s, "dequantize_into_exact": exact,
           "dequantize_into_alone_us": dequant_us, "config": best_config(kernels._gemm_kernel),
           "tuning_ms": tuning(kernels._gemm_kernel)}
    for method in us:
        row[method] = {"us": us[method], "tflop_s": 2 * m * n * k / us[method] / 1e6, **errors(out[method], ref)}
    return row


def best_config(autotuner) -> str:
    config = getattr(autotuner, "best_config", None)
    return str(config) if config is not None else "?"


def tuning(autotuner) -> dict:
    """{config: median ms} of the autotuner's last tuning run (its own timing: one buffer, L2 may hold it)."""
    return {str(c): t[0] if isinstance(t, (list, tuple)) else t
            for c, t in (getattr(autotuner, "configs_timings", None) or {}).items()}


def layer_sums(rows: dict, methods) -> dict:
    """{method: {"fused": us, "split": us}}: one decoder layer x 36 + lm_head, with fused or split projections."""
    sums = {}
    for method in methods:
        for label, layer in (("fused", FUSED_LAYER), ("split", SPLIT_LAYER)):
            if all(s in rows for s in layer) and "lm_head" in rows:
                per_layer = sum(rows[s][method]["us"] * c for s, c in layer.items())
                sums.setdefault(method, {})[label] = LAYERS * per_layer + rows["lm_head"][method]["us"]
    return sums


def print_tables(facts, copy_bw, decode, prefill, decode_sums, prefill_sums):
    print(f"\n{facts['name']}  torch {facts['torch']}  triton {facts['triton']}  CUDA {facts['cuda']}  "
          f"copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    print("\nDecode, one row (us per call; GB/s of the bytes each method must move; % of copy bandwidth; rel L2 vs "
          "float64)")
    print(f"{'shape':>8} {'N x K':>13} | {'bf16 cuBLAS':>22} | {'dequant + matmul':>22} | {'nvfp4_gemv':>22} | "
          f"{'floor':>6} {'gemv/bf16':>9}  max rel err (bf16 / deq / gemv)")
    for r in decode.values():
        cells = " | ".join(f"{r[m]['us']:7.1f} {r[m]['gb_s']:6.0f} {r[m]['pct_copy_bw']:4.0f}%" for m in
                           ("bf16", "dequant", "gemv"))
        print(f"{r['shape']:>8} {r['n']:>6}x{r['k']:<6} | {cells} | {r['floor_us']:6.1f} "
              f"{r['bf16']['us'] / r['gemv']['us']:8.2f}x  "
              f"{r['bf16']['max_rel']:.1e} / {r['dequant']['max_rel']:.1e} / {r['gemv']['max_rel']:.1e}")
    for label in ("fused", "split"):
        if all(label in decode_sums.get(m, {}) for m in ("bf16", "dequant", "gemv")):
            cells = "  ".join(f"{m} {decode_sums[m][label] / 1e3:7.3f} ms ({1e6 / decode_sums[m][label]:6.1f} tok/s)"
                              for m in ("bf16", "dequant", "gemv"))
            print(f"  layer x {LAYERS} + lm_head ({label} projections): {cells}")
    if not prefill:
        return
    m = next(iter(prefill.values()))["m"]
    print(f"\nPrefill, M = {m} (us per call, TFLOP/s, rel L2 vs float64)")
    print(f"{'shape':>8} {'N x K':>13} | {'bf16 cuBLAS':>24} | {'nvfp4_gemm':>24} | {'dequantize_into+cuBLAS':>24} | "
          f"{'gemm/bf16':>9} {'dequant alone':>13}")
    for r in prefill.values():
        cells = " | ".join(f"{r[k]['us']:8.1f} {r[k]['tflop_s']:5.0f} {r[k]['rel_l2']:.1e}" for k in
                           ("bf16", "gemm", "dequant_into"))
        print(f"{r['shape']:>8} {r['n']:>6}x{r['k']:<6} | {cells} | {r['bf16']['us'] / r['gemm']['us']:8.2f}x "
              f"{r['dequantize_into_alone_us']:10.1f} us{'' if r['dequantize_into_exact'] else ' NOT EXACT'}")
    for label in ("fused", "split"):
        if all(label in prefill_sums.get(k, {}) for k in ("bf16", "gemm", "dequant_into")):
            cells = "  ".join(f"{k} {prefill_sums[k][label] / 1e3:7.2f} ms" for k in ("bf16", "gemm", "dequant_into"))
            print(f"  layer x {LAYERS} + lm_head ({label} projections): {cells}")


def open_cuda(prog: str):
    """(device, facts, copy bandwidth) of the GPU, printed; None, after a one-line error, where there is none."""
    if not torch.cuda.is_available():
        print(f"{prog}: needs a CUDA GPU (the kernels are Triton)", file=sys.stderr)
        return None
    device = torch.device("cuda")
    facts = device_facts(device)
    print(f"{facts['name']}  torch {facts['torch']}  triton {facts['triton']}  CUDA {facts['cuda']}  "
          f"driver {facts['driver']}", flush=True)
    copy_bw = copy_bandwidth(device)
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
    return device, facts, copy_bw


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the fused projections and lm_head only")
    parser.add_argument("--m", type=int, default=2048, help="prefill rows (default 2048)")
    parser.add_argument("--small-m", default="16,128", help="also prefill at these M on the fused layer shapes "
                        "(comma-separated; '' for none)")
    parser.add_argument("--out", help="write every number to this JSON file")
    args = parser.parse_args(argv)
    opened = open_cuda("nvfp4_kernels")
    if opened is None:
        return 2
    device, facts, copy_bw = opened
    from qwenlab.quant import triton_nvfp4 as kernels

    shapes = {s: SHAPES[s] for s in (QUICK_SHAPES if args.quick else SHAPES)}
    started = time.perf_counter()
    decode, prefill = {}, {}
    for name, (n, k) in shapes.items():
        decode[name] = decode_row(name, n, k, kernels, copy_bw, device)
        r = decode[name]
        print(f"decode  {name:>8}: bf16 {r['bf16']['us']:.1f} us, dequant {r['dequant']['us']:.1f} us, "
              f"gemv {r['gemv']['us']:.1f} us ({r['gemv']['pct_copy_bw']:.0f}% of copy bw, rel L2 "
              f"{r['gemv']['rel_l2']:.1e}, first call {r['first_call_s']:.1f} s, {r['config']})", flush=True)
        torch.cuda.empty_cache()
    buffer = torch.empty(max(n * k for n, k in shapes.values()), dtype=torch.bfloat16, device=device)
    for name, (n, k) in shapes.items():
        prefill[name] = prefill_row(name, n, k, args.m, kernels, buffer, device)
        r = prefill[name]
        print(f"prefill {name:>8}: bf16 {r['bf16']['us']:.0f} us, gemm {r['gemm']['us']:.0f} us (rel L2 "
              f"{r['gemm']['rel_l2']:.1e}), dequantize_into + cuBLAS {r['dequant_into']['us']:.0f} us, first call "
              f"{r['first_call_s']:.1f} s, {r['config']}", flush=True)
        torch.cuda.empty_cache()
    small = {}
    for m in [int(v) for v in args.small_m.split(",") if v.strip()]:
        for name in FUSED_LAYER:
            small.setdefault(m, {})[name] = prefill_row(name, *SHAPES[name], m, kernels, buffer, device)
            r = small[m][name]
            print(f"prefill M={m:<5} {name:>8}: bf16 {r['bf16']['us']:.1f} us, gemm {r['gemm']['us']:.1f} us, "
                  f"dequantize_into + cuBLAS {r['dequant_into']['us']:.1f} us", flush=True)
    decode_sums = layer_sums(decode, ("bf16", "dequant", "gemv"))
    prefill_sums = layer_sums(prefill, ("bf16", "gemm", "dequant_into"))
    print(f"(ran {time.perf_counter() - started:.0f} s)")
    print_tables(facts, copy_bw, decode, prefill, decode_sums, prefill_sums)
    for m, rows in small.items():
        cells = "  ".join(f"{name} {r['bf16']['us']:.1f}/{r['gemm']['us']:.1f}/{r['dequant_into']['us']:.1f}"
                          for name, r in rows.items())
        print(f"  M={m}: us bf16 / nvfp4_gemm / dequantize_into+cuBLAS: {cells}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"facts": facts, "copy_bandwidth": copy_bw, "decode": decode, "prefill": prefill,
                       "prefill_small_m": small, "decode_layer_sums_us": decode_sums,
                       "prefill_layer_sums_us": prefill_sums}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
