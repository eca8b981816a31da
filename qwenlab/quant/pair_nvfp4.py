"""The fused NVFP4 layer's GEMV on tensor cores (Gluon): the packed E2M1 weights are decoded two elements at a time
into bf16x2 registers, multiplied by their block scales as bf16x2 and fed to mma.sync m16n8k16 with x: 33-36
instructions in the loop per packed word of eight elements, against 42-64 for wide_nvfp4, which decodes each element
alone and multiplies it in float32 (bench/nvfp4_gemv_sass.py). On an H200 that made gate/up (two weights sharing one
staging of x) 2.7-3.5% faster a decode step, and q/k/v 5% and o and down 2.5% slower (doc/nvfp4.md), so only gate/up
runs here by default (triton_nvfp4.LAYER_CONFIGS).

A warp takes 16 rows: lane (g, t) = (lane / 4, lane % 4) holds rows g and g + 8 of VW packed words at the same
columns of K, which depend only on t. Each word's eight elements go to two MMAs: for word q the pairs are
(q_3, q_7), (q_2, q_6), (q_1, q_5), (q_0, q_4) (one mask, shift and or per pair: the sign to bit 15, e1 e0 m to
bits 8..6 of each half, which reads as the bf16 value x 2^-126), and x's pairs are staged in shared memory permuted
the same way, so the MMA sums the same products in another order of K. Every lane feeds the same x, so all eight
columns of the MMA's output are the row sums: lane (g, t) holds rows g and g + 8 in its first and third
accumulator.

Exact on the way in: an element times its block scale has at most 6 significant bits, so with the scale as bf16
x 2^116 (SCALE_BIAS) the product, w x s x 2^-10, is a normal bf16 with no rounding; the sums are the tensor cores'
float32 accumulation, scaled back by 2^10 (OUT_UNIT) and the tensor scale. x is the layer's bf16 input as it is:
with the input norm (PRO) each program first computes RMSNorm(x) * weight for all of K as the forward rounds it
(x * rstd to bf16, then times the weight to bf16) into shared memory, so the GEMV multiplies the normalized row the
eager layer multiplies. The staging follows the PDL wait, so its round trips to L2 are on the step's critical path:
step by step (_stage_x), a pass for the squares and another for the pairs, each step's loads waiting for the last;
or (ONCE, gate/up's default) in one pass (_stage_x_once), every load of x issued at once, the squares summed from
the same registers where the program takes all of K, the norm's weight loaded before the wait, one store: 2% off
an H200's decode step for gate/up, 7% for q/k/v on tensor cores (doc/nvfp4.md).

The warps of a program split K (KW of them, each VW x 4 words a step, summed at the end); o and down split K
across programs as well (FINISH, wide_nvfp4._split_store), and so may q/k/v (its tile's SPLIT: every program sums
the squares of all of x for the norm). Options PRO, GLU, RES and PDL as in wide_nvfp4.layer_gemv_kernel; LITE is a
timing knob (a wrong result); triton_nvfp4.layer_gemv launches it where its tile says PAIRS and x is bf16.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from qwenlab.quant.wide_nvfp4 import AFTER_LOOP, AFTER_WAIT, AT_START, X_SCALE, _layer_store, _split_store

SCALE_BIAS = gl.constexpr(2.0 ** 116)  # block scale x 2^116 x decoded element (x 2^-126) = product x 2^-10
OUT_UNIT = gl.constexpr(2.0 ** 10)
ROWS = gl.constexpr(16)  # rows of a program (one MMA's)


def _decode(word: str, regs: tuple, decode: bool = True, scale: bool = True) -> str:
    """PTX: the four bf16x2 pairs of the packed word in register `word` (clobbered) times s, into regs. decode /
    scale False (LITE, a timing knob): the word itself as each pair, or the pairs not multiplied by s."""
    lines = []
    for i, reg in enumerate(regs):
        if not decode:
            lines.append(f"mov.b32 {reg}, {word};")
        else:
            if i:
                lines.append(f"shl.b32 {word}, {word}, 4;")
            lines += [f"and.b32 t, {word}, 0x70007000;", "shr.b32 t, t, 6;", f"and.b32 {reg}, {word}, 0x80008000;",
                      f"or.b32 {reg}, {reg}, t;"]
        if scale:
            lines.append(f"mul.rn.bf16x2 {reg}, {reg}, s;")
    return "\n".join(lines)


MMA = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
# $0-$3 out: the accumulators; in: $4 $5 the words of rows g and g + 8, $6 $7 their block scales (float32,
# x SCALE_BIAS), $8-$11 x's elements (3, 7) (2, 6) (1, 5) (0, 4) of the word as bf16x2, $12-$15 the accumulators


def _pair_mma_asm(decode: bool = True, scale: bool = True) -> str:
    return "\n".join(line for line in [
        "{", ".reg .b32 q, t, s, a0, a1, a2, a3, a4, a5, a6, a7;",
        "cvt.rn.bf16x2.f32 s, $6, $6;" if scale else "", "mov.b32 q, $4;",
        _decode("q", ("a0", "a1", "a2", "a3"), decode, scale),
        "cvt.rn.bf16x2.f32 s, $7, $7;" if scale else "", "mov.b32 q, $5;",
        _decode("q", ("a4", "a5", "a6", "a7"), decode, scale),
        f"{MMA} {{$0, $1, $2, $3}}, {{a0, a4, a1, a5}}, {{$8, $9}}, {{$12, $13, $14, $15}};",
        f"{MMA} {{$0, $1, $2, $3}}, {{a2, a6, a3, a7}}, {{$10, $11}}, {{$0, $1, $2, $3}};", "}"] if line)


PAIR_MMA_ASM = gl.constexpr(_pair_mma_asm())
# indexed by LITE, a timing knob (bench/nvfp4_layer_tiles.py --sweep LITE=0,1,2,3; a wrong result): the kernel's
# asm (0), the words fed to the MMAs undecoded (1), the decoded pairs not multiplied by their block scales (2), or
# neither (3)
LITE_ASM = gl.constexpr((PAIR_MMA_ASM.value, _pair_mma_asm(decode=False), _pair_mma_asm(scale=False),
                         _pair_mma_asm(decode=False, scale=False)))


def layout(vw: int, kw: int) -> gl.BlockedLayout:
    """[KW, 8, BW]: (warp's slice of K, row pair g, packed word): lane (g, t) holds VW words of its row pair."""
    return gl.BlockedLayout(size_per_thread=[1, 1, vw], threads_per_warp=[1, 8, 4], warps_per_cta=[kw, 1, 1],
                            order=[2, 1, 0])


def stage_layout(vw: int, kw: int) -> gl.BlockedLayout:
    """[4, KW, BW]: a step's x pairs as the program stages them into shared memory."""
    return gl.BlockedLayout(size_per_thread=[1, 1, vw], threads_per_warp=[4, 1, 8], warps_per_cta=[1, kw, 1],
                            order=[2, 1, 0])


def scale_layout(vw: int, kw: int) -> gl.BlockedLayout:
    """[KW, 8, BW / 2]: the block scales of layout()'s words, one per two words (each converted once)."""
    return gl.BlockedLayout(size_per_thread=[1, 1, vw // 2], threads_per_warp=[1, 8, 4], warps_per_cta=[kw, 1, 1],
                            order=[2, 1, 0])


@gluon.jit
def _pair_mma(q_lo, q_hi, s_lo, s_hi, x0, x1, x2, x3, c0, c1, c2, c3, LITE: gl.constexpr = 0):
    return gl.inline_asm_elementwise(LITE_ASM[LITE], "=f,=f,=f,=f,r,r,f,f,r,r,r,r,f,f,f,f",
                                     [q_lo, q_hi, s_lo, s_hi, x0, x1, x2, x3, c0, c1, c2, c3],
                                     dtype=(gl.float32, gl.float32, gl.float32, gl.float32), is_pure=False, pack=1)


@gluon.jit
def _weights(P, S, stride_p, stride_s, src_lo, src_hi, srcs_lo, srcs_hi, col, col_s, w0, last, L: gl.constexpr):
    """A step's packed words [KW, 8, BW] of rows src_lo and src_hi from word w0 on (col: each lane's word of the
    step) and their block scales (col_s: each lane's block, srcs_*: the rows in the scales' layout) as float32
    x SCALE_BIAS, each converted once and then laid out as its two words in L; zeros past `last`."""
    word = w0 + col
    q_lo = gl.load(P + src_lo * stride_p + word, mask=word < last, other=0, eviction_policy="evict_first")
    q_hi = gl.load(P + src_hi * stride_p + word, mask=word < last, other=0, eviction_policy="evict_first")
    block = w0 // 2 + col_s
    ok = w0 + 2 * col_s < last
    s_lo = gl.load(S + srcs_lo * stride_s + block, mask=ok, other=0.0, eviction_policy="evict_first")
    s_hi = gl.load(S + srcs_hi * stride_s + block, mask=ok, other=0.0, eviction_policy="evict_first")
    s_lo = s_lo.to(gl.float32) * SCALE_BIAS
    s_hi = s_hi.to(gl.float32) * SCALE_BIAS
    shape: gl.constexpr = [s_lo.shape[0], s_lo.shape[1], 2 * s_lo.shape[2]]
    s_lo = gl.convert_layout(gl.reshape(gl.join(s_lo, s_lo), shape), L, assert_trivial=True)
    s_hi = gl.convert_layout(gl.reshape(gl.join(s_hi, s_hi), shape), L, assert_trivial=True)
    return q_lo, q_hi, s_lo, s_hi


@gluon.jit
def _stage_x(X, G, XS, first, last, K, eps, PRO: gl.constexpr, KW: gl.constexpr, BW: gl.constexpr,
             SL: gl.constexpr):
    """x of the words first..last as the MMAs take it, into XS [STEPS, 4, KW, BW] a step at a time (int32: [s, i]
    holds step s's bf16 pairs (x_3, x_7), (x_2, x_6), (x_1, x_5), (x_0, x_4) of each word for i = 0..3, as the
    decode pairs the elements); PRO: RMSNorm(x) * G (the squares of all of K summed in a first pass, also by a
    program that takes a slice of K), rounded as the forward rounds it (x * rstd to bf16, then times the weight to
    bf16)."""
    i = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, SL)))
    kw = gl.arange(0, KW, layout=gl.SliceLayout(0, gl.SliceLayout(2, SL)))
    w = gl.arange(0, BW, layout=gl.SliceLayout(0, gl.SliceLayout(1, SL)))
    col = gl.expand_dims(gl.zeros_like(i)[:, None] + kw[None, :], 2) * BW + w[None, None, :]  # [4, KW, BW]
    element = gl.expand_dims(gl.expand_dims(3 - i, 1), 2)  # the low element of pair i; the high one is 4 more
    steps = gl.cdiv(last - first, KW * BW)
    rstd = 1.0
    if PRO:  # the squares of all of x, also where the program takes a slice of K (split)
        sq = gl.zeros([4, KW, BW], gl.float32, SL)
        for step in range(0, gl.cdiv(K // 8, KW * BW)):
            word = step * KW * BW + col
            lo = gl.load(X + word * 8 + element, mask=word < K // 8, other=0.0).to(gl.float32)
            hi = gl.load(X + word * 8 + element + 4, mask=word < K // 8, other=0.0).to(gl.float32)
            sq += lo * lo + hi * hi
        rstd = gl.rsqrt(gl.sum(gl.sum(gl.sum(sq, axis=2), axis=1), axis=0) / K + eps)
    for step in range(0, steps):
        word = first + step * KW * BW + col
        lo = gl.load(X + word * 8 + element, mask=word < last, other=0.0)
        hi = gl.load(X + word * 8 + element + 4, mask=word < last, other=0.0)
        if PRO:
            lo = _normed(lo, rstd, gl.load(G + word * 8 + element, mask=word < last, other=0.0))
            hi = _normed(hi, rstd, gl.load(G + word * 8 + element + 4, mask=word < last, other=0.0))
        XS.index(step).store(_pair_words(lo, hi))
    gl.thread_barrier()


@gluon.jit
def _normed(x, rstd, g):
    """RMSNorm(x) * g for bf16 x and g as the forward rounds it: x * rstd to bf16, then times g to bf16."""
    return ((x.to(gl.float32) * rstd).to(gl.bfloat16).to(gl.float32) * g.to(gl.float32)).to(gl.bfloat16)


@gluon.jit
def _pair_words(lo, hi):
    """bf16 lo and hi as the int32 words the MMAs take: lo in the low half, hi in the high."""
    return (lo.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF) | (hi.to(gl.int16, bitcast=True).to(gl.int32) << 16)


def once_layout(vw: int, kw: int) -> gl.BlockedLayout:
    """[STEPS, 4, KW, BW]: all of a program's x pairs at once (ONCE), no element held by two threads from 2 steps."""
    return gl.BlockedLayout(size_per_thread=[1, 1, 1, vw], threads_per_warp=[2, 4, 1, 4], warps_per_cta=[1, 1, kw, 1],
                            order=[3, 2, 1, 0])


@gluon.jit
def _once_words(first, STEPS: gl.constexpr, KW: gl.constexpr, BW: gl.constexpr, SL4: gl.constexpr):
    """[STEPS, 4, KW, BW] in SL4: the word of each pair _stage_x stages, step by step from word `first` on, and its
    low element (3 - i for pair i; the high one is 4 more)."""
    s = gl.arange(0, STEPS, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, SL4))))
    i = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, SL4))))
    kw = gl.arange(0, KW, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, SL4))))
    w = gl.arange(0, BW, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, SL4))))
    s4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(s, 1), 2), 3)
    i4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(i, 0), 2), 3)
    kw4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(kw, 0), 1), 3)
    w4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(w, 0), 1), 2)
    word = first + (s4 * KW + kw4) * BW + w4 + i4 * 0
    return word, 3 - i4 + word * 0


