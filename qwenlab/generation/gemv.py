"""y = x @ W.T for one token (x [K], W [N, K] row-major): a bandwidth-tuned Triton GEMV for the graph engine's
decode step, where cuBLAS leaves the smaller projections at 50-80% of the card's bandwidth (its split-K also adds a
reduction kernel per call). Each program streams BLOCK_N rows of W once, in BLOCK_K slices, accumulating in
float32; Triton's autotuner picks the tile per (N, K) on first use."""
import torch
import triton
import triton.language as tl

CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
           for n in (4, 8, 16) for k in (256, 512) for w in (4, 8) for s in (2, 4)]


@triton.autotune(configs=CONFIGS, key=["N", "K"])
@triton.jit
def _gemv_kernel(X, W, B, Y, N, K, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(X + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(W + rows[:, None] * stride_wn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a single row: x [..., K] with one row in total, weight [N, K] (stride 1 along K)."""
    n, k = weight.shape
    x_row = x.reshape(k).contiguous()
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x_row, weight, bias if bias is not None else y, y, n, k, weight.stride(0), HAS_BIAS=bias is not None)
    return y.reshape(*x.shape[:-1], n)
