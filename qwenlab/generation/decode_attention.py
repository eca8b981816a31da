"""One query token against a static KV cache, as a split-K (flash-decoding) Triton kernel for the graph engine.

The cache holds max_len slots of which the first pos+1 are valid (pos = the query token's position, read from
the device, so the captured graph serves every length). Each program takes one KV head and one chunk of slots:
the G query heads that share that KV head are scored together, softmax runs online over the chunk's valid slots,
and chunks past the valid length return at once, so the cost follows the context, not max_len. Up to 1024 slots
one chunk covers the cache; above, a second kernel merges the chunks' partial results. Scores and softmax are
float32; probabilities meet V in the cache's dtype, as in the
eager path.
"""
import torch
import triton
import triton.language as tl

BLOCK = 64  # slots per step of a program's loop


@triton.jit
def online_softmax_step(scores, valid, m, SM_SCALE: tl.constexpr):
    """One block of slots of an online softmax: the scores scaled (invalid slots out), the new running max, the
    factor the old sums are rescaled by, and the block's unnormalised probabilities."""
    scores = tl.where(valid[None, :], scores.to(tl.float32) * SM_SCALE, -1e30)
    m_new = tl.maximum(m, tl.max(scores, 1))
    return m_new, tl.exp(m - m_new), tl.where(valid[None, :], tl.exp(scores - m_new[:, None]), 0.0)


@triton.jit
def _attend_kernel(Q, K, V, POS, OUT, O_PART, M_PART, L_PART, stride_kh, stride_ks, stride_vh, stride_vs, n_chunks,
                   SM_SCALE: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                   CHUNK: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr):
    kvh = tl.program_id(0)
    chunk = tl.program_id(1)
    length = tl.load(POS) + 1
    start = chunk * CHUNK
    if start >= length:  # past the valid slots: the merge reads only the chunks in use
        return
    end = tl.minimum(start + CHUNK, length)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    q = tl.load(Q + (kvh * G + g)[:, None] * D + d[None, :], mask=(g[:, None] < G) & (d[None, :] < D), other=0.0)
    m = tl.full([GP], -1e30, tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    for off in range(start, end, BLOCK):
        s = off + tl.arange(0, BLOCK)
        valid = s < end
        kv_mask = valid[:, None] & (d[None, :] < D)
        k = tl.load(K + kvh * stride_kh + s[:, None] * stride_ks + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        m_new, alpha, p = online_softmax_step(scores, valid, m, SM_SCALE)
        v = tl.load(V + kvh * stride_vh + s[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + pv
        m = m_new
    if SPLIT:
        part = (kvh * n_chunks + chunk) * GP
        tl.store(M_PART + part + g, m)
        tl.store(L_PART + part + g, l)
        tl.store(O_PART + (part + g)[:, None] * DP + d[None, :], acc)
    else:
        tl.store(OUT + (kvh * G + g)[:, None] * D + d[None, :], (acc / l[:, None]).to(OUT.dtype.element_ty),
                 mask=(g[:, None] < G) & (d[None, :] < D))


@triton.jit
def merge_chunks(O_PART, M_PART, L_PART, kvh, n_chunks, used, g, d, GP: tl.constexpr, DP: tl.constexpr,
                 CACHE: tl.constexpr):
    """KV head kvh's output from the partial results of its first `used` chunks, merged in chunk order: (sum of
    values weighted [GP, DP], sum of weights [GP]), float32. CACHE: the loads' cache modifier (".cg" where programs
    of the same launch wrote the partials)."""
    m_run = tl.full([GP], -1e30, tl.float32)
    l_run = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    for c in range(0, used):
        part = (kvh * n_chunks + c) * GP
        m = tl.load(M_PART + part + g, cache_modifier=CACHE)
        m_new = tl.maximum(m_run, m)
        keep, take = tl.exp(m_run - m_new), tl.exp(m - m_new)
        l_run = l_run * keep + tl.load(L_PART + part + g, cache_modifier=CACHE) * take
        acc = acc * keep[:, None] + tl.load(O_PART + (part + g)[:, None] * DP + d[None, :],
                                            cache_modifier=CACHE) * take[:, None]
        m_run = m_new
    return acc, l_run


@triton.jit
def _merge_kernel(O_PART, M_PART, L_PART, POS, OUT, n_chunks, G: tl.constexpr, GP: tl.constexpr,
                  D: tl.constexpr, DP: tl.constexpr, CHUNK: tl.constexpr):
    kvh = tl.program_id(0)
    used = tl.cdiv(tl.load(POS) + 1, CHUNK)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    acc, total = merge_chunks(O_PART, M_PART, L_PART, kvh, n_chunks, used, g, d, GP, DP, "")
    out = acc / total[:, None]
    tl.store(OUT + (kvh * G + g)[:, None] * D + d[None, :], out.to(OUT.dtype.element_ty),
             mask=(g[:, None] < G) & (d[None, :] < D))


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def chunk_slots(slots: int) -> int:
    """Slots per program: the whole cache up to 1024 slots (one pass, no merge), else about an eighth of it."""
    return max(1024, triton.next_power_of_2(triton.cdiv(slots, 8)))


@torch.library.custom_op("qwenlab::decode_attention_static", mutates_args=())
def decode_attention_static(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """q [1, H, 1, D]; k/v [1, KVH, S, D] (the whole static cache); pos: [1] int64, the query's position (slots
    0..pos are valid). -> [1, H, 1, D] in q's dtype. A custom op: torch.compile calls it as one opaque kernel."""
    _, heads, _, dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    group = heads // kv_heads
    gp, dp = _pow2(group), _pow2(dim)
    chunk = chunk_slots(slots)
    n_chunks = triton.cdiv(slots, chunk)
    q = q.reshape(heads, dim).contiguous()
    out = torch.empty((heads, dim), dtype=q.dtype, device=q.device)
    split = n_chunks > 1
    o_part = torch.empty((kv_heads, n_chunks, gp, dp) if split else (1,), dtype=torch.float32, device=q.device)
    m_part = torch.empty((kv_heads, n_chunks, gp) if split else (1,), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    _attend_kernel[(kv_heads, n_chunks)](q, k, v, pos, out, o_part, m_part, l_part, k.stride(1), k.stride(2),
                                         v.stride(1), v.stride(2), n_chunks, SM_SCALE=dim ** -0.5, G=group, GP=gp,
                                         D=dim,
                                         DP=dp, CHUNK=chunk, BLOCK=BLOCK, SPLIT=split, IEEE=q.dtype == torch.float32)
    if split:
        _merge_kernel[(kv_heads,)](o_part, m_part, l_part, pos, out, n_chunks, G=group, GP=gp, D=dim, DP=dp,
                                   CHUNK=chunk)
    return out.reshape(1, heads, 1, dim)


@decode_attention_static.register_fake
def _(q, k, v, pos):
    return q.new_empty(q.shape)