@gluon.jit
def _norm_weight_once(G, first, last, STEPS: gl.constexpr, KW: gl.constexpr, BW: gl.constexpr, SL4: gl.constexpr):
    """The norm's weight of the pairs _stage_x_once stages (a weight: loaded before the PDL wait)."""
    word, element = _once_words(first, STEPS, KW, BW, SL4)
    g_lo = gl.load(G + word * 8 + element, mask=word < last, other=0.0)
    g_hi = gl.load(G + word * 8 + element + 4, mask=word < last, other=0.0)
    return g_lo, g_hi


@gluon.jit
def _stage_x_once(X, g_lo, g_hi, XS, first, last, K, eps, PRO: gl.constexpr, SPLIT: gl.constexpr,
                  KSTEPS: gl.constexpr, STEPS: gl.constexpr, KW: gl.constexpr, BW: gl.constexpr,
                  SL4: gl.constexpr):
    """_stage_x with every load of a pass issued at once: x of all STEPS steps as one [STEPS, 4, KW, BW] tensor,
    its squares summed from the same registers where the program takes all of K (else from a second load of all of
    K, KSTEPS steps), g_lo and g_hi (_norm_weight_once) loaded before the PDL wait, and one store. The same
    values as _stage_x."""
    word, element = _once_words(first, STEPS, KW, BW, SL4)
    lo = gl.load(X + word * 8 + element, mask=word < last, other=0.0)
    hi = gl.load(X + word * 8 + element + 4, mask=word < last, other=0.0)
    if PRO:
        if SPLIT == 1:  # the slice is all of K
            sq = lo.to(gl.float32) * lo.to(gl.float32) + hi.to(gl.float32) * hi.to(gl.float32)
        else:
            k_word, k_element = _once_words(0, KSTEPS, KW, BW, SL4)
            k_lo = gl.load(X + k_word * 8 + k_element, mask=k_word < K // 8, other=0.0).to(gl.float32)
            k_hi = gl.load(X + k_word * 8 + k_element + 4, mask=k_word < K // 8, other=0.0).to(gl.float32)
            sq = k_lo * k_lo + k_hi * k_hi
        rstd = gl.rsqrt(gl.sum(gl.sum(gl.sum(gl.sum(sq, axis=3), axis=2), axis=1), axis=0) / K + eps)
        lo = _normed(lo, rstd, g_lo)
        hi = _normed(hi, rstd, g_hi)
    xs = XS._reinterpret(gl.int32, [STEPS, 4, KW, BW], gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))  # same bytes
    xs.store(_pair_words(lo, hi))
    gl.thread_barrier()


PROBE_SLOTS = gl.constexpr(16)  # int64 a program's record (PROBES): see _probe
PROBE_ASM = gl.constexpr("mov.u64 $0, %globaltimer;\nmov.u64 $1, %clock64;")


@gluon.jit
def _probe(PROBES, point: gl.constexpr, KW: gl.constexpr):
    """A timing probe (bench/nvfp4_probe.py), stored at once so that it holds no register: this program's record
    in PROBES (this launch's records, one a program) gets the global timer (ns) at slot 5 + point and the SM's cycle
    counter at slot 10 + point; point 0 (the start) also writes program ids 0 and 1, the grid's programs along 0 and
    1, and the SM (slots 0-4). Points: 0 start, 1 after the PDL wait, 2 x staged, 3 after the loop, 4 the end."""
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [KW], [0])
    zero = gl.full([1], 0, gl.int32, lay)
    at = PROBES + (gl.program_id(1) * gl.num_programs(0) + gl.program_id(0)) * PROBE_SLOTS + gl.arange(0, 1, lay)
    if point == 0:
        sm = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [zero], dtype=gl.int32, is_pure=False, pack=1)
        gl.store(at, zero.to(gl.int64) + gl.program_id(0))
        gl.store(at + 1, zero.to(gl.int64) + gl.program_id(1))
        gl.store(at + 2, zero.to(gl.int64) + gl.num_programs(0))
        gl.store(at + 3, zero.to(gl.int64) + gl.num_programs(1))
        gl.store(at + 4, sm.to(gl.int64))
    now, clock = gl.inline_asm_elementwise(PROBE_ASM, "=l,=l,r", [zero], dtype=(gl.int64, gl.int64), is_pure=False,
                                           pack=1)
    gl.store(at + 5 + point, now)
    gl.store(at + 10 + point, clock)


