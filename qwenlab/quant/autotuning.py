"""How qwenlab's Triton kernels autotune (the bf16 decode GEMV, the NVFP4 GEMV and GEMM): each tile timed briefly
(5 ms of warm-up and 25 ms of runs, where Triton's default is 25 + 100 ms: a decode GEMV takes 5-200 us, so that is
still over a hundred runs) and the choice kept on disk in Triton's cache per device, kernel, tiles and shape key
(Triton's cache_results), so a later process on the machine, the next notebook of a report, times nothing. With the
defaults the bf16 GEMV's 48 tiles took 41 s of the Qwen3-4B shape's first graph capture in every notebook process
(doc/evidence/report-time-h200)."""
import triton.testing


def brief_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


AUTOTUNE = {"do_bench": brief_bench, "cache_results": True}  # triton.autotune(configs=..., key=..., **AUTOTUNE)
