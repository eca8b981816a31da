"""NVFP4 weights on GPUs without FP4 tensor cores (Hopper): Triton kernels that read the packed codes and the E4M3
block scales once and dequantize in registers (W4A16: the activations stay bf16/fp16/fp32).

Layout (qwenlab.quant.codec): weight [N, K] as packed uint8 [N, K/2] (element 2i in the low nibble of byte i),
block_scale float8_e4m3fn [N, K/16], tensor_scale float32, a scalar or a vector [N] (one per output row, e.g. a
fused q/k/v whose parts had different tensor scales). value = e2m1(code) x block_scale x tensor_scale.

A nibble s|e1 e0|m is decoded without a table, by moving its bits into a float: as float32 bits (sign -> bit 31,
e1 e0 m -> bits 24..22) it reads as exactly e2m1 x 2^-126 (GEMV: three integer ops per nibble, measured the
cheapest); as an FP8 E4M3 byte (sign -> bit 7, e1 e0 m -> bits 4..2) as e2m1 x 2^-6, converted by the hardware
(GEMM, dequantize). Code 1 (0.5) lands on a subnormal either way, which is exact; the power of two is folded into
a later multiply.

    nvfp4_gemv       one row (batch-1 decode), fp32 accumulation, the tensor scale applied once at the end;
                     split-K with a second, atomic-free pass under 4096 rows (gemv_split)
    nvfp4_gemm       M rows (prefill): W tiles dequantized to x.dtype (exact: e2m1 x E4M3 fits in 8 bits), tl.dot
    dequantize_into  the whole weight into a preallocated buffer, bit-identical to codec.dequantize
"""
import os

import torch
import triton
import triton.language as tl

from qwenlab.errors import QwenlabError

GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "GROUPS": g}, num_warps=w, num_stages=1)  # the H200's picks
                for n, g, w in [(4, 32, 2), (8, 32, 2), (4, 32, 4), (4, 64, 2), (8, 16, 1), (4, 32, 1)]]
GEMM_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
                for m, n, k, w, s in [(16, 32, 256, 2, 3), (16, 64, 128, 4, 4), (32, 64, 128, 4, 4),
                                      (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                      (256, 128, 64, 8, 3)]]
if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU interpreter cannot benchmark: one config each, no tuning
    GEMV_CONFIGS, GEMM_CONFIGS = GEMV_CONFIGS[:1], GEMM_CONFIGS[:1]
DEQUANT_BLOCK_N, DEQUANT_BLOCK_K = 32, 256
E4M3_UNIT = tl.constexpr(64.0)  # a nibble decoded through E4M3 reads e2m1 x 2^-6
X_SCALE = tl.constexpr(9.223372036854775808e18)  # 2^63


@triton.jit
def _e2m1_as_e4m3(p):
    """uint8 bytes -> (low nibble, high nibble) as float32 e2m1 x 2^-6 (exact)."""
    lo = ((p & 0x08) << 4) | ((p & 0x07) << 2)
    hi = (p & 0x80) | ((p >> 2) & 0x1C)
    return (lo.to(tl.float8e4nv, bitcast=True).to(tl.float32), hi.to(tl.float8e4nv, bitcast=True).to(tl.float32))


@triton.jit
def _e2m1_as_f32_bits(p):
    """uint8 bytes -> (low nibble, high nibble) as float32 e2m1 x 2^-126 (exact; code +-1, 0.5, is subnormal)."""
    q = p.to(tl.uint32)
    lo = ((q & 0x08) << 28) | ((q & 0x07) << 22)
    hi = ((q & 0x80) << 24) | ((q & 0x70) << 18)
    return lo.to(tl.float32, bitcast=True), hi.to(tl.float32, bitcast=True)


