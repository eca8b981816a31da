"""The NVFP4 decode GEMV on tensor cores (Hopper, and Ampere on): one row x times packed E2M1 weights + E4M3 block
scales, dequantized in registers straight into the A operand of bf16 mma.sync (m16n8k16, fp32 accumulation).

Written in Gluon (Triton's explicit-layout dialect) because the decode depends on which thread holds which weight:
with the dot operand's k_width 8 each thread holds 8 consecutive k of a row, i.e. exactly one packed int32 word, so
one inline-PTX block turns a word into the four bf16x2 registers of the operand with no data exchanged between
threads and no shared memory. Per byte (two nibbles, elements 2p and 2p+1):

    u = word << 4                                  once per word
    t = prmt(u, word): byte 1 <- u.byte p (nibble 2p on top), byte 3 <- word.byte p (nibble 2p+1 on top)
    pair = (t & 0x80008000) | ((t >> 6) & 0x01C001C0)    sign -> bit 15, e1 e0 m -> bits 8..6 of each bf16:
                                                   e2m1 x 2^-126 (code 1, 0.5, lands on a bf16 subnormal, exact)
    pair = pair * (block_scale x 2^112, both halves)     bf16 multiply, exact: e2m1 x E4M3 has 6 significant bits

so each weight enters the MMA as e2m1 x block_scale x 2^-14 exactly, x (every column of the B operand; column 0
is read) as it is, and the fp32 result is multiplied by 2^14 x tensor_scale once. Compiled for sm_90 the loop
spends 32-33 instructions per packed word against 54-57 for qwenlab.quant.triton_nvfp4's FMA GEMV
(bench/nvfp4_gemv_sass.py), with no shuffles, barriers or shared memory; on an H200 it is correct and no faster
than the FMA GEMV (doc/nvfp4.md), so it runs only when asked: QWENLAB_NVFP4_GEMV=mma (triton_nvfp4.gemv_engine).

Split-K writes tensor-scaled fp32 partial rows that triton_nvfp4's finish pass sums. Gluon kernels do not run in
Triton's CPU interpreter; tests/quant/test_mma_nvfp4.py checks them against float64 on CUDA and runs the PTX above
through a small emulator on the CPU.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2


def _decode_asm() -> str:
    """The inline PTX: inputs $4..$11 the word (eight copies, one per element it holds), $12..$15 the block scale
    pair (bf16x2, both halves the same); outputs $0..$3 the bf16x2 pairs of bytes 0..3 (elements 0-1, ..., 6-7)."""
    lines = ["{", ".reg .b32 u, t, v;", "shl.b32 u, $4, 4;"]
    for p in range(4):
        select = p | (p << 4) | ((4 + p) << 8) | ((4 + p) << 12)  # result bytes 0..3 <- u.p, u.p, word.p, word.p
        lines += [f"prmt.b32 t, u, $4, 0x{select:04x};", "shr.b32 v, t, 6;", "and.b32 v, v, 0x01C001C0;",
                  "and.b32 t, t, 0x80008000;", "or.b32 t, t, v;", f"mul.rn.bf16x2 ${p}, t, ${12 + p};"]
    return "\n".join(lines + ["}"])


DECODE_ASM = _decode_asm()
_ASM = gl.constexpr(DECODE_ASM)
_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 4 + ["r"] * 12))
SCALE_UP = gl.constexpr(5.192296858534828e33)  # 2^112: E4M3 x 2^112 stays a normal bf16 (2^-9 .. 448)
RESULT_UP = gl.constexpr(16384.0)  # 2^14 = 2^126 / 2^112


def operand_layout(block_n: int, block_k: int, warps: int) -> gl.DistributedLinearLayout:
    """[BLOCK_N, BLOCK_K / 8, 8]: (row, word, element of the word) laid out so that its reshape to
    [BLOCK_N, BLOCK_K] is the A operand of mma v2 with k_width 8 (warps stacked along rows, 16 rows each): the 8
    elements of a word in consecutive registers of one thread, lanes 0-1 -> words 1, 2, lanes 2-4 -> rows 1, 2, 4,
    then registers -> row 8, words 4, 8, .., rows 16 x warps, ..; warps -> rows 16, 32, .."""
    registers = [[0, 0, 1], [0, 0, 2], [0, 0, 4], [8, 0, 0]]
    word = 4
    while word < block_k // 8:
        registers.append([0, word, 0])
        word *= 2
    row = 16 * warps
    while row < block_n:
        registers.append([row, 0, 0])
        row *= 2
    warp_bases = []
    row = 16
    while row < 16 * warps:
        warp_bases.append([row, 0, 0])
        row *= 2
    lanes = [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    return gl.DistributedLinearLayout(reg_bases=registers, lane_bases=lanes, warp_bases=warp_bases, block_bases=[],
                                      shape=[block_n, block_k // 8, 8])


@gluon.jit
def _load_step(word_ptrs, scale_ptrs, X, w, kx, k0, K, EVEN_K: gl.constexpr):
    """One step's packed words, E4M3 scales and x from element k0 on (masked past K unless EVEN_K)."""
    if EVEN_K:
        return gl.load(word_ptrs + k0 // 8), gl.load(scale_ptrs + k0 // 16), gl.load(X + k0 + kx)
    ok = k0 // 8 + w < K // 8
    return (gl.load(word_ptrs + k0 // 8, mask=ok[None, :], other=0),
            gl.load(scale_ptrs + k0 // 16, mask=ok[None, :], other=0.0),
            gl.load(X + k0 + kx, mask=k0 + kx < K, other=0.0))


@gluon.jit
def _mma_tile(X, P, S, TS, Y, PARTIAL, tile, N, K, N_ALL, stride_p, stride_s, ts_stride, y_offset,
              SPLIT: gl.constexpr, EVEN_K: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
              WARPS: gl.constexpr, L3: gl.constexpr):
    """Rows tile*BLOCK_N.. of one weight over this program's 1/SPLIT of K, into Y at y_offset (or PARTIAL)."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
    words_layout: gl.constexpr = gl.SliceLayout(2, L3)
    BW: gl.constexpr = BLOCK_K // 8
    rows = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, words_layout))
    src = gl.minimum(rows, N - 1)  # the tail tile re-reads the last row instead of masking every load
    w = gl.arange(0, BW, layout=gl.SliceLayout(0, words_layout))
    kx = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, b_layout))
    eight = gl.full([1, 1, 8], 0, gl.int32, L3)  # broadcasts each word to the 8 elements it holds
    columns = gl.full([1, 8], 0, gl.bfloat16, b_layout)  # x in all 8 columns of B; column 0 is read
    chunk = gl.cdiv(gl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
    first = gl.program_id(1) * chunk
    last = gl.minimum(K, first + chunk)
    acc = gl.zeros([BLOCK_N, 8], gl.float32, mma)
    word_ptrs = P + src[:, None] * stride_p + w[None, :]  # advanced by k0 / 8 words (k0 / 16 scales) per step
    scale_ptrs = S + src[:, None] * stride_s + (w // 2)[None, :]
    # software pipelining in registers: the next step's words, scales and x are in flight while this one decodes
    # (on an H200 this measured the same as loading each step where it is used: doc/evidence, run5_mma_prefetch)
    words, scale, x = _load_step(word_ptrs, scale_ptrs, X, w, kx, gl.minimum(first, K - BLOCK_K) if EVEN_K else first,
                                 K, EVEN_K)
    for k0 in range(first, last, BLOCK_K):
        ahead = gl.minimum(k0 + BLOCK_K, K - BLOCK_K) if EVEN_K else k0 + BLOCK_K
        next_words, next_scale, next_x = _load_step(word_ptrs, scale_ptrs, X, w, kx, ahead, K, EVEN_K)
        scaled = (scale.to(gl.float32) * SCALE_UP).to(gl.bfloat16)
        words3, _ = gl.broadcast(gl.expand_dims(words, 2), eight)
        scale3, _ = gl.broadcast(gl.expand_dims(scaled, 2), eight)
        a = gl.inline_asm_elementwise(_ASM, _CONSTRAINTS, [words3, scale3], dtype=gl.bfloat16, is_pure=True,
                                      pack=8)
        a = gl.convert_layout(gl.reshape(a, [BLOCK_N, BLOCK_K]), a_layout)  # the same layout: no data moves
        b, _ = gl.broadcast(gl.expand_dims(x, 1), columns)
        acc = mma_v2(a, b, acc)
        words, scale, x = next_words, next_scale, next_x
    out_column = gl.arange(0, 8, layout=gl.SliceLayout(0, mma))
    y = gl.sum(gl.where(out_column[None, :] == 0, acc, 0.0), axis=1)
    out_rows = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    y = y * (gl.load(TS + gl.minimum(out_rows, N - 1) * ts_stride) * RESULT_UP)
    if SPLIT > 1:
        gl.store(PARTIAL + gl.program_id(1) * N_ALL + y_offset + out_rows, y, mask=out_rows < N)
    else:
        gl.store(Y + y_offset + out_rows, y.to(Y.dtype.element_ty), mask=out_rows < N)


@gluon.jit(do_not_specialize=["ts_stride0", "ts_stride1", "ts_stride2"])
def mma_gemv_kernel(X, P0, S0, TS0, P1, S1, TS1, P2, S2, TS2, Y, PARTIAL, N0, N1, N2, K,
                    stride_p0, stride_s0, ts_stride0, stride_p1, stride_s1, ts_stride1, stride_p2, stride_s2,
                    ts_stride2, PARTS: gl.constexpr, SPLIT: gl.constexpr, EVEN_K: gl.constexpr,
                    BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, WARPS: gl.constexpr, L3: gl.constexpr):
    """y = x @ [W0; W1; W2].T for PARTS (1-3) NVFP4 weights of the same K in one launch: program (i, j) takes row
    tile i of W0's tiles, then W1's, then W2's, over the j-th of SPLIT slices of K."""
    pid = gl.program_id(0)
    n_all = N0 + N1 + N2
    tiles0 = gl.cdiv(N0, BLOCK_N)
    tiles1 = gl.cdiv(N1, BLOCK_N)
    if PARTS == 1 or pid < tiles0:
        _mma_tile(X, P0, S0, TS0, Y, PARTIAL, pid, N0, K, n_all, stride_p0, stride_s0, ts_stride0, 0,
                  SPLIT, EVEN_K, BLOCK_N, BLOCK_K, WARPS, L3)
    elif PARTS == 2 or pid < tiles0 + tiles1:
        _mma_tile(X, P1, S1, TS1, Y, PARTIAL, pid - tiles0, N1, K, n_all, stride_p1, stride_s1, ts_stride1, N0,
                  SPLIT, EVEN_K, BLOCK_N, BLOCK_K, WARPS, L3)
    else:
        _mma_tile(X, P2, S2, TS2, Y, PARTIAL, pid - tiles0 - tiles1, N2, K, n_all, stride_p2, stride_s2,
                  ts_stride2, N0 + N1, SPLIT, EVEN_K, BLOCK_N, BLOCK_K, WARPS, L3)
