"""The bf16 GEMV's tiles (qwenlab.generation.gemv.CONFIGS), one by one, on the Qwen3-4B decode shapes, against cuBLAS
in the same run (CUDA only; prints its numbers, asserts none), and what the autotuner costs the first time a shape
is met on a machine (Triton's cache in a fresh folder): which few tiles an autotuner needs to keep.

    python bench/gemv_tiles.py [--out FILE.json] [--top 5]

Timing as bench/nvfp4_kernels.py: a CUDA graph of calls over rotated weight copies larger than the L2 cache.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")  # before Triton reads it: a cold tune

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from nvfp4_kernels import ROTATE_BYTES, graph_us, open_cuda  # noqa: E402

SHAPES = {"qkv": (6144, 2560), "o": (2560, 4096), "gate_up": (19456, 2560), "down": (2560, 9728),
          "lm_head": (151936, 2560)}


def config_name(c) -> str:
    return f"{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']} w{c.num_warps} s{c.num_stages}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write every number to this JSON file")
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    opened = open_cuda("gemv_tiles")
    if opened is None:
        return 2
    device, facts, copy_bw = opened
    from qwenlab.generation import gemv as g

    results = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        ws = [w] + [torch.randn_like(w) * 0.02 for _ in range(max(0, ROTATE_BYTES // w.nbytes - 1))]
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        ref = (x.double() @ w.double().T).reshape(-1)
        start = time.perf_counter()
        y = g.gemv(x, w)
        torch.cuda.synchronize()
        tune_s = time.perf_counter() - start  # compile every tile + time it: the first call on a cold machine
        err = ((y.double().reshape(-1) - ref).norm() / ref.norm()).item()
        chosen = config_name(g._gemv_kernel.best_config)
        cublas = graph_us([lambda w=w: F.linear(x, w) for w in ws])
        rows = []
        for c in g.CONFIGS:
            yy = torch.empty(n, dtype=x.dtype, device=device)

            def call(w=w, c=c, yy=yy):
                g._gemv_kernel.fn[(triton.cdiv(n, c.kwargs["BLOCK_N"]),)](
                    x.reshape(k), w, yy, yy, n, k, w.stride(0), HAS_BIAS=False, num_warps=c.num_warps,
                    num_stages=c.num_stages, **c.kwargs)
            us = graph_us([lambda w=w, c=c: call(w, c) for w in ws])
            rows.append({"tile": config_name(c), "us": round(us, 2), "gb_per_s": round(w.nbytes / us / 1e3, 1)})
        rows.sort(key=lambda r: r["us"])
        results[name] = {"n": n, "k": k, "bytes": w.nbytes, "autotune_first_call_s": round(tune_s, 2),
                         "autotuned": chosen, "rel_l2": err, "cublas_us": round(cublas, 2), "tiles": rows}
        print(f"{name:8s} {n}x{k}: first call (compile + tune {len(g.CONFIGS)} tiles) {tune_s:.2f} s, chose {chosen}; "
              f"cuBLAS {cublas:.2f} us ({w.nbytes / cublas / 1e3:.0f} GB/s); rel_l2 {err:.1e}", flush=True)
        for r in rows[:args.top]:
            print(f"    {r['tile']:18s} {r['us']:8.2f} us  {r['gb_per_s']:7.1f} GB/s")
        del ws, w
        torch.cuda.empty_cache()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    if args.out:
        Path(args.out).write_text(json.dumps({"facts": facts, "copy_bw": copy_bw, "shapes": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
