"""The NVFP4 decode GEMV with wide loads (Gluon): one row x times packed E2M1 weights + E4M3 block scales, each
thread reading 16 contiguous bytes of a weight row (four packed int32 words, 32 elements) per load and the 8 x
values of each of its words as 16-byte loads in the same layout, so no data moves between threads until the final
sum of a row. The FMA GEMV (qwenlab.quant.triton_nvfp4) reads 8 bytes of a row per thread and load, the tensor-core
one (qwenlab.quant.mma_nvfp4) 4.

Layout L3 [BLOCK_N, BW, 8]: (row, packed word, element of the word); the words [BLOCK_N, BW] are its slice along
the elements, x [BW, 8] its slice along the rows (each thread holds its words' x, shared by its rows). A nibble is
decoded as in the FMA GEMV: shifted to the top of the word, shifted back arithmetically by 6 and masked, it reads
as the float32 e2m1 x 2^-126; x is scaled by 2^63 so that the products stay normal floats, and the result by 2^63.

    wide_gemv_kernel  y = x @ [W0; W1; W2].T for 1-3 weights of the same K (q/k/v, gate/up) in one launch,
                      optionally split along K into SPLIT partial rows
    layer_gemv_kernel the same as a GEMV of the graph engine's fused NVFP4 layer (qwenlab.generation.fused_layer):
                      the input RMSNorm as its prologue (PRO), SiLU(gate) x up of gate and up rows in one program
                      (GLU), the residual add (RES) and programmatic dependent launch (PDL, qwenlab.quant.pdl)

Options (constexprs; triton_nvfp4.wide_config holds the defaults, bench/nvfp4_gemv_sweep.py times them):
    FINISH     split-K sums itself: each program stores its partial rows, then counts itself done on its row tile's
               counter (an acq_rel atomic after a CTA barrier); the tile's last program sums the SPLIT partial rows
               in split order (deterministic) and sets the counter back to zero. No second kernel per split GEMV;
               the counters are per device, so two split launches must not run at once on one device.
    S_PAIRS    the block scales read as int16, the two of each thread's four words in one load
    PREFETCH   the next step's loads issued before this step's arithmetic (measured no faster on an H200)
    READ_ONLY  1: the loads without the decode; 2: the packed words only. A wrong result, for timing the reads.

On an H200 (doc/nvfp4.md) the four projections of a Qwen3-4B layer take about 40 us: their loads alone (words,
scales and x, READ_ONLY 1) 32 us, the packed words alone 23 us, a plain one-kernel read of the same bytes 20 us.
So the decode and products (40-50 instructions per word) cost about 9 us, the x and scale loads about 9 more.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from qwenlab.quant import pdl

X_SCALE = gl.constexpr(9.223372036854775808e18)  # 2^63
E2M1_BITS = gl.constexpr(-0x7E400000)  # 0x81C00000 as int32: bit 31 (sign) and bits 24..22 (e1 e0 m)


def layout(rows_per_thread: int, words_per_thread: int, lanes_n: int, warps_n: int) -> gl.BlockedLayout:
    """L3 for a tile of rows_per_thread x lanes_n x warps_n rows and words_per_thread x (32 / lanes_n) words
    (triton_nvfp4.wide_tile): each thread's words of a row contiguous (words_per_thread 4: one 16-byte load)."""
    return gl.BlockedLayout(size_per_thread=[rows_per_thread, words_per_thread, 8],
                            threads_per_warp=[lanes_n, 32 // lanes_n, 1], warps_per_cta=[warps_n, 1, 1],
                            order=[2, 1, 0])


@gluon.jit
def _load_weights(word_ptrs, scale_ptrs, w0, last, w, EVEN_K: gl.constexpr, S_PAIRS: gl.constexpr, step_ok=True):
    """The packed words [BLOCK_N, BW] from word w0 on and their E4M3 scales (one per two words; S_PAIRS:
    scale_ptrs are int16, one per four words). EVEN_K: a whole step, read where step_ok (one flag for the step: the
    16-byte loads stay whole), else zeros past `last`."""
    s_div: gl.constexpr = 4 if S_PAIRS else 2
    s_zero: gl.constexpr = 0 if S_PAIRS else 0.0
    if EVEN_K:
        words = gl.load(word_ptrs + w0, mask=step_ok, other=0, eviction_policy="evict_first")
        s = gl.load(scale_ptrs + w0 // s_div, mask=step_ok, other=s_zero, eviction_policy="evict_first")
    else:
        if S_PAIRS:  # whole threads' four words masked together (last is a multiple of 4): 16-byte loads stay
            ok = w0 + (w // 4) * 4 < last
        else:
            ok = w0 + w < last
        words = gl.load(word_ptrs + w0, mask=ok[None, :], other=0, eviction_policy="evict_first")
        s = gl.load(scale_ptrs + w0 // s_div, mask=ok[None, :], other=s_zero, eviction_policy="evict_first")
    return words, s


@gluon.jit
def _load_x(x_ptrs, w0, last, xw, EVEN_K: gl.constexpr, step_ok=True):
    """x [BW, 8] (or a vector laid out as x, the norm's weight) for the words from w0 on, zeros past `last`."""
    if EVEN_K:
        return gl.load(x_ptrs + w0 * 8, mask=step_ok, other=0.0)
    return gl.load(x_ptrs + w0 * 8, mask=(w0 + xw < last)[:, None], other=0.0)


@gluon.jit
def _load_step(word_ptrs, scale_ptrs, x_ptrs, w0, last, w, xw, EVEN_K: gl.constexpr, READ_ONLY: gl.constexpr,
               S_PAIRS: gl.constexpr, step_ok=True):
    """The packed words, their block scales and x from word w0 on (READ_ONLY 2: the words only, returned three
    times)."""
    if READ_ONLY == 2:
        words = gl.load(word_ptrs + w0, mask=step_ok, other=0, eviction_policy="evict_first")
        return words, words, words
    words, s = _load_weights(word_ptrs, scale_ptrs, w0, last, w, EVEN_K, S_PAIRS, step_ok)
    return words, s, _load_x(x_ptrs, w0, last, xw, EVEN_K, step_ok)


@gluon.jit
def _scale(s, pair_shift, S_PAIRS: gl.constexpr):
    """Each word's block scale as float32: s holds it as E4M3, or with S_PAIRS as the int16 of its two blocks'
    scales, shifted by pair_shift (0 or 8) and masked."""
    if S_PAIRS:
        return ((s.to(gl.int32) >> pair_shift) & 0xFF).to(gl.uint8).to(gl.float8e4nv, bitcast=True).to(gl.float32)
    return s.to(gl.float32)


@gluon.jit
def _step(words, s, x, up, pair_shift, READ_ONLY: gl.constexpr, S_PAIRS: gl.constexpr):
    """[BLOCK_N, BW] float32: each word's 8 products with x, summed, times its block scale (x 2^-63)."""
    if READ_ONLY == 2:
        part = words.to(gl.float32, bitcast=True)
    elif READ_ONLY:
        xs = gl.expand_dims(x.to(gl.float32) * X_SCALE, 0)  # [1, BW, 8]
        part = words.to(gl.float32, bitcast=True) * _scale(s, pair_shift, S_PAIRS) + gl.sum(xs, axis=2)
    else:
        part = _products(words, s, gl.expand_dims(x.to(gl.float32) * X_SCALE, 0), up, pair_shift, S_PAIRS)
    return part


@gluon.jit
def _products(words, s, xs, up, pair_shift, S_PAIRS: gl.constexpr):
    """[BLOCK_N, BW]: each word's 8 decoded elements times xs ([1, BW, 8] float32, x 2^63), summed, times its
    block scale."""
    values = (((gl.expand_dims(words, 2) << up) >> 6) & E2M1_BITS).to(gl.float32, bitcast=True)
    return gl.sum(values * xs, axis=2) * _scale(s, pair_shift, S_PAIRS)


@gluon.jit
def _pointers(P, S, src, stride_p, stride_s, w, S_PAIRS: gl.constexpr):
    """A tile's packed-word and block-scale pointers [BLOCK_N, BW] at word 0, and each word's shift of its scale
    (S_PAIRS: S as int16, the two block scales of each thread's four words in one load)."""
    word_ptrs = P + src[:, None] * stride_p + w[None, :]
    if S_PAIRS:
        scale_ptrs = S + src[:, None] * (stride_s // 2) + (w // 4)[None, :]
        pair_shift = gl.expand_dims(8 * ((w // 2) % 2), 0)
    else:
        scale_ptrs = S + src[:, None] * stride_s + (w // 2)[None, :]
        pair_shift = 0
    return word_ptrs, scale_ptrs, pair_shift


@gluon.jit
def _tile_setup(P, S, tile, N, K, stride_p, stride_s, SPLIT: gl.constexpr, BLOCK_N: gl.constexpr,
                BW: gl.constexpr, L3: gl.constexpr, S_PAIRS: gl.constexpr):
    """What a tile of rows tile*BLOCK_N.. over this program's 1/SPLIT of K starts from: its rows, the rows it reads
    (src), word and x-word offsets (w, xw), each element's shift of its nibble to the top bits (up, [1, 1, 8]), the
    first and last word of its slice of K, the word and scale pointers at word 0 and x's offsets at word 0."""
    words_layout: gl.constexpr = gl.SliceLayout(2, L3)
    x_layout: gl.constexpr = gl.SliceLayout(0, L3)
    rows = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, words_layout))
    src = gl.minimum(rows, N - 1)  # the tail tile re-reads the last row instead of masking every load
    w = gl.arange(0, BW, layout=gl.SliceLayout(0, words_layout))
    xw = gl.arange(0, BW, layout=gl.SliceLayout(1, x_layout))
    xe = gl.arange(0, 8, layout=gl.SliceLayout(0, x_layout))  # element of a word
    up = 28 - 4 * gl.expand_dims(gl.expand_dims(xe, 0), 0)  # element j's nibble to the top bits
    words_k = K // 8
    chunk = gl.cdiv(gl.cdiv(words_k, SPLIT), BW) * BW
    first = gl.program_id(1) * chunk
    last = gl.minimum(words_k, first + chunk)
    word_ptrs, scale_ptrs, pair_shift = _pointers(P, S, src, stride_p, stride_s, w, S_PAIRS)
    return rows, src, w, xw, up, first, last, word_ptrs, scale_ptrs, pair_shift, xw[:, None] * 8 + xe[None, :]


@gluon.jit
def _split_store(y, rows, src, TS, ts_stride, Y, R, PARTIAL, COUNTERS, N, N_ALL, y_offset, SPLIT: gl.constexpr,
                 FINISH: gl.constexpr, RES: gl.constexpr):
    """A split-K program's partial rows (tensor-scaled) into PARTIAL; FINISH: the row tile's last program to
    finish sums the SPLIT partial rows, in order, rounds them (RES: then adds R, the residual, rounding again) into
    Y and resets its counter."""
    gl.store(PARTIAL + gl.program_id(1) * N_ALL + y_offset + rows, y * (gl.load(TS + src * ts_stride) * X_SCALE),
             mask=rows < N)
    if FINISH:
        gl.thread_barrier()  # every thread's partial stored before the count says so
        done = gl.atomic_add(COUNTERS + gl.program_id(0), 1, sem="acq_rel", scope="gpu")
        if done == SPLIT - 1:
            total = gl.load(PARTIAL + y_offset + rows, mask=rows < N, other=0.0, cache_modifier=".cg")
            for part in gl.static_range(1, SPLIT):
                total += gl.load(PARTIAL + part * N_ALL + y_offset + rows, mask=rows < N, other=0.0,
                                 cache_modifier=".cg")
            out = total.to(Y.dtype.element_ty)
            if RES:
                out = (gl.load(R + rows, mask=rows < N, other=0.0).to(gl.float32) + out.to(gl.float32)).to(
                    Y.dtype.element_ty)
            gl.store(Y + y_offset + rows, out, mask=rows < N)
            gl.atomic_xchg(COUNTERS + gl.program_id(0), 0, sem="relaxed", scope="gpu")


@gluon.jit
def _layer_store(y, y2, rows, src, TS, ts_stride, TS2, ts_stride2, Y, R, N, y_offset, unit, GLU: gl.constexpr,
                 RES: gl.constexpr):
    """A layer GEMV's rows, not split along K, into Y at y_offset: y times the tensor scale x unit (what the decode
    left out), rounded; GLU: y gate's rows and y2 up's, written as F.silu(gate) * up, rounded where the forward
    rounds; RES: + R (the residual), rounded again."""
    dtype: gl.constexpr = Y.dtype.element_ty
    out = (y * (gl.load(TS + src * ts_stride) * unit)).to(dtype)
    if GLU:
        up_row = (y2 * (gl.load(TS2 + src * ts_stride2) * unit)).to(dtype).to(gl.float32)
        gate = out.to(gl.float32)
        out = ((gate / (1.0 + gl.exp(-gate))).to(dtype).to(gl.float32) * up_row).to(dtype)
    if RES:
        out = (gl.load(R + rows, mask=rows < N, other=0.0).to(gl.float32) + out.to(gl.float32)).to(dtype)
    gl.store(Y + y_offset + rows, out, mask=rows < N)


@gluon.jit
def _wide_tile(X, P, S, TS, Y, PARTIAL, COUNTERS, tile, N, K, N_ALL, stride_p, stride_s, ts_stride, y_offset,
               SPLIT: gl.constexpr, EVEN_K: gl.constexpr, BLOCK_N: gl.constexpr, BW: gl.constexpr,
               L3: gl.constexpr, READ_ONLY: gl.constexpr, PREFETCH: gl.constexpr, FINISH: gl.constexpr,
               S_PAIRS: gl.constexpr):
    """Rows tile*BLOCK_N.. of one weight over this program's 1/SPLIT of K, into Y at y_offset (or PARTIAL).
    READ_ONLY (bench/nvfp4_gemv_sweep.py, a wrong result): the same loads without the decode, timing the reads. PREFETCH
    (EVEN_K only): each step's loads issued before the previous step's arithmetic."""
    rows, src, w, xw, up, first, last, word_ptrs, scale_ptrs, pair_shift, x_off = _tile_setup(
        P, S, tile, N, K, stride_p, stride_s, SPLIT, BLOCK_N, BW, L3, S_PAIRS)
    x_ptrs = X + x_off
    acc = gl.zeros([BLOCK_N, BW], gl.float32, gl.SliceLayout(2, L3))
    if PREFETCH:  # software pipelining in registers: the next step's loads in flight while this one decodes
        words, s, x = _load_step(word_ptrs, scale_ptrs, x_ptrs, first, last, w, xw, True, READ_ONLY, S_PAIRS,
                                 first < last)
        for w0 in range(first, last, BW):
            next_words, next_s, next_x = _load_step(word_ptrs, scale_ptrs, x_ptrs, w0 + BW, last, w, xw, True,
                                                     READ_ONLY, S_PAIRS, w0 + BW < last)
            acc += _step(words, s, x, up, pair_shift, READ_ONLY, S_PAIRS)
            words, s, x = next_words, next_s, next_x
    else:
        for w0 in range(first, last, BW):
            words, s, x = _load_step(word_ptrs, scale_ptrs, x_ptrs, w0, last, w, xw, EVEN_K, READ_ONLY, S_PAIRS)
            acc += _step(words, s, x, up, pair_shift, READ_ONLY, S_PAIRS)
    y = gl.sum(acc, axis=1)
    if SPLIT > 1:
        _split_store(y, rows, src, TS, ts_stride, Y, Y, PARTIAL, COUNTERS, N, N_ALL, y_offset, SPLIT, FINISH,
                     False)
    else:
        y = y * (gl.load(TS + src * ts_stride) * X_SCALE)  # 2^-126 x 2^63 x 2^63 = 1
        gl.store(Y + y_offset + rows, y.to(Y.dtype.element_ty), mask=rows < N)


@gluon.jit(do_not_specialize=["ts_stride0", "ts_stride1", "ts_stride2"])
def wide_gemv_kernel(X, P0, S0, TS0, P1, S1, TS1, P2, S2, TS2, Y, PARTIAL, COUNTERS, N0, N1, N2, K,
                     stride_p0, stride_s0, ts_stride0, stride_p1, stride_s1, ts_stride1, stride_p2, stride_s2,
                     ts_stride2, PARTS: gl.constexpr, SPLIT: gl.constexpr, EVEN_K: gl.constexpr,
                     BLOCK_N: gl.constexpr, BW: gl.constexpr, L3: gl.constexpr, READ_ONLY: gl.constexpr = False,
                     PREFETCH: gl.constexpr = False, FINISH: gl.constexpr = False, S_PAIRS: gl.constexpr = False):
    """y = x @ [W0; W1; W2].T: program (i, j) takes row tile i of W0's tiles, then W1's, then W2's, over the j-th
    of SPLIT slices of K (SPLIT > 1: tensor-scaled fp32 partial rows, [SPLIT, N0 + N1 + N2], summed by FINISH or
    by triton_nvfp4's finish pass)."""
    pid = gl.program_id(0)
    n_all = N0 + N1 + N2
    tiles0 = gl.cdiv(N0, BLOCK_N)
    tiles1 = gl.cdiv(N1, BLOCK_N)
    if PARTS == 1 or pid < tiles0:
        _wide_tile(X, P0, S0, TS0, Y, PARTIAL, COUNTERS, pid, N0, K, n_all, stride_p0, stride_s0, ts_stride0, 0,
                   SPLIT, EVEN_K, BLOCK_N, BW, L3, READ_ONLY, PREFETCH, FINISH, S_PAIRS)
    elif PARTS == 2 or pid < tiles0 + tiles1:
        _wide_tile(X, P1, S1, TS1, Y, PARTIAL, COUNTERS, pid - tiles0, N1, K, n_all, stride_p1, stride_s1, ts_stride1,
                   N0, SPLIT, EVEN_K, BLOCK_N, BW, L3, READ_ONLY, PREFETCH, FINISH, S_PAIRS)
    else:
        _wide_tile(X, P2, S2, TS2, Y, PARTIAL, COUNTERS, pid - tiles0 - tiles1, N2, K, n_all, stride_p2, stride_s2,
                   ts_stride2, N0 + N1, SPLIT, EVEN_K, BLOCK_N, BW, L3, READ_ONLY, PREFETCH, FINISH, S_PAIRS)


AT_START = gl.constexpr(pdl.AT_START)
AFTER_WAIT = gl.constexpr(pdl.AFTER_WAIT)
AFTER_LOOP = gl.constexpr(pdl.AFTER_LOOP)


@gluon.jit
def _layer_step(words, s, words2, s2, x, g, up, pair_shift, acc, acc2, sq, PRO: gl.constexpr, GLU: gl.constexpr,
                S_PAIRS: gl.constexpr):
    """One step of a layer GEMV: x (PRO: times the norm's weight g, its squares summed into sq) against the words
    of one weight (GLU: and of a second, the up projection's same rows)."""
    xf = x.to(gl.float32)
    if PRO:
        sq += xf * xf
        xf = xf * g.to(gl.float32)
    xs = gl.expand_dims(xf * X_SCALE, 0)
    acc += _products(words, s, xs, up, pair_shift, S_PAIRS)
    if GLU:
        acc2 += _products(words2, s2, xs, up, pair_shift, S_PAIRS)
    return acc, acc2, sq


@gluon.jit
def _layer_tile(X, G, R, P, S, TS, P2, S2, TS2, Y, PARTIAL, COUNTERS, tile, N, K, N_ALL, stride_p, stride_s,
                ts_stride, stride_p2, stride_s2, ts_stride2, y_offset, eps, SPLIT: gl.constexpr,
                EVEN_K: gl.constexpr, BLOCK_N: gl.constexpr, BW: gl.constexpr, L3: gl.constexpr,
                FINISH: gl.constexpr, S_PAIRS: gl.constexpr, PRO: gl.constexpr, GLU: gl.constexpr,
                RES: gl.constexpr, PDL: gl.constexpr):
    """Rows tile*BLOCK_N.. of a decoder layer's GEMV (wide_gemv_kernel's tile, plus): PRO, RMSNorm(x) * G as the
    input (G multiplies x as it is read, the squares of x are summed in the same pass, rstd scales the sums; every
    program reads all of x: SPLIT 1); GLU, the same rows of P2 (up) beside P's (gate), written as SiLU(gate) * up;
    RES, + R (the residual) after the rounding; PDL, the first step's weights read before waiting for the kernel
    before (X, G's input, R are its outputs), and the next kernel let in where PDL says (pdl.py)."""
    rows, src, w, xw, up, first, last, word_ptrs, scale_ptrs, pair_shift, x_off = _tile_setup(
        P, S, tile, N, K, stride_p, stride_s, SPLIT, BLOCK_N, BW, L3, S_PAIRS)
    x_ptrs = X + x_off
    word_ptrs2, scale_ptrs2, _ = _pointers(P2, S2, src, stride_p2, stride_s2, w, S_PAIRS)
    g_ptrs = G + x_off  # the norm's weight, laid out as x
    acc = gl.zeros([BLOCK_N, BW], gl.float32, gl.SliceLayout(2, L3))
    acc2 = acc
    sq = gl.zeros([BW, 8], gl.float32, gl.SliceLayout(0, L3))
    if PDL == AT_START:
        gdc_launch_dependents()
    # the first step: its weights (never written by a kernel) before the wait, its x after
    words, s = _load_weights(word_ptrs, scale_ptrs, first, last, w, EVEN_K, S_PAIRS, first < last)
    words2, s2 = words, s
    if GLU:
        words2, s2 = _load_weights(word_ptrs2, scale_ptrs2, first, last, w, EVEN_K, S_PAIRS, first < last)
    if PDL:
        gdc_wait()
    if PDL == AFTER_WAIT:
        gdc_launch_dependents()
    x = _load_x(x_ptrs, first, last, xw, EVEN_K, first < last)
    g = x
    if PRO:
        g = _load_x(g_ptrs, first, last, xw, EVEN_K, first < last)
    acc, acc2, sq = _layer_step(words, s, words2, s2, x, g, up, pair_shift, acc, acc2, sq, PRO, GLU, S_PAIRS)
    for w0 in range(first + BW, last, BW):
        words, s = _load_weights(word_ptrs, scale_ptrs, w0, last, w, EVEN_K, S_PAIRS)
        if GLU:
            words2, s2 = _load_weights(word_ptrs2, scale_ptrs2, w0, last, w, EVEN_K, S_PAIRS)
        x = _load_x(x_ptrs, w0, last, xw, EVEN_K)
        if PRO:
            g = _load_x(g_ptrs, w0, last, xw, EVEN_K)
        acc, acc2, sq = _layer_step(words, s, words2, s2, x, g, up, pair_shift, acc, acc2, sq, PRO, GLU, S_PAIRS)
    if PDL == AFTER_LOOP:
        gdc_launch_dependents()
    y = gl.sum(acc, axis=1)
    if PRO:  # RMSNorm's rstd from the x this pass read
        rstd = gl.rsqrt(gl.sum(gl.sum(sq, axis=1), axis=0) / K + eps)
        y = y * rstd
    if SPLIT > 1:
        _split_store(y, rows, src, TS, ts_stride, Y, R, PARTIAL, COUNTERS, N, N_ALL, y_offset, SPLIT, FINISH, RES)
    else:
        y2 = y
        if GLU:
            y2 = gl.sum(acc2, axis=1)
            if PRO:
                y2 = y2 * rstd
        _layer_store(y, y2, rows, src, TS, ts_stride, TS2, ts_stride2, Y, R, N, y_offset, X_SCALE, GLU, RES)


@gluon.jit(do_not_specialize=["ts_stride0", "ts_stride1", "ts_stride2"])
def layer_gemv_kernel(X, G, R, P0, S0, TS0, P1, S1, TS1, P2, S2, TS2, Y, PARTIAL, COUNTERS, N0, N1, N2, K,
                      stride_p0, stride_s0, ts_stride0, stride_p1, stride_s1, ts_stride1, stride_p2, stride_s2,
                      ts_stride2, eps, PARTS: gl.constexpr, SPLIT: gl.constexpr, EVEN_K: gl.constexpr,
                      BLOCK_N: gl.constexpr, BW: gl.constexpr, L3: gl.constexpr, FINISH: gl.constexpr,
                      S_PAIRS: gl.constexpr, PRO: gl.constexpr, GLU: gl.constexpr, RES: gl.constexpr,
                      PDL: gl.constexpr):
    """A GEMV of the fused NVFP4 decoder layer: wide_gemv_kernel's programs over 1-3 weights (GLU: gate W0 and up
    W1 side by side, N0 rows out), with _layer_tile's norm prologue, SiLU, residual and PDL."""
    pid = gl.program_id(0)
    n_all = N0 + N1 + N2
    tiles0 = gl.cdiv(N0, BLOCK_N)
    tiles1 = gl.cdiv(N1, BLOCK_N)
    if GLU or PARTS == 1 or pid < tiles0:
        _layer_tile(X, G, R, P0, S0, TS0, P1, S1, TS1, Y, PARTIAL, COUNTERS, pid, N0, K, n_all, stride_p0,
                    stride_s0, ts_stride0, stride_p1, stride_s1, ts_stride1, 0, eps, SPLIT, EVEN_K, BLOCK_N, BW,
                    L3, FINISH, S_PAIRS, PRO, GLU, RES, PDL)
    elif PARTS == 2 or pid < tiles0 + tiles1:
        _layer_tile(X, G, R, P1, S1, TS1, P1, S1, TS1, Y, PARTIAL, COUNTERS, pid - tiles0, N1, K, n_all, stride_p1,
                    stride_s1, ts_stride1, stride_p1, stride_s1, ts_stride1, N0, eps, SPLIT, EVEN_K, BLOCK_N, BW,
                    L3, FINISH, S_PAIRS, PRO, False, RES, PDL)
    else:
        _layer_tile(X, G, R, P2, S2, TS2, P2, S2, TS2, Y, PARTIAL, COUNTERS, pid - tiles0 - tiles1, N2, K, n_all,
                    stride_p2, stride_s2, ts_stride2, stride_p2, stride_s2, ts_stride2, N0 + N1, eps, SPLIT, EVEN_K,
                    BLOCK_N, BW, L3, FINISH, S_PAIRS, PRO, False, RES, PDL)
