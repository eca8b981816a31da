"""A Qwen3 decoder layer for one token in a few Triton kernels of qwenlab's own: the graph engine's layer where the
layer allows it (qwenlab.generation.kernels.fits). torch.compile's layer ran twelve kernels a layer: four GEMVs,
the attention and seven small fused elementwise kernels of 1-2 us each, most of them waiting on memory latency, not
bandwidth. A dense layer (bf16, fp16, fp32) takes five:

1. RMSNorm + the q/k/v GEMV: each program multiplies by the norm's weight as it reads x and sums x's squares in
   the same pass (no program splits K), then scales its sums by rstd;
2. q/k RMSNorm + RoPE + the cache write + split-K decode attention over the valid slots, whose chunks are merged
   by the last program of each KV head to finish (a counter per head, set back to zero by that program);
3. o_proj GEMV + the residual add (epilogue);
4. RMSNorm + the gate/up GEMV + SiLU(gate) x up (each program holds the same rows of gate and up);
5. the down GEMV + the residual add.

Every kernel rounds to the model's dtype where the module forward does (each projection's output, q/k after their
norm and after each RoPE product, SiLU and its product with up, each residual sum), but for the input norms of the
two GEMVs that take them: their normalised x is not rounded before the product (rstd scales the sums), one
rounding fewer than the forward, so closer to float64; float32 sums run in another order.
With QWENLAB_PDL on sm_90+, each is launched with programmatic dependent launch: it starts while the kernel
before it ends, reads its first weight tile (weights never change) and only then waits for the previous kernel's
output (gdc_wait). Where a kernel lets the next one launch is PDL_MODES (first thing, after its own wait, after
its main loop); after the main loop by default, QWENLAB_PDL=0 for none (pdl_wanted says why).
The GEMV's tile is autotuned per shape and prologue/epilogue (TILES).

A W4A16 NVFP4 layer takes five too where the wide-load GEMV runs (QWENLAB_NVFP4_GEMV=wide, the default on CUDA):
its GEMVs (qwenlab.quant.wide_nvfp4.layer_gemv_kernel, q/k/v and gate/up one launch each over their separate
weights) take the same prologue and epilogues, and the same PDL (each reads its first step's packed weights and
scales before it waits). With another NVFP4 GEMV it takes nine: those GEMVs have no prologue or epilogue, so an
add + RMSNorm kernel comes before q/k/v (no add), after o (the residual add and the post-attention norm) and after
down (the add), and SiLU x up before down. The attention is kernel 2 above either way. torch's compiled layer ran
twelve.
"""
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import triton
import triton.language as tl
from torch import nn

from qwenlab.errors import QwenlabError
from qwenlab.generation.decode_attention import merge_chunks, online_softmax_step
from qwenlab.generation.kernels import layer_kind
from qwenlab.quant import pdl
from qwenlab.quant.autotuning import AUTOTUNE

try:  # Programmatic Dependent Launch, Triton 3.4+
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)
PLAIN, RMS = 0, 1  # the GEMV's prologue: x as it is, RMSNorm(x) * weight
# With PDL, where each kernel lets the next one launch (gdc_launch_dependents; PDL = 0: no PDL; qwenlab.quant.pdl):
TRIGGER_AT_START = tl.constexpr(pdl.AT_START)
TRIGGER_AFTER_WAIT = tl.constexpr(pdl.AFTER_WAIT)
TRIGGER_AFTER_LOOP = tl.constexpr(pdl.AFTER_LOOP)
PDL_MODES = pdl.MODES
BLOCK = 64  # cache slots per step of an attention program's loop


@triton.jit
def _silu(gate, dtype: tl.constexpr):
    """F.silu of float32 `gate` as the forward computes it in `dtype` (rounded to it), back in float32."""
    return (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)


@triton.jit
def _row_in(X, G, cols, ok, PRO: tl.constexpr):
    """The GEMV's input at `cols` in float32, and x there (for the norm's sum of squares). RMS: x times the norm's
    weight (its rstd scales the products' sums)."""
    x = tl.load(X + cols, mask=ok, other=0.0).to(tl.float32)
    if PRO == 1:
        return x * tl.load(G + cols, mask=ok, other=0.0).to(tl.float32), x
    else:
        return x, x