@triton.autotune(configs=GEMV_CONFIGS, key=["N", "K", "SPLIT"])
@triton.heuristics({"EVEN_K": lambda args: args["SPLIT"] == 1 and (args["K"] // 16) % args["GROUPS"] == 0})
@triton.jit(do_not_specialize=["ts_stride"])
def _gemv_kernel(X, P, S, TS, B, Y, PARTIAL, N, K, stride_p, stride_s, ts_stride, X_WORDS: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUPS: tl.constexpr):
    """Each program: BLOCK_N rows, GROUPS 16-element blocks (8 packed bytes + 1 scale each) per step along K, over
    its 1/SPLIT of K (SPLIT > 1: float32 partial sums into PARTIAL [SPLIT, N], summed by _gemv_finish_kernel).
    X_WORDS: x is bf16 read as int32 words (element 2i in the low half), else any float dtype read per element.
    Weights decode to e2m1 x 2^-126 and x is scaled by 2^63 so that the products stay normal floats."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    src = tl.minimum(rows, N - 1)  # the tail program re-reads the last row instead of masking every load
    g = tl.arange(0, GROUPS)
    byte = tl.arange(0, 8)
    chunk = tl.cdiv(tl.cdiv(K // 16, SPLIT), GROUPS) * GROUPS
    first = tl.program_id(1) * chunk
    blocks = tl.minimum(K // 16, first + chunk)
    acc = tl.zeros([BLOCK_N, GROUPS], tl.float32)
    for g0 in range(first, blocks, GROUPS):
        gk = g0 + g
        ok = gk < blocks
        pointers = P + src[:, None, None] * stride_p + gk[None, :, None] * 8 + byte[None, None, :]
        if EVEN_K:
            p = tl.load(pointers, eviction_policy="evict_first")
        else:
            p = tl.load(pointers, mask=ok[None, :, None], other=0, eviction_policy="evict_first")
        s = tl.load(S + src[:, None] * stride_s + gk[None, :], mask=ok[None, :], other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
        if X_WORDS:
            words = tl.load(X + gk[:, None] * 8 + byte[None, :], mask=ok[:, None], other=0).to(tl.uint32, bitcast=True)
            x_even = (words << 16).to(tl.float32, bitcast=True) * X_SCALE
            x_odd = (words & 0xFFFF0000).to(tl.float32, bitcast=True) * X_SCALE
        else:
            offsets = gk[:, None] * 16 + byte[None, :] * 2
            x_even = tl.load(X + offsets, mask=ok[:, None], other=0.0).to(tl.float32) * X_SCALE
            x_odd = tl.load(X + offsets + 1, mask=ok[:, None], other=0.0).to(tl.float32) * X_SCALE
        lo, hi = _e2m1_as_f32_bits(p)
        acc += tl.sum(lo * x_even[None, :, :] + hi * x_odd[None, :, :], axis=2) * s
    if SPLIT > 1:
        tl.store(PARTIAL + tl.program_id(1) * N + rows, tl.sum(acc, axis=1), mask=rows < N)
    else:
        y = tl.sum(acc, axis=1) * (tl.load(TS + src * ts_stride) * X_SCALE)  # 2^-126 x 2^63 x 2^63 = 1
        if HAS_BIAS:
            y += tl.load(B + src).to(tl.float32)
        tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=rows < N)


@triton.jit(do_not_specialize=["ts_stride"])
def _gemv_finish_kernel(PARTIAL, TS, B, Y, N, ts_stride, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                        BLOCK: tl.constexpr):
    """y = (sum of the SPLIT partial rows) x tensor_scale (+ bias), cast to Y's dtype: split-K's second pass."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    total = tl.sum(tl.load(PARTIAL + tl.arange(0, SPLIT)[:, None] * N + rows[None, :], mask=ok[None, :], other=0.0),
                   axis=0)
    y = total * (tl.load(TS + rows * ts_stride, mask=ok, other=0.0) * X_SCALE)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=ok)


@triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K"])
@triton.jit(do_not_specialize=["ts_stride"])
def _gemm_kernel(X, P, S, TS, B, Y, M, N, K, M_BUCKET, stride_xm, stride_p, stride_s, stride_ym,
                 ts_stride, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Y[BLOCK_M, BLOCK_N] tiles; along K, W's [BLOCK_N, BLOCK_K] tile is decoded, scaled per 16-block, cast to
    x.dtype and fed to tl.dot (fp32 accumulation). Programs walk GROUP_M row tiles per column tile (L2 reuse)."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % size_m
    pid_n = (pid % (GROUP_M * tiles_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    xm, wn = tl.minimum(rm, M - 1), tl.minimum(rn, N - 1)
    rk = tl.arange(0, BLOCK_K)
    g = tl.arange(0, BLOCK_K // 16)
    byte = tl.arange(0, 8)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + xm[:, None] * stride_xm + (k0 + rk)[None, :], mask=(k0 + rk)[None, :] < K, other=0.0)
        gk = k0 // 16 + g
        ok = gk < K // 16
        p = tl.load(P + wn[:, None, None] * stride_p + gk[None, :, None] * 8 + byte[None, None, :],
                    mask=ok[None, :, None], other=0)
        s = tl.load(S + wn[:, None] * stride_s + gk[None, :], mask=ok[None, :], other=0.0).to(tl.float32)
        lo, hi = _e2m1_as_e4m3(p)
        s = (s * E4M3_UNIT)[:, :, None]
        w = tl.reshape(tl.join(lo * s, hi * s), [BLOCK_N, BLOCK_K]).to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc)
    acc *= tl.load(TS + wn * ts_stride)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + wn).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit(do_not_specialize=["ts_stride"])
def _dequantize_kernel(P, S, TS, OUT, N, K, stride_p, stride_s, stride_o, ts_stride,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[BLOCK_N, BLOCK_K] tile = e2m1 x (tensor_scale x block_scale), in float32 as codec.dequantize, then cast."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1) * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
    byte = tl.arange(0, 8)
    ok = (rows[:, None] < N) & (g[None, :] < K // 16)
    p = tl.load(P + rows[:, None, None] * stride_p + g[None, :, None] * 8 + byte[None, None, :], mask=ok[:, :, None],
                other=0)
    s = tl.load(S + rows[:, None] * stride_s + g[None, :], mask=ok, other=0.0).to(tl.float32)
    scale = (tl.load(TS + rows * ts_stride, mask=rows < N, other=0.0)[:, None] * s)[:, :, None]
    lo, hi = _e2m1_as_e4m3(p)
    values = tl.join(lo * E4M3_UNIT * scale, hi * E4M3_UNIT * scale)  # [BLOCK_N, BLOCK_K/16, 8, 2]: K order
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(OUT + rows[:, None] * stride_o + cols[None, :],
             tl.reshape(values, [BLOCK_N, BLOCK_K]).to(OUT.dtype.element_ty),
             mask=(rows[:, None] < N) & (cols[None, :] < K))


def _check(x_k: int, packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor,
           bias: torch.Tensor | None, where: str) -> tuple[int, int]:
    n, k = packed.shape[0], packed.shape[1] * 2
    if packed.dtype != torch.uint8 or block_scale.dtype != torch.float8_e4m3fn:
        raise QwenlabError(f"{where}: packed must be uint8 and block_scale float8_e4m3fn, got {packed.dtype} and "
                           f"{block_scale.dtype}")
    if k % 16 or tuple(block_scale.shape) != (n, k // 16):
        raise QwenlabError(f"{where}: packed {list(packed.shape)} and block_scale {list(block_scale.shape)} do not "
                           f"describe an NVFP4 weight [N, K] with K a multiple of 16")
    if x_k != k:
        raise QwenlabError(f"{where}: x has {x_k} features, the weight has K = {k}")
    if packed.stride(1) != 1 or block_scale.stride(1) != 1:
        raise QwenlabError(f"{where}: packed and block_scale must be contiguous along K")
    if tensor_scale.dtype != torch.float32 or tensor_scale.numel() not in (1, n) or tensor_scale.dim() > 1:
        raise QwenlabError(f"{where}: tensor_scale must be a float32 scalar or vector [{n}], got "
                           f"{tensor_scale.dtype} {list(tensor_scale.shape)}")
    if bias is not None and bias.shape != (n,):
        raise QwenlabError(f"{where}: bias has shape {list(bias.shape)}, expected [{n}]")
    return n, k


def gemv_split(n: int, k: int) -> int:
    """Split-K factor of nvfp4_gemv. Under 4096 rows too few programs fill 132 SMs: halve K until about 8192
    rows x splits are in flight or a split would hold under 64 blocks of 16 (measured on an H200: 4096 rows and up
    are faster unsplit)."""
    split, blocks = 1, k // 16
    while n < 4096 and split < 8 and n * split < 8192 and blocks // (2 * split) >= 64:
        split *= 2
    return split


def _ts_stride(tensor_scale: torch.Tensor) -> int:
    """0: one tensor scale for every row; else the per-row vector's stride (a runtime value: one compiled kernel)."""
    return tensor_scale.stride(0) if tensor_scale.dim() == 1 and tensor_scale.numel() > 1 else 0


@torch.library.custom_op("qwenlab::nvfp4_gemv", mutates_args=())
def nvfp4_gemv(x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T for ONE row x ([K], [1, K], [1, 1, K]; bf16/fp16/fp32) -> [..., N] in x.dtype. Reads each packed
    byte and block scale once; fp32 accumulation; tensor_scale: float32 scalar or per-row vector [N]."""
    n, k = _check(x.shape[-1], packed, block_scale, tensor_scale, bias, "nvfp4_gemv")
    if x.numel() != k:
        raise QwenlabError(f"nvfp4_gemv: x {list(x.shape)} holds more than one row (use nvfp4_gemm)")
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    row = x.reshape(k).contiguous()
    words = row.dtype == torch.bfloat16 and row.data_ptr() % 4 == 0
    split = gemv_split(n, k)
    partial = torch.empty(split, n, dtype=torch.float32, device=x.device) if split > 1 else y
    b = bias if bias is not None else y
    _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)](
        row.view(torch.int32) if words else row, packed, block_scale, tensor_scale, b, y, partial, n, k,
        packed.stride(0), block_scale.stride(0), _ts_stride(tensor_scale), X_WORDS=words, HAS_BIAS=bias is not None,
        SPLIT=split)
    if split > 1:
        _gemv_finish_kernel[(triton.cdiv(n, 1024),)](partial, tensor_scale, b, y, n, _ts_stride(tensor_scale),
                                                     HAS_BIAS=bias is not None, SPLIT=split, BLOCK=1024)
    return y.reshape(*x.shape[:-1], n)


@nvfp4_gemv.register_fake
def _(x, packed, block_scale, tensor_scale, bias=None):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("qwenlab::nvfp4_gemm", mutates_args=())
def nvfp4_gemm(x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T for x [..., K] in bf16/fp16 -> [..., N] in x.dtype (W4A16 GEMM: W tiles dequantized to x.dtype
    in registers, exactly; fp32 accumulation; the tensor scale, scalar or per-row [N], applied at the end)."""
    n, k = _check(x.shape[-1], packed, block_scale, tensor_scale, bias, "nvfp4_gemm")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise QwenlabError(f"nvfp4_gemm: x must be bfloat16 or float16 (tensor-core operands), got {x.dtype}")
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    _gemm_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
        x2, packed, block_scale, tensor_scale, bias if bias is not None else y, y, m, n, k,
        min(triton.next_power_of_2(m), 4096), x2.stride(0), packed.stride(0), block_scale.stride(0), y.stride(0),
        _ts_stride(tensor_scale), HAS_BIAS=bias is not None)
    return y.reshape(*x.shape[:-1], n)


@nvfp4_gemm.register_fake
def _(x, packed, block_scale, tensor_scale, bias=None):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def dequantize_into(out: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor,
                    tensor_scale: torch.Tensor) -> torch.Tensor:
    """Writes the weight [N, K] into the preallocated out (any float dtype, stride 1 along K) and returns it:
    computed in float32 as codec.dequantize does (tensor_scale x block_scale, times e2m1), then cast once."""
    n, k = _check(packed.shape[1] * 2, packed, block_scale, tensor_scale, None, "dequantize_into")
    if tuple(out.shape) != (n, k) or out.stride(1) != 1:
        raise QwenlabError(f"dequantize_into: out {list(out.shape)} must be [{n}, {k}] with stride 1 along K")
    grid = (triton.cdiv(n, DEQUANT_BLOCK_N), triton.cdiv(k, DEQUANT_BLOCK_K))
    _dequantize_kernel[grid](packed, block_scale, tensor_scale, out, n, k, packed.stride(0), block_scale.stride(0),
                             out.stride(0), _ts_stride(tensor_scale), BLOCK_N=DEQUANT_BLOCK_N,
                             BLOCK_K=DEQUANT_BLOCK_K)
    return out
