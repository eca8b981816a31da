"""NVFP4 weights on GPUs without FP4 tensor cores (Hopper): Triton kernels that read the packed codes and the E4M3
block scales once and dequantize in registers (W4A16: the activations stay bf16/fp16/fp32).

Layout (qwenlab.quant.codec): weight [N, K] as packed uint8 [N, K/2] (element 2i in the low nibble of byte i),
block_scale float8_e4m3fn [N, K/16], tensor_scale float32, a scalar or a vector [N] (one per output row, e.g. a
fused q/k/v whose parts had different tensor scales). value = e2m1(code) x block_scale x tensor_scale.

A nibble s|e1 e0|m is decoded without a table, by moving its bits into a float: as float32 bits (sign -> bit 31,
e1 e0 m -> bits 24..22) it reads as exactly e2m1 x 2^-126 (GEMV: the packed codes read as int32 words, each nibble
shifted to the top, shifted back arithmetically and masked, three integer instructions); as an FP8 E4M3 byte
(sign -> bit 7, e1 e0 m -> bits 4..2) as e2m1 x 2^-6, converted by the hardware (GEMM, dequantize). Code 1 (0.5)
lands on a subnormal either way, which is exact; the power of two is folded into a later multiply.

Speed on an H200 (doc/nvfp4.md): the GEMV reads the packed weights at 20-39% of the copy bandwidth, 1.3-1.7x
faster than bf16 cuBLAS on the same shapes, fastest with X_VEC (x as 16-byte loads). Its loop spends 54-57
instructions per int32 word (bench/nvfp4_gemv_sass.py), yet qwenlab.quant.mma_nvfp4, a tensor-core GEMV at 33, is
no faster there. qwenlab.quant.wide_nvfp4 (16-byte weight loads) is 1.16x faster than this one over a layer's four
projections and runs by default on CUDA; gemv_engine says which GEMV runs.

    nvfp4_gemv       one row (batch-1 decode), fp32 accumulation, the tensor scale applied once at the end;
                     split-K with a second, atomic-free pass under 4096 rows (gemv_split)
    nvfp4_gemv_parts the same for 1-3 weights in one launch, outputs concatenated (q/k/v, gate/up)
    nvfp4_gemm       M rows (prefill): W tiles dequantized to x.dtype (exact: e2m1 x E4M3 fits in 8 bits), tl.dot
    dequantize_into  the whole weight into a preallocated buffer, bit-identical to codec.dequantize; 1 or more
                     weights of the same K into one buffer (dequantize_parts_into), or groups of any K, one view
                     each (dequantize_groups: a prefill's layer in one launch); each launch reads its weights'
                     addresses and shapes from a table made once per set of weights (dequantize_plan)
"""
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from qwenlab.errors import QwenlabError
from qwenlab.quant.autotuning import AUTOTUNE

try:  # Programmatic Dependent Launch, Triton 3.4+: only the kernels compiled with PDL=True call these
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

# The H200's fastest tiles (bench/nvfp4_gemv_sweep.py; doc/evidence/nvfp4-decode-h200/): 4x32 with X_VEC first on
# every decode shape (q/k/v, o, gate/up, down), then 4x32, 8x32 and 8x16 without it. FLAT measured no faster.
GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "GROUPS": g, "X_VEC": v, "FLAT": False}, num_warps=w, num_stages=1)
                for n, g, w, v in [(4, 32, 1, True), (4, 32, 1, False), (8, 32, 2, False), (8, 16, 1, False)]]
GEMM_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
                for m, n, k, w, s in [(16, 32, 256, 2, 3), (16, 64, 128, 4, 4), (32, 64, 128, 4, 4),
                                      (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                      (256, 128, 64, 8, 3)]]
if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU interpreter cannot benchmark: one config each, no tuning
    GEMV_CONFIGS, GEMM_CONFIGS = GEMV_CONFIGS[:1], GEMM_CONFIGS[:1]
DEQUANT_BLOCK_N, DEQUANT_BLOCK_K = 32, 256
MMA_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 128, "WARPS": 2}  # the tensor-core GEMV's tile (qwenlab.quant.mma_nvfp4)
E4M3_UNIT = tl.constexpr(64.0)  # a nibble decoded through E4M3 reads e2m1 x 2^-6
X_SCALE = tl.constexpr(9.223372036854775808e18)  # 2^63
E2M1_BITS = tl.constexpr(-0x7E400000)  # 0x81C00000 as int32: bit 31 (sign) and bits 24..22 (e1 e0 m)


@triton.jit
def _e2m1_as_e4m3(p):
    """uint8 bytes -> (low nibble, high nibble) as float32 e2m1 x 2^-6 (exact)."""
    lo = ((p & 0x08) << 4) | ((p & 0x07) << 2)
    hi = (p & 0x80) | ((p >> 2) & 0x1C)
    return (lo.to(tl.float8e4nv, bitcast=True).to(tl.float32), hi.to(tl.float8e4nv, bitcast=True).to(tl.float32))


@triton.jit
def _bf16_pair(pair):
    """Two bf16 x values in one int32 word (element 2i in the low half) -> float32, scaled by 2^63 so that the
    products with the decoded weights stay normal floats."""
    x_even = (pair << 16).to(tl.float32, bitcast=True) * X_SCALE
    x_odd = (pair & 0xFFFF0000).to(tl.float32, bitcast=True) * X_SCALE
    return x_even, x_odd


@triton.jit
def _x_pair(X, word, ok, byte: tl.constexpr, X_WORDS: tl.constexpr):
    """The x values of byte `byte` of each packed word `word` (elements 8 word + 2 byte and the next), scaled as
    _bf16_pair. X_WORDS: x is bf16 read as int32 words, else any float dtype read per element."""
    if X_WORDS:
        return _bf16_pair(tl.load(X + word * 4 + byte, mask=ok, other=0).to(tl.uint32, bitcast=True))
    element = word * 8 + 2 * byte
    return (tl.load(X + element, mask=ok, other=0.0).to(tl.float32) * X_SCALE,
            tl.load(X + element + 1, mask=ok, other=0.0).to(tl.float32) * X_SCALE)


@triton.jit
def _products(words, x_even, x_odd, byte: tl.constexpr):
    """Byte `byte` of each int32 word (elements 2i and 2i + 1) times its x values, float32 (x broadcast over the
    rows). Nibble j of a word is moved to the top bits, shifted back arithmetically by 6 and masked: sign at bit 31,
    e1 e0 m at bits 24..22, i.e. the float32 e2m1 x 2^-126 in three integer instructions, with all eight elements of
    a word in the thread that loaded it."""
    w_even = (((words << (28 - 8 * byte)) >> 6) & E2M1_BITS).to(tl.float32, bitcast=True)
    w_odd = (((words << (24 - 8 * byte)) >> 6) & E2M1_BITS).to(tl.float32, bitcast=True)
    return w_even * x_even[None] + w_odd * x_odd[None]