# Tiles the fused GEMV's autotuner tries (BLOCK_N, BLOCK_K, num_warps, num_stages): the plain GEMV's (few rows a
# program, long K slices) and taller ones, which spread each program's prologue work (the norm's weight) over
# more weight bytes.
TILES = [(2, 1024, 4, 2), (4, 512, 4, 4), (4, 1024, 8, 4), (8, 256, 4, 3), (8, 512, 8, 3), (16, 256, 8, 3),
         (16, 128, 4, 4), (32, 128, 8, 3)]
if INTERPRETED:  # the interpreter cannot time tiles
    TILES = TILES[:1]


@triton.jit
def _fused_gemv_kernel(X, G, R, W, Y, N, K, stride_wn, eps, PRO: tl.constexpr, GLU: tl.constexpr, RES: tl.constexpr,
                       PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y = [R +] epilogue(W @ prologue(X)), one token. PRO: PLAIN or RMS (G the norm's weight, eps: rstd * (W @ (G *
    X)), rstd from the same pass over X). GLU: W holds 2N rows, gate then up; each program multiplies its rows of
    both and writes F.silu(gate) * up, rounded as the forward rounds the projection, SiLU and the product. RES: add
    R (the residual) to the rounded result."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    dtype = Y.dtype.element_ty
    if PDL == TRIGGER_AT_START:
        gdc_launch_dependents()
    tile = rows[:, None] * stride_wn + cols[None, :]
    ok = row_ok[:, None] & (cols < K)[None, :]
    w = tl.load(W + tile, mask=ok, other=0.0, eviction_policy="evict_first")
    if GLU:
        w_up = tl.load(W + N * stride_wn + tile, mask=ok, other=0.0, eviction_policy="evict_first")
    if PDL:
        gdc_wait()  # X and R are the previous kernels' outputs
    if PDL == TRIGGER_AFTER_WAIT:
        gdc_launch_dependents()
    xin, x = _row_in(X, G, cols, cols < K, PRO)
    acc = w.to(tl.float32) * xin[None, :]
    if GLU:
        acc_up = w_up.to(tl.float32) * xin[None, :]
    if PRO == 1:
        squares = x * x
    for k0 in range(BLOCK_K, K, BLOCK_K):
        c = k0 + cols
        tile = rows[:, None] * stride_wn + c[None, :]
        ok = row_ok[:, None] & (c < K)[None, :]
        w = tl.load(W + tile, mask=ok, other=0.0, eviction_policy="evict_first")
        if GLU:
            w_up = tl.load(W + N * stride_wn + tile, mask=ok, other=0.0, eviction_policy="evict_first")
        xin, x = _row_in(X, G, c, c < K, PRO)
        acc += w.to(tl.float32) * xin[None, :]
        if GLU:
            acc_up += w_up.to(tl.float32) * xin[None, :]
        if PRO == 1:
            squares += x * x
    if PDL == TRIGGER_AFTER_LOOP:
        gdc_launch_dependents()
    y = tl.sum(acc, 1)
    if PRO == 1:  # RMSNorm's rstd from the x this pass read (every program reads all of it)
        rstd = tl.rsqrt(tl.sum(squares, 0) / K + eps)
        y = y * rstd
    if GLU:
        up = tl.sum(acc_up, 1)
        if PRO == 1:
            up = up * rstd
        gate = y.to(dtype).to(tl.float32)
        y = _silu(gate, dtype) * up.to(dtype).to(tl.float32)
    y = y.to(dtype)
    if RES:
        y = (tl.load(R + rows, mask=row_ok, other=0.0).to(tl.float32) + y.to(tl.float32)).to(dtype)
    tl.store(Y + rows, y, mask=row_ok)


_tuned_gemv_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in TILES],
    key=["N", "K", "PRO", "GLU", "RES"], **AUTOTUNE)(_fused_gemv_kernel)