@gluon.jit
def _pair_tile(X, G, R, P, S, TS, P2, S2, TS2, Y, PARTIAL, COUNTERS, tile, N, K, N_ALL, stride_p, stride_s,
               ts_stride, stride_p2, stride_s2, ts_stride2, y_offset, eps, SPLIT: gl.constexpr, STEPS: gl.constexpr,
               VW: gl.constexpr, KW: gl.constexpr, L: gl.constexpr, SL: gl.constexpr, SCL: gl.constexpr,
               FINISH: gl.constexpr, PRO: gl.constexpr, GLU: gl.constexpr, RES: gl.constexpr, PDL: gl.constexpr,
               LITE: gl.constexpr, ONCE: gl.constexpr, KSTEPS: gl.constexpr, SL4: gl.constexpr, PROBES=None):
    """Rows tile x ROWS.. of one weight (GLU: gate P and up P2) over this program's slice of K."""
    if PROBES is not None:
        _probe(PROBES, 0, KW)
    BW: gl.constexpr = 4 * VW
    g = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))
    rows_lo = tile * ROWS + g
    src_lo = gl.expand_dims(gl.expand_dims(gl.minimum(rows_lo, N - 1), 0), 2)  # the tail re-reads the last row
    src_hi = gl.expand_dims(gl.expand_dims(gl.minimum(rows_lo + 8, N - 1), 0), 2)
    kw = gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, L)))
    w = gl.arange(0, BW, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))
    col = gl.expand_dims(gl.expand_dims(kw, 1), 2) * BW + w[None, None, :]  # a step's word of each warp and lane
    # the same for the block scales, one per two words
    gs = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, SCL)))
    srcs_lo = gl.expand_dims(gl.expand_dims(gl.minimum(tile * ROWS + gs, N - 1), 0), 2)
    srcs_hi = gl.expand_dims(gl.expand_dims(gl.minimum(tile * ROWS + gs + 8, N - 1), 0), 2)
    kws = gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, SCL)))
    h = gl.arange(0, BW // 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, SCL)))
    col_s = gl.expand_dims(gl.expand_dims(kws, 1), 2) * (BW // 2) + h[None, None, :]
    words_k = K // 8
    chunk = gl.cdiv(gl.cdiv(words_k, SPLIT), KW * BW) * KW * BW
    first = gl.program_id(1) * chunk
    last = gl.minimum(words_k, first + chunk)
    XS = gl.allocate_shared_memory(gl.int32, [STEPS, 4, KW, BW], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    # the same bytes (row-major, unswizzled) as STEPS x 4 slices [KW, BW], one a load
    XV = XS._reinterpret(gl.int32, [STEPS * 4, KW, BW], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    x_layout: gl.constexpr = gl.SliceLayout(1, L)
    if PDL == AT_START:
        gdc_launch_dependents()
    # the first step's weights (never written by a kernel) before the wait
    q_lo, q_hi, s_lo, s_hi = _weights(P, S, stride_p, stride_s, src_lo, src_hi, srcs_lo, srcs_hi, col, col_s, first,
                                      last, L)
    u_lo, u_hi, t_lo, t_hi = q_lo, q_hi, s_lo, s_hi
    if GLU:
        u_lo, u_hi, t_lo, t_hi = _weights(P2, S2, stride_p2, stride_s2, src_lo, src_hi, srcs_lo, srcs_hi, col, col_s,
                                          first, last, L)
    if ONCE and PRO:
        g_lo, g_hi = _norm_weight_once(G, first, last, STEPS, KW, BW, SL4)
    else:
        g_lo, g_hi = 0.0, 0.0
    if PDL:
        gdc_wait()
    if PDL == AFTER_WAIT:
        gdc_launch_dependents()
    if PROBES is not None:
        _probe(PROBES, 1, KW)
    if ONCE:
        _stage_x_once(X, g_lo, g_hi, XS, first, last, K, eps, PRO, SPLIT, KSTEPS, STEPS, KW, BW, SL4)
    else:
        _stage_x(X, G, XS, first, last, K, eps, PRO, KW, BW, SL)
    if PROBES is not None:
        _probe(PROBES, 2, KW)
    zero = gl.zeros([KW, 8, BW], gl.float32, L)
    c0, c1, c2, c3 = zero, zero, zero, zero
    e0, e1, e2, e3 = zero, zero, zero, zero
    for step in range(0, gl.cdiv(last - first, KW * BW)):
        w0 = first + (step + 1) * KW * BW  # the next step's weights, in flight during this one's MMAs
        nq_lo, nq_hi, ns_lo, ns_hi = _weights(P, S, stride_p, stride_s, src_lo, src_hi, srcs_lo, srcs_hi, col, col_s,
                                              w0, last, L)
        nu_lo, nu_hi, nt_lo, nt_hi = nq_lo, nq_hi, ns_lo, ns_hi
        if GLU:
            nu_lo, nu_hi, nt_lo, nt_hi = _weights(P2, S2, stride_p2, stride_s2, src_lo, src_hi, srcs_lo, srcs_hi, col,
                                                  col_s, w0, last, L)
        x0 = gl.expand_dims(XV.index(step * 4).load(x_layout), 1)
        x1 = gl.expand_dims(XV.index(step * 4 + 1).load(x_layout), 1)
        x2 = gl.expand_dims(XV.index(step * 4 + 2).load(x_layout), 1)
        x3 = gl.expand_dims(XV.index(step * 4 + 3).load(x_layout), 1)
        c0, c1, c2, c3 = _pair_mma(q_lo, q_hi, s_lo, s_hi, x0, x1, x2, x3, c0, c1, c2, c3, LITE)
        if GLU:
            e0, e1, e2, e3 = _pair_mma(u_lo, u_hi, t_lo, t_hi, x0, x1, x2, x3, e0, e1, e2, e3, LITE)
        q_lo, q_hi, s_lo, s_hi = nq_lo, nq_hi, ns_lo, ns_hi
        u_lo, u_hi, t_lo, t_hi = nu_lo, nu_hi, nt_lo, nt_hi
    if PROBES is not None:
        _probe(PROBES, 3, KW)
    if PDL == AFTER_LOOP:
        gdc_launch_dependents()
    # every lane of a row holds its sum over the warp's words (the MMA summed the four lanes t): a quarter of the
    # sum over the lanes, then over the warps
    rows = gl.join(rows_lo, rows_lo + 8)  # [8, 2]: rows g and g + 8
    src = gl.minimum(rows, N - 1)
    y = gl.join(gl.sum(gl.sum(c0, axis=2), axis=0), gl.sum(gl.sum(c2, axis=2), axis=0)) * 0.25
    if SPLIT > 1:  # _split_store scales by the tensor scale x X_SCALE: y x 2^10 / 2^63 first (exact)
        _split_store(y * (OUT_UNIT / X_SCALE), rows, src, TS, ts_stride, Y, R, PARTIAL, COUNTERS, N, N_ALL,
                     y_offset, SPLIT, FINISH, RES)
    else:
        y2 = y
        if GLU:
            y2 = gl.join(gl.sum(gl.sum(e0, axis=2), axis=0), gl.sum(gl.sum(e2, axis=2), axis=0)) * 0.25
        _layer_store(y, y2, rows, src, TS, ts_stride, TS2, ts_stride2, Y, R, N, y_offset, OUT_UNIT, GLU, RES)
    if PROBES is not None:
        _probe(PROBES, 4, KW)


@gluon.jit(do_not_specialize=["ts_stride0", "ts_stride1", "ts_stride2"])
def pair_gemv_kernel(X, G, R, P0, S0, TS0, P1, S1, TS1, P2, S2, TS2, Y, PARTIAL, COUNTERS, N0, N1, N2, K,
                     stride_p0, stride_s0, ts_stride0, stride_p1, stride_s1, ts_stride1, stride_p2, stride_s2,
                     ts_stride2, eps, PARTS: gl.constexpr, SPLIT: gl.constexpr, STEPS: gl.constexpr,
                     VW: gl.constexpr, KW: gl.constexpr, L: gl.constexpr, SL: gl.constexpr, SCL: gl.constexpr,
                     FINISH: gl.constexpr, PRO: gl.constexpr, GLU: gl.constexpr, RES: gl.constexpr,
                     PDL: gl.constexpr, LITE: gl.constexpr = 0, ONCE: gl.constexpr = False,
                     KSTEPS: gl.constexpr = 1, SL4: gl.constexpr = None, PROBES=None):
    """wide_nvfp4.layer_gemv_kernel's programs (1-3 weights, or GLU's gate W0 and up W1) on ROWS-row tiles through
    _pair_tile. STEPS: a power of two of at least the steps of K a program takes (its shared memory for x).
    PROBES (int64, bench/nvfp4_probe.py): each program's timeline written there (_probe); None: no probe."""
    pid = gl.program_id(0)
    n_all = N0 + N1 + N2
    tiles0 = gl.cdiv(N0, ROWS)
    tiles1 = gl.cdiv(N1, ROWS)
    if GLU or PARTS == 1 or pid < tiles0:
        _pair_tile(X, G, R, P0, S0, TS0, P1, S1, TS1, Y, PARTIAL, COUNTERS, pid, N0, K, n_all, stride_p0,
                   stride_s0, ts_stride0, stride_p1, stride_s1, ts_stride1, 0, eps, SPLIT, STEPS, VW, KW, L, SL,
                   SCL, FINISH, PRO, GLU, RES, PDL, LITE, ONCE, KSTEPS, SL4, PROBES)
    elif PARTS == 2 or pid < tiles0 + tiles1:
        _pair_tile(X, G, R, P1, S1, TS1, P1, S1, TS1, Y, PARTIAL, COUNTERS, pid - tiles0, N1, K, n_all, stride_p1,
                   stride_s1, ts_stride1, stride_p1, stride_s1, ts_stride1, N0, eps, SPLIT, STEPS, VW, KW, L, SL,
                   SCL, FINISH, PRO, False, RES, PDL, LITE, ONCE, KSTEPS, SL4, PROBES)
    else:
        _pair_tile(X, G, R, P2, S2, TS2, P2, S2, TS2, Y, PARTIAL, COUNTERS, pid - tiles0 - tiles1, N2, K, n_all,
                   stride_p2, stride_s2, ts_stride2, stride_p2, stride_s2, ts_stride2, N0 + N1, eps, SPLIT, STEPS,
                   VW, KW, L, SL, SCL, FINISH, PRO, False, RES, PDL, LITE, ONCE, KSTEPS, SL4, PROBES)
