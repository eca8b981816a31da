"""y = x @ W.T for one token (x [K], W [N, K] row-major): a bandwidth-tuned Triton GEMV for the graph engine's
decode step, where cuBLAS leaves some projections well under the card's bandwidth (and its split-K adds a
reduction kernel per call). Each program streams BLOCK_N rows of W once, in BLOCK_K slices, accumulating in
float32; Triton's autotuner picks the tile per (N, K). Whether it beats cuBLAS is measured per shape on the
device (faster_than_cublas), and only those projections switch (use_gemv)."""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
           for n in (2, 4, 8, 16) for k in (256, 512, 1024) for w in (4, 8) for s in (2, 4)]


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


class GemvLinear(nn.Linear):
    """An nn.Linear whose one-row inputs go through the Triton GEMV (same parameters; swapped in by class)."""

    def forward(self, x):
        if x.numel() == self.in_features:
            return gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


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


_timings: dict[tuple, tuple[float, float]] = {}


def linear_timings(weight: torch.Tensor) -> tuple[float, float]:
    """(cuBLAS us, Triton GEMV us) for one row against `weight`, measured once per shape, dtype and device; small
    weights are rotated with random copies so the timing reads HBM, not the L2 cache."""
    n, k = weight.shape
    key = (n, k, weight.dtype, str(weight.device))
    if key not in _timings:
        copies = (256 << 20) // weight.nbytes
        ws = [weight] + [torch.randn_like(weight) for _ in range(copies)]
        x = torch.randn(1, k, dtype=weight.dtype, device=weight.device)
        _timings[key] = (_graph_us(lambda: [F.linear(x, w) for w in ws], 1) / len(ws),
                         _graph_us(lambda: [gemv(x, w) for w in ws], 1) / len(ws))
    return _timings[key]


def faster_than_cublas(linear: nn.Linear) -> bool:
    cublas, triton_us = linear_timings(linear.weight)
    return triton_us < 0.97 * cublas


def decode_linears(model) -> list[nn.Linear]:
    """Every plain nn.Linear of the decode step: the fused projections where they exist, else the HF-named ones."""
    found = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        found += [attn.qkv_proj] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
        found.append(attn.o_proj)
        found += [mlp.gate_up_proj] if mlp.gate_up_proj is not None else [mlp.gate_proj, mlp.up_proj]
        found.append(mlp.down_proj)
    found.append(model.lm_head)
    return [m for m in found if type(m) in (nn.Linear, GemvLinear)]


def use_gemv(model, enabled: bool = True) -> dict[tuple, bool]:
    """Switches each decode-step Linear to the GEMV where it measured faster than cuBLAS (or back, enabled=False).
    -> {(N, K): chosen} for the shapes seen."""
    chosen = {}
    for linear in decode_linears(model):
        shape = tuple(linear.weight.shape)
        if shape not in chosen:
            chosen[shape] = enabled and faster_than_cublas(linear)
        linear.__class__ = GemvLinear if chosen[shape] else nn.Linear
    return chosen