@triton.jit
def _norm_rope(QKV, NW, COS, SIN, heads, d, mask, eps, D: tl.constexpr):
    """Rows `heads` of QKV (head_dim D each) through RMSNorm (weight NW) and RoPE, rounded as the forward rounds:
    [len(heads), DP] float32 holding values of QKV's dtype."""
    dtype = QKV.dtype.element_ty
    half = (d + D // 2) % D  # rotate_half's partner of each element
    x = tl.load(QKV + heads[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xh = tl.load(QKV + heads[:, None] * D + half[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
    dm = d < D
    x = (tl.load(NW + d, mask=dm, other=0.0).to(tl.float32)[None, :] * (x * rstd).to(dtype).to(tl.float32))
    xh = (tl.load(NW + half, mask=dm, other=0.0).to(tl.float32)[None, :] * (xh * rstd).to(dtype).to(tl.float32))
    x, xh = x.to(dtype).to(tl.float32), xh.to(dtype).to(tl.float32)
    rot = tl.where(d[None, :] < D // 2, -xh, xh)
    cos = tl.load(COS + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(SIN + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    return ((x * cos).to(dtype).to(tl.float32) + (rot * sin).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)


@triton.jit
def _fused_attend_kernel(QKV, QW, KW, COS, SIN, KC, VC, POS, OUT, O_PART, M_PART, L_PART, COUNTERS, stride_kh,
                         stride_ks, stride_vh, stride_vs, n_chunks, eps, SM_SCALE: tl.constexpr, G: tl.constexpr,
                         GP: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                         CHUNK: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
    """One token's attention from the q/k/v projection's output: program (KV head, chunk of CHUNK slots). Each
    normalises and rotates its G query heads and the new key, the one holding slot `pos` writes the new key and
    value there, and each scores its valid slots with an online softmax (the new key and value from registers).
    Each block's cached keys and values are read one block ahead, the first before the norms and RoPE, so that
    their latency (HBM: the other layers' weights have passed through L2 since) overlaps that work."""
    kvh = tl.program_id(0)
    chunk = tl.program_id(1)
    if PDL == TRIGGER_AT_START:
        gdc_launch_dependents()
    if PDL:
        gdc_wait()
    if PDL == TRIGGER_AFTER_WAIT:
        gdc_launch_dependents()
    pos = tl.load(POS)
    length = pos + 1
    start = chunk * CHUNK
    if start < length:
        dtype = KC.dtype.element_ty
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        dm = d < D
        end = tl.minimum(start + CHUNK, length)
        # the first block's cached keys and values, before the new slot is written: slot pos is replaced from
        # registers below, so what it held before does not matter
        k_next, v_next = _kv_block(KC, VC, kvh, start + tl.arange(0, BLOCK), end, d, stride_kh, stride_ks,
                                   stride_vh, stride_vs, D)
        q = _norm_rope(QKV, QW, COS, SIN, kvh * G + g, d, (g[:, None] < G) & dm[None, :], eps, D).to(dtype)
        one = tl.arange(0, 1)
        k_new = _norm_rope(QKV + KVH * G * D, KW, COS, SIN, kvh + one, d, dm[None, :], eps, D).to(dtype)
        v_new = tl.load(QKV + (KVH * G + KVH + kvh) * D + d, mask=dm, other=0.0)
        if pos < end:  # this chunk holds the new slot
            tl.store(KC + kvh * stride_kh + pos * stride_ks + d[None, :] + one[:, None] * 0, k_new,
                     mask=dm[None, :])
            tl.store(VC + kvh * stride_vh + pos * stride_vs + d, v_new, mask=dm)
        m = tl.full([GP], -1e30, tl.float32)
        total = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        for off in range(start, end, BLOCK):
            s = off + tl.arange(0, BLOCK)
            valid = s < end
            is_new = (s == pos)[:, None]
            k = tl.where(is_new, k_new, k_next)
            v = tl.where(is_new, v_new[None, :], v_next)
            k_next, v_next = _kv_block(KC, VC, kvh, s + BLOCK, end, d, stride_kh, stride_ks, stride_vh, stride_vs,
                                       D)
            if IEEE:  # float32 operands (a float32 model, or Triton's interpreter, whose bf16 dot is wrong)
                scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            m_new, alpha, p = online_softmax_step(scores, valid, m, SM_SCALE)
            if IEEE:
                pv = tl.dot(p.to(dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(dtype), v)
            total = total * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + pv
            m = m_new
        if PDL == TRIGGER_AFTER_LOOP:
            gdc_launch_dependents()
        out_mask = (g[:, None] < G) & dm[None, :]
        used = tl.cdiv(length, CHUNK)
        if used == 1:
            tl.store(OUT + (kvh * G + g)[:, None] * D + d[None, :], (acc / total[:, None]).to(dtype), mask=out_mask)
        else:
            part = (kvh * n_chunks + chunk) * GP
            tl.store(M_PART + part + g, m)
            tl.store(L_PART + part + g, total)
            tl.store(O_PART + (part + g)[:, None] * DP + d[None, :], acc)
            tl.debug_barrier()  # every thread's partial stored before the count says so
            done = tl.atomic_add(COUNTERS + kvh, 1, sem="acq_rel", scope="gpu")
            if done == used - 1:  # the last chunk of this KV head to finish merges them all, in chunk order
                acc, total = merge_chunks(O_PART, M_PART, L_PART, kvh, n_chunks, used, g, d, GP, DP, ".cg")
                tl.store(OUT + (kvh * G + g)[:, None] * D + d[None, :], (acc / total[:, None]).to(dtype),
                         mask=out_mask)
                tl.atomic_xchg(COUNTERS + kvh, 0, sem="relaxed", scope="gpu")


@triton.jit
def _kv_block(KC, VC, kvh, s, end, d, stride_kh, stride_ks, stride_vh, stride_vs, D: tl.constexpr):
    """The cached keys and values of KV head kvh at slots s ([BLOCK, DP], zeros from `end` on)."""
    kv_mask = (s < end)[:, None] & (d < D)[None, :]
    k = tl.load(KC + kvh * stride_kh + s[:, None] * stride_ks + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(VC + kvh * stride_vh + s[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _add_norm_kernel(X, D, G, XO, H, K, eps, ADD: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    """One program: x = X [+ D] (the residual add, rounded) into XO, and RMSNorm(x) * G into H, rounded as the
    forward rounds (the NVFP4 layer's norms and residual adds, around GEMVs that take no prologue)."""
    dtype = X.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    ok = cols < K
    x = tl.load(X + cols, mask=ok, other=0.0).to(tl.float32)
    if ADD:
        x = (x + tl.load(D + cols, mask=ok, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
        tl.store(XO + cols, x.to(dtype), mask=ok)
    if NORM:
        rstd = tl.rsqrt(tl.sum(x * x, 0) / K + eps)
        h = tl.load(G + cols, mask=ok, other=0.0).to(tl.float32) * (x * rstd).to(dtype).to(tl.float32)
        tl.store(H + cols, h.to(dtype), mask=ok)


@triton.jit
def _silu_up_kernel(GU, A, K, BLOCK: tl.constexpr):
    """A = F.silu(gate) * up, GU holding gate then up (K each), rounded as the forward rounds."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < K
    dtype = GU.dtype.element_ty
    gate = tl.load(GU + cols, mask=ok, other=0.0).to(tl.float32)
    act = _silu(gate, dtype)
    tl.store(A + cols, (act * tl.load(GU + K + cols, mask=ok, other=0.0).to(tl.float32)).to(dtype), mask=ok)


def attention_chunk(slots: int) -> int:
    """Cache slots per attention program: BLOCK up to 16 chunks a cache, then a sixteenth of it (a power of two),
    so a short context still spreads over several programs per KV head and the merge reads at most 16 partials."""
    return max(BLOCK, triton.next_power_of_2(triton.cdiv(slots, 16)))


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


@dataclass
class FusedLayers:
    """What the fused layer needs beyond the layer itself: whether to launch with PDL, the per-device merge counters
    (zero between launches; made before any graph capture by prepare()) and, for tests, a fixed GEMV tile per weight
    shape ((N, K) -> (BLOCK_N, BLOCK_K, num_warps, num_stages)) instead of the autotuner's."""
    pdl: int = 0  # 0: no PDL, else where each kernel lets the next launch (a PDL_MODES value)
    tiles: dict = field(default_factory=dict)
    nvfp4_parts: Callable | None = None  # (x, [packed], [block_scale], [tensor_scale]) -> concatenated (NVFP4 layers)
    nvfp4_layer_gemv: Callable | None = None  # triton_nvfp4.layer_gemv where the wide GEMV runs: NVFP4 layers in 5
    counters: dict = field(default_factory=dict)

    def note(self) -> str:
        """What the engine's note says of its layers: "fused Triton kernels", with PDL and where it lets the next
        kernel launch."""
        trigger = {v: k for k, v in PDL_MODES.items()}
        nvfp4 = ""
        if self.nvfp4_layer_gemv is not None:
            from qwenlab.quant.triton_nvfp4 import layer_gemv_note  # Triton: where the NVFP4 layer GEMV runs

            nvfp4 = (f"; NVFP4 layers in five, their GEMVs taking the norms, SiLU and residual adds "
                     f"({layer_gemv_note()})")
        return ("fused Triton kernels" + (f" (PDL, the next kernel let in {trigger[self.pdl]})" if self.pdl else "")
                + nvfp4)

    def prepare(self, device: torch.device, kv_heads: int):
        key = str(device)
        if key not in self.counters or self.counters[key].numel() < kv_heads:
            self.counters[key] = torch.zeros(kv_heads, dtype=torch.int32, device=device)

    def gemv(self, x, weight, prologue: int = PLAIN, norm: nn.Module | None = None, residual=None,
             glu: bool = False):
        """weight @ x for one row, with RMSNorm(x) (prologue RMS, norm), SiLU(gate) * up of the two halves of the
        weight's rows (glu) and + residual."""
        n, k = weight.shape
        n = n // 2 if glu else n
        y = torch.empty(n, dtype=x.dtype, device=x.device)
        launch = {"launch_pdl": True} if self.pdl else {}
        args = (x, norm.weight if norm is not None else weight, residual if residual is not None else y, weight, y, n,
                k, weight.stride(0), norm.eps if norm is not None else 0.0)
        if tuple(weight.shape) in self.tiles:
            block_n, block_k, warps, stages = self.tiles[tuple(weight.shape)]
            _fused_gemv_kernel[(triton.cdiv(n, block_n),)](
                *args, PRO=prologue, GLU=glu, RES=residual is not None, PDL=self.pdl, BLOCK_N=block_n,
                BLOCK_K=block_k, num_warps=warps, num_stages=stages, **launch)
        else:
            _tuned_gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
                *args, PRO=prologue, GLU=glu, RES=residual is not None, PDL=self.pdl, **launch)
        return y

    def attend(self, qkv, attn: nn.Module, cos, sin, kv):
        heads, kv_heads, dim = attn.n_heads, attn.n_kv, attn.head_dim
        group, slots = heads // kv_heads, kv.k.shape[2]
        chunk = attention_chunk(slots)
        n_chunks = triton.cdiv(slots, chunk)
        gp, dp = _pow2(group), _pow2(dim)
        self.prepare(qkv.device, kv_heads)
        out = torch.empty(heads * dim, dtype=qkv.dtype, device=qkv.device)
        o_part = torch.empty((kv_heads, n_chunks, gp, dp), dtype=torch.float32, device=qkv.device)
        m_part = torch.empty((kv_heads, n_chunks, gp), dtype=torch.float32, device=qkv.device)
        l_part = torch.empty_like(m_part)
        launch = {"launch_pdl": True} if self.pdl else {}
        _fused_attend_kernel[(kv_heads, n_chunks)](
            qkv, attn.q_norm.weight, attn.k_norm.weight, cos, sin, kv.k, kv.v, kv.pos, out, o_part, m_part, l_part,
            self.counters[str(qkv.device)], kv.k.stride(1), kv.k.stride(2), kv.v.stride(1), kv.v.stride(2),
            n_chunks, attn.q_norm.eps, SM_SCALE=dim ** -0.5, G=group, GP=gp, KVH=kv_heads, D=dim, DP=dp,
            CHUNK=chunk, BLOCK=BLOCK, IEEE=qkv.dtype == torch.float32 or INTERPRETED, PDL=self.pdl, **launch)
        return out

    def add_norm(self, x, delta=None, norm: nn.Module | None = None):
        """(x + delta, RMSNorm(x + delta)) in one kernel; without delta x itself, without norm None."""
        k = x.numel()
        out = torch.empty_like(x) if delta is not None else x
        h = torch.empty_like(x) if norm is not None else None
        _add_norm_kernel[(1,)](x, delta if delta is not None else x, norm.weight if norm is not None else x, out,
                               h if h is not None else x, k, norm.eps if norm is not None else 0.0,
                               ADD=delta is not None, NORM=norm is not None, BLOCK=triton.next_power_of_2(k),
                               num_warps=8)
        return out, h

    def silu_up(self, gate_up):
        k = gate_up.numel() // 2
        act = torch.empty(k, dtype=gate_up.dtype, device=gate_up.device)
        _silu_up_kernel[(triton.cdiv(k, 1024),)](gate_up, act, k, BLOCK=1024, num_warps=4)
        return act

    def nvfp4(self, x, modules: tuple):
        """x times 1-3 NVFP4 linears in one GEMV launch, concatenated."""
        return self.nvfp4_parts(x, [m.packed for m in modules], [m.block_scale for m in modules],
                                [m.tensor_scale for m in modules])

    def layer(self, layer: nn.Module, x, cos, sin, kv):
        """The decoder layer's forward for one token over a static cache (kv: its StaticLayerKV)."""
        if layer_kind(layer) == "nvfp4":
            return self.nvfp4_layer_forward(layer, x, cos, sin, kv)
        attn, mlp = layer.self_attn, layer.mlp
        row = x.reshape(-1)
        qkv = self.gemv(row, attn.qkv_proj.weight, RMS, norm=layer.input_layernorm)
        ctx = self.attend(qkv, attn, cos.reshape(-1), sin.reshape(-1), kv)
        row = self.gemv(ctx, attn.o_proj.weight, residual=row)
        act = self.gemv(row, mlp.gate_up_proj.weight, RMS, norm=layer.post_attention_layernorm, glu=True)
        row = self.gemv(act, mlp.down_proj.weight, residual=row)
        return row.reshape(x.shape)

    def nvfp4_gemv(self, x, modules: tuple, norm: nn.Module | None = None, residual=None, glu: bool = False):
        """x times 1-3 NVFP4 linears in one launch of the layer GEMV (triton_nvfp4.layer_gemv): RMSNorm(x) as
        its input (norm), SiLU(gate) * up (glu), + residual; with PDL as the other fused kernels."""
        return self.nvfp4_layer_gemv(x, [(m.packed, m.block_scale, m.tensor_scale) for m in modules],
                                     norm.weight if norm is not None else None,
                                     norm.eps if norm is not None else 0.0, residual, glu, self.pdl)

    def nvfp4_layer_forward(self, layer: nn.Module, x, cos, sin, kv):
        """A W4A16 NVFP4 layer. Where the wide GEMV runs (nvfp4_layer_gemv), in five kernels as a dense one: its GEMVs
        take the norms, SiLU and residual adds. Else in nine: the GEMVs (q/k/v and gate/up one launch each) take
        no prologue, so the norms and residual adds are small kernels between them (add_norm, silu_up). The
        attention is the fused one."""
        attn, mlp = layer.self_attn, layer.mlp
        row = x.reshape(-1)
        if self.nvfp4_layer_gemv is not None:
            qkv = self.nvfp4_gemv(row, (attn.q_proj, attn.k_proj, attn.v_proj), norm=layer.input_layernorm)
            ctx = self.attend(qkv, attn, cos.reshape(-1), sin.reshape(-1), kv)
            row = self.nvfp4_gemv(ctx, (attn.o_proj,), residual=row)
            act = self.nvfp4_gemv(row, (mlp.gate_proj, mlp.up_proj), norm=layer.post_attention_layernorm, glu=True)
            row = self.nvfp4_gemv(act, (mlp.down_proj,), residual=row)
            return row.reshape(x.shape)
        _, h = self.add_norm(row, norm=layer.input_layernorm)
        qkv = self.nvfp4(h, (attn.q_proj, attn.k_proj, attn.v_proj))
        ctx = self.attend(qkv, attn, cos.reshape(-1), sin.reshape(-1), kv)
        row, h = self.add_norm(row, self.nvfp4(ctx, (attn.o_proj,)), layer.post_attention_layernorm)
        act = self.silu_up(self.nvfp4(h, (mlp.gate_proj, mlp.up_proj)))
        row, _ = self.add_norm(row, self.nvfp4(act, (mlp.down_proj,)))
        return row.reshape(x.shape)


def pdl_available(device: torch.device) -> bool:
    """PDL needs sm_90+, Triton's gdc intrinsics and a real GPU (not Triton's interpreter)."""
    return (gdc_wait is not None and device.type == "cuda" and not INTERPRETED
            and torch.cuda.get_device_capability(device)[0] >= 9)


def pdl_wanted(device: torch.device) -> int:
    """How the engine launches the fused layers: 0 (no PDL) where PDL is not available or QWENLAB_PDL=0, the
    trigger placement QWENLAB_PDL names (a PDL_MODES key), else after-loop: on an H200, 36 fused layers chained in one
    graph took 62.2 us a layer without PDL, 59.9 letting the next kernel in first thing, 61.1 after the wait and
    59.8 after the main loop, and the 4B decode step 2.569, 2.504, 2.547 and 2.476 ms (bench/fused_layer.py,
    bench/decode_profile.py; doc/performance.md)."""
    wanted = os.environ.get("QWENLAB_PDL", "")
    modes = {"": PDL_MODES["after-loop"], "1": PDL_MODES["after-loop"], "0": 0, **PDL_MODES}
    if wanted not in modes:
        raise QwenlabError(f"QWENLAB_PDL={wanted!r}: give 0 (off), 1 (the default placement) or one of "
                           f"{', '.join(PDL_MODES)}")
    return modes[wanted] if pdl_available(device) else 0
