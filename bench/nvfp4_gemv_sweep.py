"""The NVFP4 GEMVs' tiles, one by one, on the Qwen3-4B decode shapes (CUDA only; prints its numbers, asserts none):
which tile reads the packed weights fastest from HBM, against bf16 cuBLAS on the same shapes in the same run: the
tensor-core GEMV (qwenlab.quant.mma_nvfp4; "mma" rows: BLOCK_N x BLOCK_K, warps, split-K or the default split) and
the Triton FMA one (BLOCK_N / GROUPS / warps and step layout X_VEC, FLAT). q/k/v and gate/up run as one launch
over their separate weights (nvfp4_gemv_parts), also timed as separate calls; o and down as one weight (split-K).

    python bench/nvfp4_gemv_sweep.py [--out FILE.json]

Timing as bench/nvfp4_kernels.py: a CUDA graph of calls over rotated weight copies larger than the L2 cache. Every
output is checked against a float64 matmul of the dequantized weights (rel L2). The JSON's `default_us` is the
GEMV the engine runs by default (`default_engine`; sweeps written before 2026-12-01 call it `autotuned_us`).
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from nvfp4_kernels import ROTATE_BYTES, copies, graph_us, nvfp4_bytes, open_cuda

from qwenlab.quant import codec

SHAPES = {"qkv": ((4096, 1024, 1024), 2560), "o": ((2560,), 4096), "gate_up": ((9728, 9728), 2560),
          "down": ((2560,), 9728)}
LAYER = {"qkv": 1, "o": 1, "gate_up": 1, "down": 1}
LAYERS = 36
# (BLOCK_N, GROUPS, num_warps, X_VEC, FLAT): x read as one 16-byte load per weight word, or pair by pair; the
# words of a step as [blocks, 2] (two per thread) or as one axis loaded one per thread (no layout conversion)
TILES = [(bn, g, w, v, f) for v, f in [(False, False), (False, True)]
         for bn, g, w in [(4, 32, 1), (8, 32, 2), (8, 16, 1)]]
TILES += [(4, 32, 1, True, False)]
# (BLOCK_N, BLOCK_K, warps, SPLIT): None = the default split (triton_nvfp4.mma_split)
MMA_TILES = [(bn, bk, w, sp)
             for bn, bk, w in [(32, 128, 2), (32, 256, 2), (64, 256, 4), (16, 128, 1), (16, 256, 1), (64, 128, 4)]
             for sp in (None, 1, 2, 4, 8)]
# the wide GEMV (qwenlab.quant.wide_nvfp4): RN rows x VW words per thread, TN lanes along rows, WARPS; with and
# without S_PAIRS (the block scales read two at a time); two tiles with PREFETCH, and over splits of K (SPLIT;
# FINISH: the last program of a row tile sums the partial rows, no second kernel); READ_ONLY rows: its loads
# without the decode (1: words, scales and x; 2: words only), timing only
WIDE_TILES = [(2, 4, 2, 4), (4, 4, 2, 2), (4, 4, 2, 1), (8, 4, 2, 1), (8, 4, 2, 2), (4, 4, 1, 2), (2, 4, 2, 2)]
WIDE_CONFIGS = [{"RN": rn, "VW": vw, "TN": tn, "WARPS": w, "S_PAIRS": pairs}
                for rn, vw, tn, w in WIDE_TILES for pairs in (False, True)]
WIDE_CONFIGS += [{"RN": rn, "VW": 4, "TN": 2, "WARPS": w, "S_PAIRS": True, "PREFETCH": True}
                 for rn, w in [(2, 4), (4, 2)]]
WIDE_CONFIGS += [{"RN": rn, "VW": 4, "TN": 2, "WARPS": w, "S_PAIRS": True, "SPLIT": sp, "FINISH": True}
                 for rn, w in [(2, 4), (4, 2)] for sp in (2, 4, 8)]
WIDE_CONFIGS += [{"RN": rn, "VW": 4, "TN": 2, "WARPS": w, "READ_ONLY": ro, "S_PAIRS": True}
                 for rn, w in [(2, 4), (4, 2)] for ro in (1, 2)]


def wide_label(c: dict) -> str:
    return (f"{'read only ' + str(c['READ_ONLY']) if c.get('READ_ONLY') else 'wide'} {c['RN']}x{c['VW']} "
            f"tn{c['TN']} w{c['WARPS']}{' prefetch' if c.get('PREFETCH') else ''}"
            f"{' split ' + str(c['SPLIT']) if c.get('SPLIT') else ''}{' finish' if c.get('FINISH') else ''}"
            f"{' pairs' if c.get('S_PAIRS') else ''}")


@triton.jit
def _stream_kernel(P, OUT, BLOCK: tl.constexpr):
    """Reads BLOCK int32 words per program in one load (16-byte loads, all in flight at once) and sums them."""
    words = tl.load(P + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), eviction_policy="evict_first")
    tl.store(OUT + tl.program_id(0), tl.sum(words, axis=0))


def stream_us(nbytes: int, device) -> float:
    """The plain read of nbytes (as int32 words, whole 16 KB blocks) in one kernel, over rotated copies: what
    reading a projection's bytes can cost at best in one launch, whatever the layout."""
    block = 4096
    programs = triton.cdiv(nbytes // 4, block)
    bufs = [torch.zeros(programs * block, dtype=torch.int32, device=device)
            for _ in range(math.ceil(ROTATE_BYTES / nbytes))]
    out = torch.empty(programs, dtype=torch.int32, device=device)
    return graph_us([lambda b=b: _stream_kernel[(programs,)](b, out, BLOCK=block, num_warps=4) for b in bufs])


FAMILIES = ("fma", "mma", "wide")


def weights_for(ns, k, device):
    return [codec.quantize(torch.randn(n, k, device=device) * 0.02) for n in ns]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write every number to this JSON file")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"which GEMVs' tiles to time, comma-separated (default all: {','.join(FAMILIES)})")
    args = parser.parse_args(argv)
    families = set(args.families.split(","))
    if not families <= set(FAMILIES):
        print(f"nvfp4_gemv_sweep: --families takes {', '.join(FAMILIES)}, got {args.families}", file=sys.stderr)
        return 2
    opened = open_cuda("nvfp4_gemv_sweep")
    if opened is None:
        return 2
    device, facts, copy_bw = opened
    from qwenlab.quant import triton_nvfp4 as kernels

    started = time.perf_counter()
    results = {}
    for name, (ns, k) in SHAPES.items():
        qs = weights_for(ns, k, device)
        x = torch.randn(1, k, device=device).bfloat16()
        ref = torch.cat([x.double() @ codec.dequantize(q, torch.float32).double().T for q in qs], dim=-1)
        nbytes = sum(nvfp4_bytes(n, k) for n in ns)
        sets = list(zip(*(copies(q, nbytes) for q in qs)))  # rotated copies of all the parts together
        bf16 = [torch.cat([codec.dequantize(q, torch.bfloat16) for q in qs])]
        bf16 += [bf16[0].clone() for _ in range(math.ceil(ROTATE_BYTES / bf16[0].nbytes) - 1)]
        row = {"ns": ns, "k": k, "nvfp4_bytes": nbytes, "floor_us": nbytes / copy_bw * 1e6,
               "bf16_us": graph_us([lambda w=w: F.linear(x, w) for w in bf16]), "tiles": {}}
        del bf16
        if len(ns) > 1:
            row["separate_calls_us"] = graph_us([lambda q=q: kernels.nvfp4_gemv(x, q.packed, q.block_scale,
                                                                                 q.tensor_scale)
                                                 for s in sets for q in s])
            row["separate_calls_us"] *= len(ns)  # graph_us divides by the number of calls: per layer here
        triples = [[(q.packed, q.block_scale, q.tensor_scale) for q in s] for s in sets]
        configs = [({"MMA": True, "BLOCK_N": bn, "BLOCK_K": bk, "WARPS": w, "SPLIT": sp},
                    f"mma {bn}x{bk} w{w} {'split ' + str(sp) if sp else 'default split'}")
                   for bn, bk, w, sp in MMA_TILES if "mma" in families]
        configs += [({"BLOCK_N": bn, "GROUPS": g, "X_VEC": x_vec, "FLAT": flat, "num_warps": w, "num_stages": 1},
                     f"{bn}x{g} w{w}{' x_vec' if x_vec else ''}{' flat' if flat else ''}")
                    for bn, g, w, x_vec, flat in TILES if "fma" in families]
        wide = [({"WIDE": True, **c}, wide_label(c)) for c in WIDE_CONFIGS]
        configs += wide if "wide" in families else []
        for config, label in configs:
            try:
                y = kernels.gemv_with_config(x, triples[0], config)
                err = ((y.double() - ref).norm() / ref.norm()).item()
                us = graph_us([lambda t=t: kernels.gemv_with_config(x, t, config) for t in triples])
            except Exception as e:  # noqa: BLE001 - a tile the compiler refuses is reported, not fatal
                row["tiles"][label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
                print(f"{name:>8} {label:>16}: {row['tiles'][label]['error']}", flush=True)
                continue
            row["tiles"][label] = {"us": us, "pct_copy_bw": 100 * nbytes / us / 1e-6 / copy_bw, "rel_l2": err}
        timed = [t for t in row["tiles"].items() if "us" in t[1] and not t[0].startswith("read only")]
        best = min(timed, key=lambda t: t[1]["us"])
        row["best"], row["best_us"] = best[0], best[1]["us"]
        results[name] = row
        auto_us = graph_us([lambda t=t: kernels._gemv(x, t, None, "default") for t in triples])
        row["default_us"], row["default_engine"] = auto_us, kernels.gemv_engine(x)
        ranked = sorted(timed, key=lambda t: t[1]["us"])
        print(f"\n{name} {'+'.join(map(str, ns))}x{k}: bf16 cuBLAS {row['bf16_us']:.1f} us, floor "
              f"{row['floor_us']:.1f} us, default ({row['default_engine']}) {auto_us:.1f} us"
              + (f", separate calls {row['separate_calls_us']:.1f} us" if "separate_calls_us" in row else ""))
        for label, t in ranked[:16]:
            print(f"   {label:>16}: {t['us']:6.1f} us  {t['pct_copy_bw']:4.0f}% of copy bw  "
                  f"{row['bf16_us'] / t['us']:.2f}x bf16  rel L2 {t['rel_l2']:.1e}")
        for label, t in row["tiles"].items():
            if label.startswith("read only") and "us" in t:
                print(f"   {label:>16}: {t['us']:6.1f} us  {t['pct_copy_bw']:4.0f}% of copy bw (no decode)")
        if "wide" in families:
            row["stream_us"] = stream_us(nbytes, device)
            print(f"   plain read of the same bytes, one kernel: {row['stream_us']:.1f} us "
                  f"({100 * nbytes / row['stream_us'] / 1e-6 / copy_bw:.0f}% of copy bw)")
        print(f"   worst {ranked[-1][0]}: {ranked[-1][1]['us']:.1f} us", flush=True)
        del sets, triples
        torch.cuda.empty_cache()
    per_layer = {m: sum(results[s][m] for s in LAYER) for m in ("bf16_us", "default_us", "best_us")}
    print(f"\none layer x {LAYERS} (qkv + o + gate_up + down): bf16 cuBLAS {LAYERS * per_layer['bf16_us'] / 1e3:.3f}"
          f" ms, NVFP4 default {LAYERS * per_layer['default_us'] / 1e3:.3f} ms, NVFP4 best tiles "
          f"{LAYERS * per_layer['best_us'] / 1e3:.3f} ms  (ran {time.perf_counter() - started:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"facts": facts, "copy_bandwidth": copy_bw, "shapes": results, "layer_x36_ms": {
                k: LAYERS * v / 1e3 for k, v in per_layer.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
