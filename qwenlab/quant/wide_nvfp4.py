"""The NVFP4 decode GEMV with wide loads (Gluon): one row x times packed E2M1 weights + E4M3 block scales, each
thread reading 16 contiguous bytes of a weight row (four packed int32 words, 32 elements) per load and the 8 x
values of each of its words as 16-byte loads in the same layout, so no data moves between threads until the final
sum of a row. The FMA GEMV (qwenlab.quant.triton_nvfp4) reads 8 bytes of a row per thread and load, the tensor-core
one (qwenlab.quant.mma_nvfp4) 4.

Layout L3 [BLOCK_N, BW, 8]: (row, packed word, element of the word); the words [BLOCK_N, BW] are its slice along
the elements, x [BW, 8] its slice along the rows (each thread holds its words' x, shared by its rows). A nibble is
decoded as in the FMA GEMV: shifted to the top of the word, shifted back arithmetically by 6 and masked, it reads
as the float32 e2m1 x 2^-126; x is scaled by 2^63 so that the products stay normal floats, and the result by 2^63.

    wide_gemv_kernel  y = x @ [W0; W1; W2].T for 1-3 weights of the same K (q/k/v, gate/up) in one launch, or one
                      weight split along K (SPLIT partial rows, summed by triton_nvfp4's finish pass)

Gluon kernels do not run in Triton's CPU interpreter: tests check them against float64 on CUDA.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

X_SCALE = gl.constexpr(9.223372036854775808e18)  # 2^63
E2M1_BITS = gl.constexpr(-0x7E400000)  # 0x81C00000 as int32: bit 31 (sign) and bits 24..22 (e1 e0 m)


def layout(rows_per_thread: int, words_per_thread: int, lanes_n: int, warps_n: int, warps_w: int = 1
           ) -> gl.BlockedLayout:
    """L3 for a tile of rows_per_thread x lanes_n x warps_n rows and words_per_thread x (32 / lanes_n) x warps_w
    words: each thread's words of a row contiguous (words_per_thread 4: one 16-byte load)."""
    return gl.BlockedLayout(size_per_thread=[rows_per_thread, words_per_thread, 8],
                            threads_per_warp=[lanes_n, 32 // lanes_n, 1], warps_per_cta=[warps_n, warps_w, 1],
                            order=[2, 1, 0])


@gluon.jit
def _load_step(word_ptrs, scale_ptrs, x_ptrs, w0, last, w, xw, EVEN_K: gl.constexpr):
    """The packed words [BLOCK_N, BW], their E4M3 scales (one per two words) and x [BW, 8] from word w0 on."""
    if EVEN_K:
        return (gl.load(word_ptrs + w0, eviction_policy="evict_first"),
                gl.load(scale_ptrs + w0 // 2, eviction_policy="evict_first"), gl.load(x_ptrs + w0 * 8))
    ok = w0 + w < last
    return (gl.load(word_ptrs + w0, mask=ok[None, :], other=0, eviction_policy="evict_first"),
            gl.load(scale_ptrs + w0 // 2, mask=ok[None, :], other=0.0, eviction_policy="evict_first"),
            gl.load(x_ptrs + w0 * 8, mask=(w0 + xw < last)[:, None], other=0.0))


@gluon.jit
def _step(words, s, x, up, READ_ONLY: gl.constexpr):
    """[BLOCK_N, BW] float32: each word's 8 products with x, summed, times its block scale (x 2^-63)."""
    xs = gl.expand_dims(x.to(gl.float32) * X_SCALE, 0)  # [1, BW, 8]
    if READ_ONLY:
        return words.to(gl.float32, bitcast=True) * s.to(gl.float32) + gl.sum(xs, axis=2)
    values = (((gl.expand_dims(words, 2) << up) >> 6) & E2M1_BITS).to(gl.float32, bitcast=True)
    return gl.sum(values * xs, axis=2) * s.to(gl.float32)


@gluon.jit
def _wide_tile(X, P, S, TS, Y, PARTIAL, tile, N, K, N_ALL, stride_p, stride_s, ts_stride, y_offset,
               SPLIT: gl.constexpr, EVEN_K: gl.constexpr, BLOCK_N: gl.constexpr, BW: gl.constexpr,
               L3: gl.constexpr, READ_ONLY: gl.constexpr, PREFETCH: gl.constexpr):
    """Rows tile*BLOCK_N.. of one weight over this program's 1/SPLIT of K, into Y at y_offset (or PARTIAL).
    READ_ONLY (bench/nvfp4_gemv_sweep.py, a wrong result): the same loads without the decode, timing the reads. PREFETCH
    (EVEN_K only): each step's loads issued before the previous step's arithmetic."""
    words_layout: gl.constexpr = gl.SliceLayout(2, L3)
    x_layout: gl.constexpr = gl.SliceLayout(0, L3)
    rows = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, words_layout))
    src = gl.minimum(rows, N - 1)  # the tail tile re-reads the last row instead of masking every load
    w = gl.arange(0, BW, layout=gl.SliceLayout(0, words_layout))
    xw = gl.arange(0, BW, layout=gl.SliceLayout(1, x_layout))
    xe = gl.arange(0, 8, layout=gl.SliceLayout(0, x_layout))
    j = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, x_layout)), 0), 0)  # [1, 1, 8]
    up = 28 - 4 * j  # element j of a word: its nibble to the top bits
    words_k = K // 8
    chunk = gl.cdiv(gl.cdiv(words_k, SPLIT), BW) * BW
    first = gl.program_id(1) * chunk
    last = gl.minimum(words_k, first + chunk)
    word_ptrs = P + src[:, None] * stride_p + w[None, :]
    scale_ptrs = S + src[:, None] * stride_s + (w // 2)[None, :]
    x_ptrs = X + xw[:, None] * 8 + xe[None, :]
    acc = gl.zeros([BLOCK_N, BW], gl.float32, words_layout)
    if PREFETCH:  # software pipelining in registers: the next step's loads in flight while this one decodes
        words, s, x = _load_step(word_ptrs, scale_ptrs, x_ptrs, gl.minimum(first, words_k - BW), last, w, xw, True)
        for w0 in range(first, last, BW):
            next_words, next_s, next_x = _load_step(word_ptrs, scale_ptrs, x_ptrs,
                                                     gl.minimum(w0 + BW, words_k - BW), last, w, xw, True)
            acc += _step(words, s, x, up, READ_ONLY)
            words, s, x = next_words, next_s, next_x
    else:
        for w0 in range(first, last, BW):
            words, s, x = _load_step(word_ptrs, scale_ptrs, x_ptrs, w0, last, w, xw, EVEN_K)
            acc += _step(words, s, x, up, READ_ONLY)
    y = gl.sum(acc, axis=1)
    if SPLIT > 1:
        gl.store(PARTIAL + gl.program_id(1) * N_ALL + y_offset + rows, y * (gl.load(TS + src * ts_stride) * X_SCALE),
                 mask=rows < N)
    else:
        y = y * (gl.load(TS + src * ts_stride) * X_SCALE)  # 2^-126 x 2^63 x 2^63 = 1
        gl.store(Y + y_offset + rows, y.to(Y.dtype.element_ty), mask=rows < N)


@gluon.jit(do_not_specialize=["ts_stride0", "ts_stride1", "ts_stride2"])
def wide_gemv_kernel(X, P0, S0, TS0, P1, S1, TS1, P2, S2, TS2, Y, PARTIAL, N0, N1, N2, K,
                     stride_p0, stride_s0, ts_stride0, stride_p1, stride_s1, ts_stride1, stride_p2, stride_s2,
                     ts_stride2, PARTS: gl.constexpr, SPLIT: gl.constexpr, EVEN_K: gl.constexpr,
                     BLOCK_N: gl.constexpr, BW: gl.constexpr, L3: gl.constexpr, READ_ONLY: gl.constexpr = False,
                     PREFETCH: gl.constexpr = False):
    """y = x @ [W0; W1; W2].T: program (i, j) takes row tile i of W0's tiles, then W1's, then W2's, over the j-th
    of SPLIT slices of K (SPLIT > 1 with one weight only: tensor-scaled fp32 partial rows)."""
    pid = gl.program_id(0)
    n_all = N0 + N1 + N2
    tiles0 = gl.cdiv(N0, BLOCK_N)
    tiles1 = gl.cdiv(N1, BLOCK_N)
    if PARTS == 1 or pid < tiles0:
        _wide_tile(X, P0, S0, TS0, Y, PARTIAL, pid, N0, K, n_all, stride_p0, stride_s0, ts_stride0, 0,
                   SPLIT, EVEN_K, BLOCK_N, BW, L3, READ_ONLY, PREFETCH)
    elif PARTS == 2 or pid < tiles0 + tiles1:
        _wide_tile(X, P1, S1, TS1, Y, PARTIAL, pid - tiles0, N1, K, n_all, stride_p1, stride_s1, ts_stride1, N0,
                   SPLIT, EVEN_K, BLOCK_N, BW, L3, READ_ONLY, PREFETCH)
    else:
        _wide_tile(X, P2, S2, TS2, Y, PARTIAL, pid - tiles0 - tiles1, N2, K, n_all, stride_p2, stride_s2,
                   ts_stride2, N0 + N1, SPLIT, EVEN_K, BLOCK_N, BW, L3, READ_ONLY, PREFETCH)
