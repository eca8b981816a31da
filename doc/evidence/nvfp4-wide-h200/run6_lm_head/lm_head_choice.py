# ruff: noqa  (kept as it ran on the device: doc/evidence/nvfp4-wide-h200/README.md, run 6)
import time, torch
from qwenlab.generation.gemv import linear_timings, _gemv_kernel
w = torch.randn(151936, 2560, device="cuda", dtype=torch.bfloat16)
for i in range(6):
    t = time.perf_counter(); c, g = linear_timings(w)
    print(f"call {i}: cuBLAS {c:.1f} us, Triton {g:.1f} us, Triton kept: {g < 0.97 * c} ({time.perf_counter() - t:.1f} s)", flush=True)
print("autotuned:", _gemv_kernel.best_config)
for n, k in [(6144, 2560), (2560, 4096), (19456, 2560), (2560, 9728)]:
    ws = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    print(n, k, [tuple(round(v, 1) for v in linear_timings(ws)) for _ in range(3)], flush=True)
