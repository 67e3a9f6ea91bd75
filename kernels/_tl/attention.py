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


# MAXB = the step's longest block table: not specialised (it only offsets scalar table loads);
# nor is NSPLIT (the split count: a runtime bound, 16 would otherwise specialise apart from 2).
# The step's metadata (block tables, context lengths, cu_q) are views at token-count-dependent
# offsets of one host-to-device copy: their alignment changes step to step, and they are read by
# scalar or gathered loads (no vector load to widen), so it is not specialised on either (no
# recompile per batch size)
@triton.jit(do_not_specialize=["MAXB", "NSPLIT"],
            do_not_specialize_on_alignment=["block_tables_ptr", "context_lens_ptr"])
def paged_decode_kernel(
    q_ptr,  # (B, QH, D)
    kc_ptr, vc_ptr,  # (NB, BS, KVH, D) contiguous
    out_ptr,  # (B, QH, D); written only when not SPLIT
    block_tables_ptr,  # (B, MAXB) int32
    context_lens_ptr,  # (B,) int32
    part_m_ptr, part_l_ptr,  # (B, QH, NSPLIT) fp32; written only when SPLIT
    part_acc_ptr,  # (B, QH, NSPLIT, D) fp32; written only when SPLIT
    scale,
    QH, KVH, D, MAXB, NSPLIT,
    stride_qb, stride_qh, stride_ob, stride_oh,
    G: tl.constexpr, GP: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr, DP: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Semantics: for each query head h of kv head k (h in [k G, (k + 1) G)),
    out[b, h] = softmax(scale * q[b, h] @ K[b].T) @ V[b] over the first context_lens[b] cached
    positions of sequence b, kv head k; fp32 online softmax, one cache block per step. The G
    heads of a kv head share the program, so each K/V block is read once per kv head: G = 1
    (GP = 1) is a vector path (no tl.dot); G > 1 puts the heads in the rows of tl.dot tiles
    (GP = G padded to a power of two >= 16, BSP and DP >= 16, padded rows masked; scores and
    acc in fp32, P cast to the cache dtype for P @ V as in the prefill kernel). Not SPLIT: blocks [0, cdiv(ctx, BS)), out written
    (empty context -> zeros). SPLIT: program s takes blocks [s P, min((s + 1) P, n)) of the
    n = cdiv(ctx, BS), P = cdiv(n, NSPLIT), and writes its unnormalised partial: running max m,
    sum l = sum exp(s - m), acc = sum exp(s - m) v (an empty range: m = -inf, l = 0, acc = 0);
    paged_decode_reduce_kernel combines them. Grid: (B, KVH, NSPLIT) (NSPLIT = 1 when not SPLIT).
    """
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(context_lens_ptr + b)
    nblk = tl.cdiv(ctx, BS)
    if SPLIT:
        sp = tl.program_id(2)
        per = tl.cdiv(nblk, NSPLIT)
        j0 = sp * per
        j1 = tl.minimum(j0 + per, nblk)
    else:
        j0 = 0
        j1 = nblk
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < D
    offs_s = tl.arange(0, BSP)
    table = block_tables_ptr + b.to(tl.int64) * MAXB
    if GP == 1:  # one query head per kv head (OLMoE): vectors, no group dimension
        h = kvh
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        # fp32 scalar tensors (loop-carried types must not change in compiled mode)
        m_i = tl.max(tl.full((BSP,), -float("inf"), tl.float32), axis=0)
        l_i = tl.sum(tl.zeros((BSP,), tl.float32), axis=0)
        acc = tl.zeros((DP,), dtype=tl.float32)
        for j in range(j0, j1):
            blk = tl.load(table + j).to(tl.int64)
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
        if SPLIT:
            row = (b.to(tl.int64) * QH + h) * NSPLIT + sp
            tl.store(part_m_ptr + row, m_i)
            tl.store(part_l_ptr + row, l_i)
            tl.store(part_acc_ptr + row * D + offs_d, acc, mask=d_ok)
        else:
            out = acc / tl.maximum(l_i, 1e-30)
            tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
                     mask=d_ok)
    else:  # the G query heads as the rows of tl.dot tiles: scores (GP, BSP) per block
        offs_g = tl.arange(0, GP)
        g_ok = offs_g < G
        heads = kvh * G + offs_g
        qg_mask = g_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=qg_mask,
                    other=0.0)  # (GP, DP); padded rows are 0 (finite scores, never stored)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full((GP,), -float("inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, DP), dtype=tl.float32)
        for j in range(j0, j1):
            blk = tl.load(table + j).to(tl.int64)
            pos_ok = (offs_s < BS) & (j * BS + offs_s < ctx)
            base = (blk * BS + offs_s)[:, None] * (KVH * D) + kvh * D + offs_d[None, :]
            mask = pos_ok[:, None] & d_ok[None, :]
            k = tl.load(kc_ptr + base, mask=mask, other=0.0)  # (BSP, DP)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (GP, BSP)
            s = tl.where(pos_ok[None, :], s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            v = tl.load(vc_ptr + base, mask=mask, other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        if SPLIT:
            rows = (b.to(tl.int64) * QH + heads) * NSPLIT + sp  # (GP,)
            tl.store(part_m_ptr + rows, m_i, mask=g_ok)
            tl.store(part_l_ptr + rows, l_i, mask=g_ok)
            tl.store(part_acc_ptr + rows[:, None] * D + offs_d[None, :], acc, mask=qg_mask)
        else:
            out = acc / tl.maximum(l_i, 1e-30)[:, None]
            tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=qg_mask)


@triton.jit(do_not_specialize=["NSPLIT"])
def paged_decode_reduce_kernel(
    part_m_ptr, part_l_ptr,  # (B, QH, NSPLIT) fp32
    part_acc_ptr,  # (B, QH, NSPLIT, D) fp32
    out_ptr,  # (B, QH, D)
    QH, D, NSPLIT,
    stride_ob, stride_oh,
    SP: tl.constexpr, DP: tl.constexpr,
):
    """Semantics: with w_s = exp(m_s - max_s m_s) (0 for an empty split),
    out[b, h] = sum_s w_s acc_s / sum_s w_s l_s: the softmax over the whole context from
    paged_decode_kernel's SPLIT partials. Every split empty (empty context) -> zeros.
    SP = NSPLIT padded to a power of two. Grid: (B, QH).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = (b.to(tl.int64) * QH + h) * NSPLIT
    offs_s = tl.arange(0, SP)
    s_ok = offs_s < NSPLIT
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < D
    m = tl.load(part_m_ptr + row + offs_s, mask=s_ok, other=-float("inf"))
    l = tl.load(part_l_ptr + row + offs_s, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == -float("inf"), 0.0, m_max)  # every split empty: weights exp(-inf) = 0
    w = tl.exp(m - m_max)
    acc = tl.load(part_acc_ptr + (row + offs_s)[:, None] * D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                  other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.maximum(tl.sum(w * l, axis=0), 1e-30)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit(do_not_specialize=["MAXB"],  # as paged_decode_kernel
            do_not_specialize_on_alignment=["block_tables_ptr", "cu_q_ptr", "context_lens_ptr"])
def paged_prefill_kernel(
    q_ptr,  # (T, QH, D)
    kc_ptr, vc_ptr,  # (NB, BS, KVH, D) contiguous
    out_ptr,  # (T, QH, D)
    block_tables_ptr,  # (C, MAXB) int32
    cu_q_ptr,  # (C + 1,) int32: chunk c's queries are rows [cu_q[c], cu_q[c + 1])
    context_lens_ptr,  # (C,) int32: keys of chunk c = cached prefix + the chunk itself
    scale,
    KVH, D, MAXB,
    stride_qt, stride_qh, stride_ot, stride_oh,
    G: tl.constexpr, BS: tl.constexpr, DP: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """Semantics: for query i of chunk c (row cu_q[c] + i, position p = ctx_c - len_c + i),
    out[row, h] = softmax(scale * q[row, h] @ K_c[:p+1].T) @ V_c[:p+1], K_c/V_c read from the
    cache through block_tables[c] (the chunk's own keys are already stored), kv head h // G;
    fp32 online softmax (flash-attention style). Grid: (C, cdiv(max_q_len, BM), QH).
    """
    c = tl.program_id(0)
    mt = tl.program_id(1)
    h = tl.program_id(2)
    q0 = tl.load(cu_q_ptr + c)
    qlen = tl.load(cu_q_ptr + c + 1) - q0
    if mt * BM >= qlen:
        return
    ctx = tl.load(context_lens_ptr + c)
    first = ctx - qlen  # position of the chunk's first query
    kvh = h // G
    offs_m = mt * BM + tl.arange(0, BM)
    m_ok = offs_m < qlen
    pos_q = first + offs_m
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < D
    rows = (q0 + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full((BM,), -float("inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, DP), tl.float32)
    kv_end = tl.minimum(ctx, first + (mt + 1) * BM)  # causal: no key after the tile's last query
    table = block_tables_ptr + c.to(tl.int64) * MAXB
    for start in range(0, kv_end, BN):
        offs_n = start + tl.arange(0, BN)
        n_ok = offs_n < kv_end
        blk = tl.load(table + offs_n // BS, mask=n_ok, other=0).to(tl.int64)
        base = ((blk * BS + offs_n % BS) * KVH + kvh) * D
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(kc_ptr + base[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # (BN, DP)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BM, BN)
        keep = (offs_n[None, :] <= pos_q[:, None]) & n_ok[None, :]
        s = tl.where(keep, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows with no key yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + base[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
