"""y = x @ W.T for one token (x [K], W [N, K] row-major): a bandwidth-tuned Triton GEMV for the graph engine's
decode step, where cuBLAS leaves some projections well under the card's bandwidth (and its split-K adds a
reduction kernel per call). Each program streams BLOCK_N rows of W once, in BLOCK_K slices, accumulating in
float32; Triton's autotuner picks the tile per (N, K), briefly and once per machine (qwenlab.quant.autotuning).
Whether it beats cuBLAS is measured per shape on the device (linear_timings); the decode engine uses it only for
those shapes (qwenlab.generation.kernels)."""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qwenlab.quant.autotuning import AUTOTUNE

try:  # Programmatic Dependent Launch, Triton 3.4+: only the kernels compiled with PDL=True call these
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

# The H200's fastest tiles of the 48 (BLOCK_N 2-16 x BLOCK_K 256-1024 x 4/8 warps x 2/4 stages) on every Qwen3-4B
# decode shape (bench/gemv_tiles.py; doc/evidence/report-time-h200/run4_load_and_tiles/): 2x1024 first or within
# 1.1% of the first on all five, 4x512 first on gate/up and lm_head, then the next best on q/k/v, o and down.
# Compiling all 48 on a machine's first call took 15.6 s of notebook 04's first capture.
CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
           for n, k, w, s in [(2, 1024, 4, 2), (4, 512, 4, 4), (4, 256, 4, 2), (4, 1024, 8, 4)]]


@triton.autotune(configs=CONFIGS, key=["N", "K"], **AUTOTUNE)
@triton.jit
def _gemv_kernel(X, W, B, Y, N, K, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr = False, PDL_WAIT_FIRST: tl.constexpr = False):
    """PDL (launch with launch_pdl=True; bench/gemv_pdl.py): the next kernel may launch once every program has
    started, and this one loads its first weight tile before waiting for the previous kernel (gdc_wait), x after;
    PDL_WAIT_FIRST: waits before any load. PDL False: the kernel as without these two parameters."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    if PDL:
        gdc_launch_dependents()
        cols = tl.arange(0, BLOCK_K)
        col_ok = cols < K
        if PDL_WAIT_FIRST:
            gdc_wait()
        # W never changes: its first tile is read while the previous kernel finishes, X (its output) after
        w = tl.load(W + rows[:, None] * stride_wn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0, eviction_policy="evict_first")
        if not PDL_WAIT_FIRST:
            gdc_wait()
        x = tl.load(X + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc += w.to(tl.float32) * x[None, :]  # as the loop's first step (bit-identical sums)
        k_first = BLOCK_K
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        k_first = 0
    for k0 in range(k_first, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(X + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(W + rows[:, None] * stride_wn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_ok)


@torch.library.custom_op("qwenlab::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a single row: x [..., K] holding one row, weight [N, K] (stride 1 along K)."""
    n, k = weight.shape
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x.reshape(k).contiguous(), weight, bias if bias is not None else y, y, n, k, weight.stride(0),
        HAS_BIAS=bias is not None)
    return y.reshape(*x.shape[:-1], n)


@gemv.register_fake
def _(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _graph_us(fn, calls: int = 8) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * calls)


def rotated_copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """`weight` and random copies of it, 256 MiB in all: timed in turn, a small weight is read from HBM, not L2."""
    return [weight] + [torch.randn_like(weight) for _ in range((256 << 20) // weight.nbytes)]


def per_weight_us(call, weights: list[torch.Tensor]) -> float:
    """us per call(w), over `weights` in turn in one CUDA graph."""
    return _graph_us(lambda: [call(w) for w in weights], 1) / len(weights)


def linear_timings(weight: torch.Tensor) -> tuple[float, float]:
    """(cuBLAS us, Triton GEMV us) for one row against `weight`, rotated with random copies so the timing reads HBM,
    not the L2 cache. The engine measures each shape once and keeps the choice."""
    ws = rotated_copies(weight)
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    return per_weight_us(lambda w: F.linear(x, w), ws), per_weight_us(lambda w: gemv(x, w), ws)
