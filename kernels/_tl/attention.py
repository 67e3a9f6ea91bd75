"""Paged KV-cache store and decode attention (Triton).

Legend: T tokens, B sequences, QH query heads, KVH kv heads, G = QH // KVH, D head dim,
NB cache blocks, BS block size, MAXB blocks per sequence.
"""

import triton
import triton.language as tl


@triton.jit
def store_kv_kernel(
    k_ptr, v_ptr,  # (T, KVH, D), last dim contiguous
    kc_ptr, vc_ptr,  # (NB, BS, KVH, D) contiguous
    slot_ptr,  # (T,) int64, -1 = skip
    KVH, D,
    stride_kt, stride_kh, stride_vt, stride_vh,
    HP: tl.constexpr, DP: tl.constexpr,
):
    """Semantics: k_cache.view(-1, KVH, D)[slot[t]] = k[t] (same for v) unless slot[t] < 0. Grid: (T,)."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    h = tl.arange(0, HP)[:, None]
    d = tl.arange(0, DP)[None, :]
    mask = (h < KVH) & (d < D)
    dst = slot.to(tl.int64) * KVH * D + h * D + d
    kv = tl.load(k_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(kc_ptr + dst, kv, mask=mask)
    vv = tl.load(v_ptr + t.to(tl.int64) * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(vc_ptr + dst, vv, mask=mask)


@triton.jit
def paged_decode_kernel(
    q_ptr,  # (B, QH, D)
    kc_ptr, vc_ptr,  # (NB, BS, KVH, D) contiguous
    out_ptr,  # (B, QH, D)
    block_tables_ptr,  # (B, MAXB) int32
    context_lens_ptr,  # (B,) int32
    scale,
    KVH, D, MAXB,
    stride_qb, stride_qh, stride_ob, stride_oh,
    G: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr, DP: tl.constexpr,
):
    """Semantics: out[b, h] = softmax(scale * q[b, h] @ K[b].T) @ V[b] over the first
    context_lens[b] cached positions of sequence b, kv head h // G; fp32 softmax
    (online, one cache block per step). Empty context -> zeros. Grid: (B, QH).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    ctx = tl.load(context_lens_ptr + b)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < D
    offs_s = tl.arange(0, BSP)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    # fp32 scalar tensors (loop-carried types must not change in compiled mode)
    m_i = tl.max(tl.full((BSP,), -float("inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros((BSP,), tl.float32), axis=0)
    acc = tl.zeros((DP,), dtype=tl.float32)
    for j in range(0, tl.cdiv(ctx, BS)):
        blk = tl.load(block_tables_ptr + b.to(tl.int64) * MAXB + j).to(tl.int64)
        pos_ok = (offs_s < BS) & (j * BS + offs_s < ctx)
        base = (blk * BS + offs_s)[:, None] * (KVH * D) + kvh * D + offs_d[None, :]
        mask = pos_ok[:, None] & d_ok[None, :]
        k = tl.load(kc_ptr + base, mask=mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scale
        s = tl.where(pos_ok, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(vc_ptr + base, mask=mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