@triton.jit
def _gemv_step(X, P, S, src, stride_p, stride_s, gk, ok, X_WORDS: tl.constexpr, X_VEC: tl.constexpr,
               EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """The rows `src` times x over the 16-element blocks gk: [BLOCK_N, GROUPS] float32 sums, block scale applied.
    Each block is two int32 words of 8 nibbles + 1 E4M3 scale. With bf16 x (X_WORDS), X_VEC reads each word's 8 x
    values as one 16-byte load and splits them in registers, else 4 loads of one pair each."""
    words, s = _gemv_step_weights(P, S, src, stride_p, stride_s, gk, ok, EVEN_K)
    return _gemv_step_x(X, words, s, gk, ok, X_WORDS, X_VEC, BLOCK_N, GROUPS)


@triton.jit
def _gemv_step_weights(P, S, src, stride_p, stride_s, gk, ok, EVEN_K: tl.constexpr):
    """_gemv_step's weight loads: the packed words [BLOCK_N, GROUPS, 2] and the block scales [BLOCK_N, GROUPS]."""
    half = tl.arange(0, 2)  # the block's two words
    pointers = P + src[:, None, None] * stride_p + gk[None, :, None] * 2 + half[None, None, :]
    if EVEN_K:
        words = tl.load(pointers, eviction_policy="evict_first")
    else:
        words = tl.load(pointers, mask=ok[None, :, None], other=0, eviction_policy="evict_first")
    s = tl.load(S + src[:, None] * stride_s + gk[None, :], mask=ok[None, :], other=0.0,
                eviction_policy="evict_first").to(tl.float32)
    return words, s


@triton.jit
def _gemv_step_x(X, words, s, gk, ok, X_WORDS: tl.constexpr, X_VEC: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUPS: tl.constexpr):
    """_gemv_step's x loads and arithmetic, given the step's words and block scales."""
    half = tl.arange(0, 2)  # the block's two words
    word_index = gk[:, None] * 2 + half[None, :]  # [GROUPS, 2]
    if X_WORDS and X_VEC:
        quads = tl.load(X + word_index[:, :, None] * 4 + tl.arange(0, 4)[None, None, :], mask=ok[:, None, None],
                        other=0).to(tl.uint32, bitcast=True)  # [GROUPS, 2, 4]: pair i of each word
        even_pairs, odd_pairs = tl.split(tl.reshape(quads, [GROUPS, 2, 2, 2]))  # pairs 0, 2 and 1, 3
        pair0, pair2 = tl.split(even_pairs)
        pair1, pair3 = tl.split(odd_pairs)
        x_even, x_odd = _bf16_pair(pair0)
        part = _products(words, x_even, x_odd, 0)
        x_even, x_odd = _bf16_pair(pair1)
        part += _products(words, x_even, x_odd, 1)
        x_even, x_odd = _bf16_pair(pair2)
        part += _products(words, x_even, x_odd, 2)
        x_even, x_odd = _bf16_pair(pair3)
        part += _products(words, x_even, x_odd, 3)
    else:
        part = tl.zeros([BLOCK_N, GROUPS, 2], tl.float32)
        for byte in tl.static_range(4):  # byte i of each word: elements 2i (low nibble) and 2i + 1
            x_even, x_odd = _x_pair(X, word_index, ok[:, None], byte, X_WORDS)
            part += _products(words, x_even, x_odd, byte)
    return tl.sum(part, axis=2) * s


@triton.jit
def _gemv_step_flat(X, P, S, src, stride_p, stride_s, w, ok, unit, X_WORDS: tl.constexpr, EVEN_K: tl.constexpr,
                    BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    """As _gemv_step, over the words w (two per block) as one axis: [BLOCK_N, WORDS] float32 sums, each word's
    block scale applied. `unit` is a runtime 1: multiplied into the word and scale offsets it hides their
    contiguity from the compiler, so that every load (words, scales, x) is one value per thread in the same layout
    and nothing is exchanged through shared memory (vectorised word loads put x in another layout, converted at
    every step)."""
    offsets = src[:, None] * stride_p + w[None, :] * unit
    if EVEN_K:
        words = tl.load(P + offsets, eviction_policy="evict_first")
    else:
        words = tl.load(P + offsets, mask=ok[None, :], other=0, eviction_policy="evict_first")
    s = tl.load(S + src[:, None] * stride_s + (w[None, :] // 2) * unit, mask=ok[None, :], other=0.0,
                eviction_policy="evict_first").to(tl.float32)
    part = tl.zeros([BLOCK_N, WORDS], tl.float32)
    for byte in tl.static_range(4):  # byte i of each word: elements 2i (low nibble) and 2i + 1
        x_even, x_odd = _x_pair(X, w, ok, byte, X_WORDS)
        part += _products(words, x_even, x_odd, byte)
    return part * s


@triton.jit
def _gemv_tile(X, P, S, TS, B, Y, PARTIAL, tile, N, K, N_ALL, stride_p, stride_s, ts_stride, y_offset, unit,
               X_WORDS: tl.constexpr, X_VEC: tl.constexpr, FLAT: tl.constexpr, HAS_BIAS: tl.constexpr,
               SPLIT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
               PDL: tl.constexpr = False, PDL_WAIT_FIRST: tl.constexpr = False):
    """Rows tile*BLOCK_N.. of one weight over this program's 1/SPLIT of K, written at y_offset + row of Y (or of
    each PARTIAL row, [SPLIT, N_ALL]). FLAT: the step's words as one axis, loaded one per thread
    (_gemv_step_flat); else [blocks, 2 words] with the two words of a block in one thread (_gemv_step).
    PDL: waits for the previous kernel (gdc_wait) after the first step's words and scales are read, before x is
    (PDL_WAIT_FIRST, or FLAT: before any load)."""
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    src = tl.minimum(rows, N - 1)  # the tail program re-reads the last row instead of masking every load
    chunk = tl.cdiv(tl.cdiv(K // 16, SPLIT), GROUPS) * GROUPS
    first = tl.program_id(1) * chunk
    blocks = tl.minimum(K // 16, first + chunk)
    if FLAT:
        if PDL:
            gdc_wait()
        w = tl.arange(0, 2 * GROUPS)
        acc = tl.zeros([BLOCK_N, 2 * GROUPS], tl.float32)
        for g0 in range(first, blocks, GROUPS):
            wk = 2 * g0 + w
            acc += _gemv_step_flat(X, P, S, src, stride_p, stride_s, wk, wk < 2 * blocks, unit, X_WORDS, EVEN_K,
                                   BLOCK_N, 2 * GROUPS)
    else:
        g = tl.arange(0, GROUPS)
        if PDL:  # the first step by hand: its weights read before the wait, x after
            gk = first + g
            if PDL_WAIT_FIRST:
                gdc_wait()
            words, s = _gemv_step_weights(P, S, src, stride_p, stride_s, gk, gk < blocks, EVEN_K)
            if not PDL_WAIT_FIRST:
                gdc_wait()
            acc = tl.zeros([BLOCK_N, GROUPS], tl.float32)
            acc += _gemv_step_x(X, words, s, gk, gk < blocks, X_WORDS, X_VEC, BLOCK_N, GROUPS)
            g_first = first + GROUPS
        else:
            acc = tl.zeros([BLOCK_N, GROUPS], tl.float32)
            g_first = first
        for g0 in range(g_first, blocks, GROUPS):
            gk = g0 + g
            acc += _gemv_step(X, P, S, src, stride_p, stride_s, gk, gk < blocks, X_WORDS, X_VEC, EVEN_K, BLOCK_N,
                              GROUPS)
    if SPLIT > 1:
        tl.store(PARTIAL + tl.program_id(1) * N_ALL + y_offset + rows, tl.sum(acc, axis=1), mask=rows < N)
    else:
        y = tl.sum(acc, axis=1) * (tl.load(TS + src * ts_stride) * X_SCALE)  # 2^-126 x 2^63 x 2^63 = 1
        if HAS_BIAS:
            y += tl.load(B + src).to(tl.float32)
        tl.store(Y + y_offset + rows, y.to(Y.dtype.element_ty), mask=rows < N)


@triton.autotune(configs=GEMV_CONFIGS, key=["N0", "N1", "N2", "K", "SPLIT"], **AUTOTUNE)
@triton.heuristics({"EVEN_K": lambda args: args["SPLIT"] == 1 and (args["K"] // 16) % args["GROUPS"] == 0})
@triton.jit(do_not_specialize=["ts_stride0", "ts_stride1", "ts_stride2", "unit"])
def _gemv_kernel(X, P0, S0, TS0, P1, S1, TS1, P2, S2, TS2, B, Y, PARTIAL, N0, N1, N2, K,
                 stride_p0, stride_s0, ts_stride0, stride_p1, stride_s1, ts_stride1, stride_p2, stride_s2, ts_stride2,
                 unit,
                 PARTS: tl.constexpr, X_WORDS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                 EVEN_K: tl.constexpr, X_VEC: tl.constexpr, FLAT: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUPS: tl.constexpr, PDL: tl.constexpr = False, PDL_WAIT_FIRST: tl.constexpr = False):
    """y = x @ [W0; W1; W2].T for PARTS (1-3) weights of the same K, one launch: the row tiles of W0, then W1's,
    then W2's (a fused q/k/v or gate/up without a fused copy of the weights). Split-K only with one part.
    PDL (launch with launch_pdl=True; bench/gemv_pdl.py): the next kernel may launch once every program has started;
    each program reads its first weights before waiting for the previous kernel (_gemv_tile). PDL False: the
    kernel as without these two parameters."""
    pid = tl.program_id(0)
    if PDL:
        gdc_launch_dependents()
    n_all = N0 + N1 + N2
    if PARTS == 1:
        _gemv_tile(X, P0, S0, TS0, B, Y, PARTIAL, pid, N0, K, n_all, stride_p0, stride_s0, ts_stride0, 0,
                   unit, X_WORDS, X_VEC, FLAT, HAS_BIAS, SPLIT, EVEN_K, BLOCK_N, GROUPS, PDL, PDL_WAIT_FIRST)
    else:
        tiles0 = tl.cdiv(N0, BLOCK_N)
        tiles1 = tl.cdiv(N1, BLOCK_N)
        if pid < tiles0:
            _gemv_tile(X, P0, S0, TS0, B, Y, PARTIAL, pid, N0, K, n_all, stride_p0, stride_s0, ts_stride0, 0,
                       unit, X_WORDS, X_VEC, FLAT, False, 1, EVEN_K, BLOCK_N, GROUPS, PDL, PDL_WAIT_FIRST)
        elif PARTS == 2 or pid < tiles0 + tiles1:
            _gemv_tile(X, P1, S1, TS1, B, Y, PARTIAL, pid - tiles0, N1, K, n_all, stride_p1, stride_s1, ts_stride1,
                       N0, unit, X_WORDS, X_VEC, FLAT, False, 1, EVEN_K, BLOCK_N, GROUPS, PDL, PDL_WAIT_FIRST)
        else:
            _gemv_tile(X, P2, S2, TS2, B, Y, PARTIAL, pid - tiles0 - tiles1, N2, K, n_all, stride_p2, stride_s2,
                       ts_stride2, N0 + N1, unit, X_WORDS, X_VEC, FLAT, False, 1, EVEN_K, BLOCK_N, GROUPS, PDL,
                       PDL_WAIT_FIRST)


@triton.jit(do_not_specialize=["ts_stride"])
def _gemv_finish_kernel(PARTIAL, TS, B, Y, N, ts_stride, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                        BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr = True, PDL: tl.constexpr = False):
    """y = (sum of the SPLIT partial rows) x tensor_scale (+ bias), cast to Y's dtype: split-K's second pass
    (HAS_SCALE False: the partial rows carry the tensor scale already). PDL: as _gemv_kernel's, waiting first."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    total = tl.sum(tl.load(PARTIAL + tl.arange(0, SPLIT)[:, None] * N + rows[None, :], mask=ok[None, :], other=0.0),
                   axis=0)
    y = total
    if HAS_SCALE:
        y = total * (tl.load(TS + rows * ts_stride, mask=ok, other=0.0) * X_SCALE)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=ok)


@triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K"], **AUTOTUNE)
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


@triton.jit
def _dequantize_tile(P, S, TS, OUT, N, K, stride_p, stride_s, stride_o, ts_stride, tile, column,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[BLOCK_N, BLOCK_K] tile (row tile `tile`, column tile `column`) = e2m1 x (tensor_scale x block_scale), in
    float32 as codec.dequantize, then cast."""
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    g = column * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
    byte = tl.arange(0, 8)
    ok = (rows[:, None] < N) & (g[None, :] < K // 16)
    p = tl.load(P + rows[:, None, None] * stride_p + g[None, :, None] * 8 + byte[None, None, :], mask=ok[:, :, None],
                other=0)
    s = tl.load(S + rows[:, None] * stride_s + g[None, :], mask=ok, other=0.0).to(tl.float32)
    scale = (tl.load(TS + rows * ts_stride, mask=rows < N, other=0.0)[:, None] * s)[:, :, None]
    lo, hi = _e2m1_as_e4m3(p)
    values = tl.join(lo * E4M3_UNIT * scale, hi * E4M3_UNIT * scale)  # [BLOCK_N, BLOCK_K/16, 8, 2]: K order
    cols = column * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(OUT + rows[:, None] * stride_o + cols[None, :],
             tl.reshape(values, [BLOCK_N, BLOCK_K]).to(OUT.dtype.element_ty),
             mask=(rows[:, None] < N) & (cols[None, :] < K))


PLAN_FIELDS = tl.constexpr(12)  # int64 fields of each weight in a dequantize plan's table (DequantizePlan)


@triton.jit
def _dequantize_kernel(PLAN, OUT, PARTS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """The weights of a plan into OUT, one tile [BLOCK_N, BLOCK_K] a program: the first weight's tiles, then the
    next one's... Each weight is a row of the plan's table: its packed, block_scale and tensor_scale addresses,
    tensor-scale stride, rows N, K, where its [N, K] starts in OUT and OUT's row stride there (elements), packed and
    block-scale row strides, its first program and its column tiles. ALIGNED: the addresses, offsets and row strides
    allow 16-byte loads and stores (checked when the plan is made)."""
    pid = tl.program_id(0)
    part = 0
    for i in tl.static_range(1, PARTS):
        part += (pid >= tl.load(PLAN + i * PLAN_FIELDS + 10)).to(tl.int32)
    fields = PLAN + part * PLAN_FIELDS
    P = tl.load(fields).to(tl.pointer_type(tl.uint8))
    S = tl.load(fields + 1).to(tl.pointer_type(tl.float8e4nv))
    TS = tl.load(fields + 2).to(tl.pointer_type(tl.float32))
    out, stride_o = tl.load(fields + 6), tl.load(fields + 7)
    stride_p, stride_s, K = tl.load(fields + 8), tl.load(fields + 9), tl.load(fields + 5)
    if ALIGNED:
        P, S = tl.multiple_of(P, 16), tl.multiple_of(S, 16)
        out, stride_o = tl.multiple_of(out, 16), tl.multiple_of(stride_o, 16)
        stride_p, stride_s, K = tl.multiple_of(stride_p, 16), tl.multiple_of(stride_s, 16), tl.multiple_of(K, 16)
    tile, columns = pid - tl.load(fields + 10), tl.load(fields + 11)
    _dequantize_tile(P, S, TS, OUT + out, tl.load(fields + 4), K, stride_p, stride_s, stride_o, tl.load(fields + 3),
                     tile // columns, tile % columns, BLOCK_N, BLOCK_K)


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


def _words(packed: torch.Tensor, where: str) -> torch.Tensor:
    if packed.data_ptr() % 4 or packed.stride(0) % 4:
        raise QwenlabError(f"{where}: packed must start and have its rows at multiples of 4 bytes (it is read as "
                           f"int32 words), got offset {packed.data_ptr() % 4} and row stride {packed.stride(0)}")
    return packed.view(torch.int32)


GEMV_ENGINES = ("wide", "fma", "mma")


def gemv_engine(x: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """Which GEMV runs for this one-row x, as QWENLAB_NVFP4_GEMV asks (default "wide") where it can run:
    "wide" (qwenlab.quant.wide_nvfp4: 16-byte loads, the fastest on an H200, doc/nvfp4.md) and "mma"
    (qwenlab.quant.mma_nvfp4 on bf16 tensor cores, bf16 x only) are Gluon kernels for CUDA compute capability 8.0
    or newer without a bias; else "fma", the Triton kernel below (any device Triton runs on, its CPU interpreter
    included)."""
    asked = os.environ.get("QWENLAB_NVFP4_GEMV", "wide")
    if asked not in GEMV_ENGINES:
        raise QwenlabError(f"QWENLAB_NVFP4_GEMV={asked!r}: choose one of {', '.join(GEMV_ENGINES)}")
    if (asked == "fma" or bias is not None or x.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
            or torch.cuda.get_device_capability(x.device) < (8, 0)):
        return "fma"
    if asked == "mma" and x.dtype != torch.bfloat16:
        return "fma"
    return asked


def mma_split(tiles: int, warps: int, k: int, block_k: int) -> int:
    """Split-K factor of the tensor-core GEMV: halve K until about 1024 warps are in flight (8 per SM of an H200) or
    a slice would hold fewer than 2 steps of block_k."""
    split, steps = 1, triton.cdiv(k, block_k)
    while tiles * warps * split < 1024 and steps // (2 * split) >= 2:
        split *= 2
    return split


def _part_args(weights: list, ns: list, where: str) -> list[tuple]:
    """The three weight slots of a GEMV launch, each (packed words, block_scale, tensor_scale, rows, packed row
    stride in words, scale row stride, tensor-scale stride); unused slots repeat the first weight with 0 rows."""
    parts = []
    for (p, s, ts), n_i in zip(weights, ns):
        parts.append((_words(p, where), s, ts, n_i, p.stride(0) // 4, s.stride(0), _ts_stride(ts)))
    return parts + [parts[0][:3] + (0,) + parts[0][4:]] * (3 - len(parts))


def _mma_gemv(row: torch.Tensor, weights: list, ns: list, y: torch.Tensor, config: dict | None) -> None:
    """nvfp4 GEMV of 1-3 weights on tensor cores (qwenlab.quant.mma_nvfp4) into y; split-K sums through the
    finish pass (the partial rows already carry the tensor scale)."""
    from qwenlab.quant import mma_nvfp4  # Gluon: compiled only on a GPU

    config = {**MMA_CONFIG, **(config or {})}
    block_n, block_k, warps = config["BLOCK_N"], config["BLOCK_K"], config["WARPS"]
    k, n = row.shape[0], y.shape[0]
    tiles = sum(triton.cdiv(n_i, block_n) for n_i in ns)
    split = config.get("SPLIT") or mma_split(tiles, warps, k, block_k)
    partial = torch.empty(split, n, dtype=torch.float32, device=row.device) if split > 1 else y
    (p0, s0, t0, n0, sp0, ss0, st0), (p1, s1, t1, n1, sp1, ss1, st1), (p2, s2, t2, n2, sp2, ss2, st2) = \
        _part_args(weights, ns, "nvfp4 GEMV")
    mma_nvfp4.mma_gemv_kernel[(tiles, split)](
        row, p0, s0, t0, p1, s1, t1, p2, s2, t2, y, partial, n0, n1, n2, k, sp0, ss0, st0, sp1, ss1, st1, sp2, ss2,
        st2, PARTS=len(weights), SPLIT=split, EVEN_K=k % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k,
        WARPS=warps, L3=mma_nvfp4.operand_layout(block_n, block_k, warps), num_warps=warps)
    if split > 1:
        _gemv_finish_kernel[(triton.cdiv(n, 1024),)](partial, partial, y, y, n, 0, HAS_BIAS=False, HAS_SCALE=False,
                                                     SPLIT=split, BLOCK=1024)


# The wide GEMV's tiles (bench/nvfp4_gemv_sweep.py, doc/evidence/nvfp4-wide-h200/): per thread RN rows x VW words,
# TN lanes along the rows; 4 rows a thread over 2 warps for gate/up-sized launches, 2 over 4 warps for the rest,
# whose block scales are read two at a time (S_PAIRS) and whose split along K sums itself (FINISH: no second kernel)
WIDE_CONFIGS = {"small": {"RN": 2, "VW": 4, "TN": 2, "WARPS": 4, "S_PAIRS": True},
                "large": {"RN": 4, "VW": 4, "TN": 2, "WARPS": 2, "S_PAIRS": False}}
WIDE_LARGE_N = 16384


def wide_config(n: int, config: dict | None = None) -> dict:
    """The wide GEMV's tile for n output rows in all, with `config`'s keys (benches) over it."""
    return {"PREFETCH": False, "FINISH": True, **WIDE_CONFIGS["large" if n >= WIDE_LARGE_N else "small"],
            **(config or {})}


def wide_tile(config: dict) -> tuple[int, int]:
    """(BLOCK_N, BW) of a wide GEMV tile: rows and packed words per step."""
    return config["RN"] * config["TN"] * config["WARPS"], config["VW"] * (32 // config["TN"])


SPLIT_COUNTERS = 1 << 16  # row tiles a split-K launch that sums its own partial rows can have
_COUNTERS: dict = {}


def _split_counters(device: torch.device) -> torch.Tensor:
    """Per-device int32 counters, zero between launches: a split-K program counts itself done on its row tile's
    counter, and the tile's last one sums the partial rows and sets the counter back to zero (wide_nvfp4 FINISH).
    Made once per device, outside any CUDA graph capture where possible (the engine's warm-up call)."""
    key = str(device)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(SPLIT_COUNTERS, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def _wide_gemv(row: torch.Tensor, weights: list, ns: list, y: torch.Tensor, config: dict | None) -> None:
    """nvfp4 GEMV of 1-3 weights with 16-byte loads (qwenlab.quant.wide_nvfp4) into y; one weight split along K
    as nvfp4_gemv (gemv_split), the tensor-scaled partial rows summed in the kernel (FINISH) or by the finish
    pass."""
    from qwenlab.quant import wide_nvfp4  # Gluon: compiled only on a GPU

    k, n = row.shape[0], y.shape[0]
    config = wide_config(n, config)
    block_n, bw = wide_tile(config)
    tiles = sum(triton.cdiv(n_i, block_n) for n_i in ns)
    split = config.get("SPLIT") or (gemv_split(n, k) if len(weights) == 1 else 1)
    even = (k // 8) % (bw * split) == 0
    partial = torch.empty(split, n, dtype=torch.float32, device=row.device) if split > 1 else y
    finish = split > 1 and config["FINISH"] and tiles <= SPLIT_COUNTERS
    (p0, s0, t0, n0, sp0, ss0, st0), (p1, s1, t1, n1, sp1, ss1, st1), (p2, s2, t2, n2, sp2, ss2, st2), pairs = \
        _wide_part_args(weights, ns, k, config)
    wide_nvfp4.wide_gemv_kernel[(tiles, split)](
        row, p0, s0, t0, p1, s1, t1, p2, s2, t2, y, partial, _split_counters(row.device) if finish else y, n0, n1,
        n2, k, sp0, ss0, st0, sp1, ss1, st1, sp2, ss2, st2, PARTS=len(weights), SPLIT=split, EVEN_K=even,
        BLOCK_N=block_n, BW=bw, L3=wide_nvfp4.layout(config["RN"], config["VW"], config["TN"], config["WARPS"]),
        READ_ONLY=config.get("READ_ONLY", 0), PREFETCH=config["PREFETCH"] and even, FINISH=finish, S_PAIRS=pairs,
        num_warps=config["WARPS"])
    if split > 1 and not finish:
        _gemv_finish_kernel[(triton.cdiv(n, 1024),)](partial, partial, y, y, n, 0, HAS_BIAS=False, HAS_SCALE=False,
                                                     SPLIT=split, BLOCK=1024)


def _wide_part_args(weights: list, ns: list, k: int, config: dict) -> list:
    """_part_args for the wide GEMVs, then whether the block scales are read two at a time (int16, S_PAIRS: where
    each thread's four words cover whole, aligned pairs; the scales then viewed as int16)."""
    parts = _part_args(weights, ns, "nvfp4 GEMV")
    pairs = config["S_PAIRS"] and config["VW"] % 4 == 0 and (k // 16) % 2 == 0 and all(
        part[1].data_ptr() % 2 == 0 and part[1].stride(0) % 2 == 0 for part in parts)
    if pairs:
        parts = [(p, b.view(torch.int16), *rest) for p, b, *rest in parts]
    return parts + [pairs]


# The fused layer's GEMV tiles by what the GEMV does (bench/nvfp4_layer_tiles.py: the 4B decode step on an H200
# with each kind's tiles tried in turn, 1.5-12% apart): q/k/v (a norm) as the plain GEMV's small tile with its block
# scales read one by one; o and down (a residual, split along K) as its large tile with them read in pairs; gate/up
# (both weights' rows in one program) on tensor cores (PAIRS: qwenlab.quant.pair_nvfp4, 16 rows and 4 warps along K
# a program; 2.7-3.5% faster a step than its wide tile, while q/k/v was 5% and o and down 2.5% slower that way; x
# staged in one pass, ONCE: 2% more), else (a float32 x) two rows of each a thread over 2 warps
LAYER_CONFIGS = {"norm": {**WIDE_CONFIGS["small"], "S_PAIRS": False}, "residual": {**WIDE_CONFIGS["large"],
                                                                                 "S_PAIRS": True},
                 "glu": {"RN": 2, "VW": 4, "TN": 2, "WARPS": 2, "S_PAIRS": True, "PAIRS": True, "KW": 4, "ONCE": True}}


def layer_gemv_note() -> str:
    """Which GEMV each kind of fused-layer GEMV runs (LAYER_CONFIGS), for the engine's note."""
    names = {"norm": "q/k/v", "residual": "o and down", "glu": "gate/up"}
    pairs = [names[kind] for kind, config in LAYER_CONFIGS.items() if config.get("PAIRS")]
    wide = [names[kind] for kind, config in LAYER_CONFIGS.items() if not config.get("PAIRS")]
    return ((f"{' and '.join(pairs)} on tensor cores (bf16 pairs into mma.sync, a bf16 model), " if pairs else "")
            + f"{', '.join(wide)} wide-load FMA")


def layer_config(glu: bool, norm: bool, config: dict | None = None) -> dict:
    """The tile of a fused-layer GEMV (LAYER_CONFIGS), with `config`'s keys over it."""
    return {**LAYER_CONFIGS["glu" if glu else "norm" if norm else "residual"], **(config or {})}


def layer_gemv(x: torch.Tensor, weights: list, norm: torch.Tensor | None = None, eps: float = 0.0,
               residual: torch.Tensor | None = None, glu: bool = False, pdl: int = 0,
               config: dict | None = None) -> torch.Tensor:
    """A GEMV of the fused NVFP4 decoder layer (qwenlab.generation.fused_layer) for one row x [K]: x times 1-3
    weights (packed, block_scale, tensor_scale) in one launch, with RMSNorm(x) * norm as its input (norm: the norm's
    weight; eps), SiLU(gate) * up of two weights' same rows (glu: gate and up, [N] out), + residual, launched with
    PDL mode `pdl` (qwenlab.quant.pdl). The launch is the tensor-core GEMV (pair_nvfp4.pair_gemv_kernel) where the
    tile says PAIRS and x is bf16 (LAYER_CONFIGS: gate/up), else the wide-load one (wide_nvfp4.layer_gemv_kernel).
    One weight (o, down) splits K as nvfp4_gemv does, its last program per row tile summing the partial rows; glu
    does not split, nor does a norm on the wide GEMV (each program sums the squares of the x it reads; the
    tensor-core one reads all of x for them, so q/k/v may split there: config SPLIT). config: the tile (benches,
    tests)."""
    if _elsewhere(x):
        with torch.cuda.device(x.device):
            return layer_gemv(x, weights, norm, eps, residual, glu, pdl, config)
    k, ns = x.shape[-1], [p.shape[0] for p, _, _ in weights]
    if glu and (len(weights) != 2 or ns[0] != ns[1]):
        raise QwenlabError(f"layer_gemv: glu takes two weights of the same rows (gate, up), got rows {ns}")
    if residual is not None and (len(weights) != 1 or residual.numel() != ns[0]):
        raise QwenlabError(f"layer_gemv: a residual adds to one weight's rows ({ns}), got {len(weights)} weights "
                           f"and a residual of {residual.numel()}")
    n = ns[0] if glu else sum(ns)
    config = layer_config(glu, norm is not None, config)
    if config.get("PAIRS") and _pairs_fit(x, norm):
        return _pair_layer_gemv(x, weights, ns, n, k, norm, eps, residual, glu, pdl, config)
    block_n, bw = wide_tile(config)
    tiles, split = _layer_grid(n, k, ns, block_n, norm, glu, config)
    from qwenlab.quant import wide_nvfp4  # Gluon: compiled only on a GPU

    *parts, pairs = _wide_part_args(weights, ns, k, config)
    y, args = _layer_args(x, parts, n, k, split, norm, eps, residual)
    launch = {"launch_pdl": True} if pdl else {}
    if config.get("MAXNREG"):  # registers per thread at most: more programs per SM, or spills
        launch["maxnreg"] = config["MAXNREG"]
    wide_nvfp4.layer_gemv_kernel[(tiles, split)](
        *args, PARTS=len(weights), SPLIT=split, EVEN_K=(k // 8) % (bw * split) == 0, BLOCK_N=block_n, BW=bw,
        L3=wide_nvfp4.layout(config["RN"], config["VW"], config["TN"], config["WARPS"]), FINISH=split > 1,
        S_PAIRS=pairs, PRO=norm is not None, GLU=glu, RES=residual is not None, PDL=pdl, num_warps=config["WARPS"],
        **launch)
    return y


def _layer_grid(n: int, k: int, ns: list, block_n: int, norm: torch.Tensor | None, glu: bool,
                config: dict, norm_splits: bool = False) -> tuple[int, int]:
    """A layer GEMV's (row tiles, split along K) for tiles of block_n rows: one weight without a norm (o, down)
    splits K as nvfp4_gemv does unless config says SPLIT; a split sums in the kernel, which glu, more than
    SPLIT_COUNTERS row tiles or a norm (unless norm_splits: the kernel sums x's squares over all of K in every
    program) rule out (refused in one line)."""
    tiles = triton.cdiv(n, block_n) if glu else sum(triton.cdiv(n_i, block_n) for n_i in ns)
    split = config.get("SPLIT") or (gemv_split(n, k) if len(ns) == 1 and norm is None else 1)
    if split > 1 and ((norm is not None and not norm_splits) or glu or tiles > SPLIT_COUNTERS):
        raise QwenlabError(f"layer_gemv: a split along K ({split}) sums in the kernel, which a norm, glu or more "
                           f"than {SPLIT_COUNTERS} row tiles rule out")
    return tiles, split


def _layer_args(x: torch.Tensor, parts: list, n: int, k: int, split: int, norm: torch.Tensor | None, eps: float,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, list]:
    """A layer GEMV's output y [n] and the arguments its kernels (wide and pair) take before their constexprs: x,
    the norm's weight, the residual, the three weight slots (parts), y, the split's partial rows and counters, the
    rows, K, the strides and eps (unused slots: x or y)."""
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    partial = torch.empty(split, n, dtype=torch.float32, device=x.device) if split > 1 else y
    (p0, s0, t0, n0, sp0, ss0, st0), (p1, s1, t1, n1, sp1, ss1, st1), (p2, s2, t2, n2, sp2, ss2, st2) = parts
    return y, [x, norm if norm is not None else x, residual if residual is not None else y, p0, s0, t0, p1, s1, t1,
               p2, s2, t2, y, partial, _split_counters(x.device) if split > 1 else y, n0, n1, n2, k, sp0, ss0, st0,
               sp1, ss1, st1, sp2, ss2, st2, eps]


def _pairs_fit(x: torch.Tensor, norm: torch.Tensor | None) -> bool:
    """The tensor-core layer GEMV (pair_nvfp4) reads x (and the norm's weight) as bf16 pairs: bf16, 4-byte
    aligned, contiguous."""
    return all(t is None or (t.dtype == torch.bfloat16 and t.data_ptr() % 4 == 0 and t.is_contiguous())
               for t in (x, norm))


def _pair_layer_gemv(x: torch.Tensor, weights: list, ns: list, n: int, k: int, norm: torch.Tensor | None,
                     eps: float, residual: torch.Tensor | None, glu: bool, pdl: int, config: dict) -> torch.Tensor:
    """layer_gemv on tensor cores (qwenlab.quant.pair_nvfp4): 16-row programs, KW warps splitting K, VW words a
    lane and step; one weight (o, down) also split along K across programs, summed by the last (FINISH)."""
    from qwenlab.quant import pair_nvfp4  # Gluon: compiled only on a GPU

    vw, kw = config.get("VW", 4), config.get("KW", 4)
    tiles, split = _layer_grid(n, k, ns, pair_nvfp4.ROWS.value, norm, glu, config, norm_splits=True)
    steps = triton.cdiv(triton.cdiv(k // 8, split), kw * 4 * vw)  # a program's steps of K, kw * 4 * vw words each
    y, args = _layer_args(x, _part_args(weights, ns, "nvfp4 GEMV"), n, k, split, norm, eps, residual)
    launch = {"launch_pdl": True} if pdl else {}
    if config.get("MAXNREG"):  # registers per thread at most: more programs per SM, or spills
        launch["maxnreg"] = config["MAXNREG"]
    pair_nvfp4.pair_gemv_kernel[(tiles, split)](
        *args, PARTS=len(weights), SPLIT=split, STEPS=triton.next_power_of_2(steps), VW=vw, KW=kw,
        L=pair_nvfp4.layout(vw, kw), SL=pair_nvfp4.stage_layout(vw, kw), SCL=pair_nvfp4.scale_layout(vw, kw),
        FINISH=split > 1, PRO=norm is not None, GLU=glu, RES=residual is not None, PDL=pdl, LITE=config.get("LITE", 0),
        ONCE=bool(config.get("ONCE")), KSTEPS=triton.next_power_of_2(triton.cdiv(k // 8, kw * 4 * vw)),
        SL4=pair_nvfp4.once_layout(vw, kw), num_warps=kw, **launch,
        **_probes(config, x.device, tiles * split))
    return y


PROBES = {}  # device -> [int64 buffer, the next launch's record]: where tiles with PROBE write (bench/nvfp4_probe.py)
PROBE_RECORDS = 1 << 18


def _probes(config: dict, device: torch.device, programs: int) -> dict:
    """The probe argument of a tile with PROBE: the next `programs` records of the device's buffer (16 int64 each,
    pair_nvfp4._probe), a launch's own, wrapping to the start when full; else none."""
    if not config.get("PROBE"):
        return {}
    if device not in PROBES:
        PROBES[device] = [torch.zeros(PROBE_RECORDS * 16, dtype=torch.int64, device=device), 0]
    buffer, first = PROBES[device]
    if first + programs > PROBE_RECORDS:
        first = 0
    PROBES[device][1] = first + programs
    return {"PROBES": buffer[first * 16:(first + programs) * 16]}


def _elsewhere(t: torch.Tensor) -> bool:
    """t lies on a CUDA device other than the current one, where Triton launches (a layer of a model split across
    GPUs): the launchers then run again under that device."""
    return t.device.type == "cuda" and t.device.index is not None and t.device.index != torch.cuda.current_device()


def _gemv(x: torch.Tensor, weights: list, bias: torch.Tensor | None, where: str, config: dict | None = None
          ) -> torch.Tensor:
    """weights: 1-3 (packed, block_scale, tensor_scale) of the same K -> x times each, concatenated, [..., sum N].
    config (the benches): {"MMA": True, BLOCK_N, BLOCK_K, WARPS[, SPLIT]} for the tensor-core GEMV, {"WIDE": True,
    RN, VW, TN, WARPS[, SPLIT, FINISH, S_PAIRS, PREFETCH, READ_ONLY]} for the wide one (wide_config), else BLOCK_N,
    GROUPS, X_VEC, FLAT, num_warps, num_stages of the FMA one, instead of the defaults / the autotuner."""
    if _elsewhere(x):
        with torch.cuda.device(x.device):
            return _gemv(x, weights, bias, where, config)
    k = x.shape[-1]
    ns = [_check(k, *w, bias, where)[0] for w in weights]
    if x.numel() != k:
        raise QwenlabError(f"{where}: x {list(x.shape)} holds more than one row (use nvfp4_gemm)")
    n = sum(ns)
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    row = x.reshape(k).contiguous()
    engine = gemv_engine(x, bias) if config is None else "mma" if config.get("MMA") else \
        "wide" if config.get("WIDE") else "fma"
    if engine in ("mma", "wide") and (bias is not None or x.device.type != "cuda"
                                      or (engine == "mma" and x.dtype != torch.bfloat16)):
        raise QwenlabError(f"{where}: the {'tensor-core' if engine == 'mma' else 'wide'} GEMV takes a "
                           f"{'bf16 ' if engine == 'mma' else ''}row on CUDA and no bias, got {x.dtype} on "
                           f"{x.device}{' with a bias' if bias is not None else ''}")
    if engine != "fma":
        run = _mma_gemv if engine == "mma" else _wide_gemv
        run(row, weights, ns, y, {key: v for key, v in (config or {}).items() if key not in ("MMA", "WIDE")})
        return y.reshape(*x.shape[:-1], n)
    words = row.dtype == torch.bfloat16 and row.data_ptr() % 4 == 0
    split = gemv_split(n, k) if len(weights) == 1 else 1
    partial = torch.empty(split, n, dtype=torch.float32, device=x.device) if split > 1 else y
    b = bias if bias is not None else y
    (p0, s0, t0, n0, sp0, ss0, st0), (p1, s1, t1, n1, sp1, ss1, st1), (p2, s2, t2, n2, sp2, ss2, st2) = \
        _part_args(weights, ns, where)
    kernel = _gemv_kernel if config is None else _gemv_kernel.fn  # .fn: the kernel under the autotuner
    pdl = {key: value for key, value in (config or {}).items() if key in ("PDL", "launch_pdl")}  # for the finish
    kernel[lambda meta: (sum(triton.cdiv(n_i, meta["BLOCK_N"]) for n_i in ns), split)](
        row.view(torch.int32) if words else row, p0, s0, t0, p1, s1, t1, p2, s2, t2, b, y, partial, n0, n1, n2, k,
        sp0, ss0, st0, sp1, ss1, st1, sp2, ss2, st2, 1, PARTS=len(weights), X_WORDS=words, HAS_BIAS=bias is not None,
        SPLIT=split, **(config or {}))
    if split > 1:
        tensor_scale = weights[0][2]
        _gemv_finish_kernel[(triton.cdiv(n, 1024),)](partial, tensor_scale, b, y, n, _ts_stride(tensor_scale),
                                                     HAS_BIAS=bias is not None, SPLIT=split, BLOCK=1024, **pdl)
    return y.reshape(*x.shape[:-1], n)


def gemv_with_config(x: torch.Tensor, weights: list, config: dict) -> torch.Tensor:
    """nvfp4_gemv_parts (nvfp4_gemv for one weight) with the tile given, not autotuned: for benchmarks."""
    return _gemv(x, weights, None, "gemv_with_config", config)


@torch.library.custom_op("qwenlab::nvfp4_gemv", mutates_args=())
def nvfp4_gemv(x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T for ONE row x ([K], [1, K], [1, 1, K]; bf16/fp16/fp32) -> [..., N] in x.dtype. Reads each packed
    byte and block scale once; fp32 accumulation; tensor_scale: float32 scalar or per-row vector [N]."""
    return _gemv(x, [(packed, block_scale, tensor_scale)], bias, "nvfp4_gemv")


@nvfp4_gemv.register_fake
def _(x, packed, block_scale, tensor_scale, bias=None):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("qwenlab::nvfp4_gemv_parts", mutates_args=())
def nvfp4_gemv_parts(x: torch.Tensor, packed: list[torch.Tensor], block_scale: list[torch.Tensor],
                     tensor_scale: list[torch.Tensor]) -> torch.Tensor:
    """x times 1-3 weights of the same K in one launch, concatenated: [..., N0 + N1 (+ N2)] (q/k/v or gate/up as
    one GEMV while each stays its own NVFP4 weight, with its own tensor scale). No bias; split-K only for one weight."""
    if not 1 <= len(packed) == len(block_scale) == len(tensor_scale) <= 3:
        raise QwenlabError(f"nvfp4_gemv_parts: give 1-3 weights (packed, block_scale, tensor_scale each), got "
                           f"{len(packed)}, {len(block_scale)}, {len(tensor_scale)}")
    return _gemv(x, list(zip(packed, block_scale, tensor_scale)), None, "nvfp4_gemv_parts")


@nvfp4_gemv_parts.register_fake
def _(x, packed, block_scale, tensor_scale):
    return x.new_empty((*x.shape[:-1], sum(p.shape[0] for p in packed)))


@torch.library.custom_op("qwenlab::nvfp4_gemm", mutates_args=())
def nvfp4_gemm(x: torch.Tensor, packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T for x [..., K] in bf16/fp16 -> [..., N] in x.dtype (W4A16 GEMM: W tiles dequantized to x.dtype
    in registers, exactly; fp32 accumulation; the tensor scale, scalar or per-row [N], applied at the end)."""
    if _elsewhere(x):
        with torch.cuda.device(x.device):
            return nvfp4_gemm(x, packed, block_scale, tensor_scale, bias)
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
    return dequantize_parts_into(out, [(packed, block_scale, tensor_scale)])


def dequantize_parts_into(out: torch.Tensor, weights: list) -> torch.Tensor:
    """dequantize_into for one or more weights (packed, block_scale, tensor_scale) of the same K in one launch, their
    rows one after the other in out [N0 + N1 + ..., K] (a prefill's q/k/v or gate/up as one matmul)."""
    if out.dim() != 2 or out.stride(1) != 1:
        raise QwenlabError(f"dequantize_into: out {list(out.shape)} must be 2-D with stride 1 along K")
    plan = dequantize_plan(weights, out.stride(0))
    if tuple(out.shape) != (plan.rows, plan.k):
        raise QwenlabError(f"dequantize_into: out {list(out.shape)} must be [{plan.rows}, {plan.k}] with stride 1 "
                           "along K")
    return _launch(plan, out)


def dequantize_groups(groups: list, dtype: torch.dtype) -> list[torch.Tensor]:
    """Groups of weights [(packed, block_scale, tensor_scale)], the weights of a group sharing K, dequantized in one
    launch into one new buffer in `dtype`: one contiguous [N0 + N1 + ..., K] view of it per group, the group's
    weights' rows one after the other (a prefill's layer: q/k/v, o, gate/up and down in one launch; the buffer is
    freed with the last view, its memory recycled by torch's caching allocator)."""
    plan = dequantize_plan([w for group in groups for w in group], None)
    spans, first = [], 0
    for group in groups:
        parts = plan.layout[first:first + len(group)]
        start, _, k = parts[0]
        if any(part_k != k for _, _, part_k in parts):
            raise QwenlabError(f"dequantize_groups: the weights of a group must share K, got K "
                               f"{[part_k for _, _, part_k in parts]}")
        spans.append((start, sum(n for _, n, _ in parts), k))
        first += len(group)
    flat = _launch(plan, torch.empty(plan.size, dtype=dtype, device=plan.table.device))
    return [flat[start:start + rows * k].view(rows, k) for start, rows, k in spans]


def _launch(plan: "DequantizePlan", out: torch.Tensor) -> torch.Tensor:
    if out.device != plan.table.device:
        raise QwenlabError(f"dequantize_into: out is on {out.device}, the weights on {plan.table.device}")
    if _elsewhere(out):
        with torch.cuda.device(out.device):
            return _launch(plan, out)
    _dequantize_kernel[(plan.programs,)](plan.table, out, PARTS=plan.parts, ALIGNED=plan.aligned,
                                         BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=DEQUANT_BLOCK_K)
    return out


class DequantizePlan(NamedTuple):
    """What a dequantize launch over some weights needs beyond its output: each weight's addresses, shape, strides
    and place in the output as one row of an int64 table on their device (_dequantize_kernel's PLAN), the number of
    programs, and whether every address, offset and row stride allows 16-byte loads and stores."""
    table: torch.Tensor
    parts: int
    programs: int
    aligned: bool
    rows: int  # all weights' rows
    k: int  # the first weight's K
    size: int  # the output's elements from its start to the end of the last weight
    layout: tuple  # (first element in the output, N, K) of each weight


PLANS: dict = {}  # plan_key(weights) and the output's row stride -> DequantizePlan: a function of its key
MAX_PLANS = 4096


def plan_key(weights: list) -> tuple:
    """Everything a dequantize plan of `weights` depends on besides the output: each tensor's address, dtype, shape
    and strides, and the device. The same key is the same plan, whatever tensors now hold those addresses."""
    return tuple((t.data_ptr(), t.dtype, t.shape, t.stride()) for w in weights for t in w) + (weights[0][0].device,)


def dequantize_plan(weights: list, row_stride: int | None) -> DequantizePlan:
    """The plan of a dequantize launch over `weights` [(packed, block_scale, tensor_scale)], checked and made on
    first use and then kept (PLANS): a prefill dequantizes the same weights in every call, and its speed is bound
    by the host that issues its kernels (doc/performance.md), so a launch passes Triton one table instead of
    checking every weight and passing seven arguments for each. row_stride: the weights are the rows of one output
    [N0 + N1 + ..., K] of that row stride (they must share K); None: each is its own contiguous [N, K] in a flat
    output, one after the other."""
    if not weights:
        raise QwenlabError("dequantize_into: give one or more weights, got none")
    key = (plan_key(weights), row_stride)
    plan = PLANS.get(key)
    if plan is not None:
        return plan
    device = weights[0][0].device
    if any(t.device != device for w in weights for t in w):
        raise QwenlabError("dequantize_into: the weights' packed, block_scale and tensor_scale must be on one device")
    first_k = weights[0][0].shape[1] * 2
    if row_stride is not None and row_stride < first_k:
        raise QwenlabError(f"dequantize_into: out's rows overlap (row stride {row_stride} under K = {first_k})")
    fields, layout, start, program, aligned = [], [], 0, 0, True
    for packed, block_scale, tensor_scale in weights:
        k = packed.shape[1] * 2 if row_stride is None else first_k
        n, _ = _check(k, packed, block_scale, tensor_scale, None, "dequantize_into")
        stride_o = k if row_stride is None else row_stride
        columns = triton.cdiv(k, DEQUANT_BLOCK_K)
        fields.append([packed.data_ptr(), block_scale.data_ptr(), tensor_scale.data_ptr(), _ts_stride(tensor_scale),
                       n, k, start, stride_o, packed.stride(0), block_scale.stride(0), program, columns])
        aligned &= all(v % 16 == 0 for v in (packed.data_ptr(), block_scale.data_ptr(), packed.stride(0),
                                             block_scale.stride(0), start, stride_o))
        layout.append((start, n, k))
        start, program = start + n * stride_o, program + triton.cdiv(n, DEQUANT_BLOCK_N) * columns
    table = torch.tensor(fields, dtype=torch.int64).to(device)
    plan = DequantizePlan(table, len(weights), program, aligned, sum(n for _, n, _ in layout), first_k, start,
                          tuple(layout))
    if len(PLANS) >= MAX_PLANS:
        PLANS.clear()
    PLANS[key] = plan
    return plan
