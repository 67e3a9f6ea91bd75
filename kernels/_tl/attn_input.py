"""Attention input in one launch (Triton): q/k RMSNorm, clip, rotate-half RoPE, paged KV store.

Legend: T tokens, QH/KVH query/kv heads, D head dim (even), HALF = D // 2, QHP/KVHP/HALFP their
powers of two, NB cache blocks, BS block size, P max positions.
"""

import triton
import triton.language as tl


@triton.jit
def _norm_clip_rope(x_ptr, w_ptr, heads, D, eps, clip, c1, s1, c2, s2, dt_ptr,
                    NORM: tl.constexpr, CLIP: tl.constexpr, HP: tl.constexpr, HALFP: tl.constexpr):
    """One token's q (or k) heads as two (HP, HALFP) halves, normed, clipped and rotated."""
    dt = dt_ptr.dtype.element_ty
    half = D // 2
    h = tl.arange(0, HP)[:, None]
    j = tl.arange(0, HALFP)[None, :]
    m = (h < heads) & (j < half)
    x1 = tl.load(x_ptr + h * D + j, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + h * D + half + j, mask=m, other=0.0).to(tl.float32)
    if NORM == 1:  # over the full projection width: heads are coupled (OLMoE)
        ss = tl.sum(tl.sum(x1 * x1 + x2 * x2, axis=1), axis=0)
        rstd = tl.rsqrt(ss / (heads * D) + eps)
        w1 = tl.load(w_ptr + h * D + j, mask=m, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + h * D + half + j, mask=m, other=0.0).to(tl.float32)
        x1 = (w1 * (x1 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    elif NORM == 2:  # per head over D (Qwen3)
        rstd = tl.rsqrt(tl.sum(x1 * x1 + x2 * x2, axis=1) / D + eps)[:, None]
        w1 = tl.load(w_ptr + j, mask=j < half, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + half + j, mask=j < half, other=0.0).to(tl.float32)
        x1 = (w1 * (x1 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    if CLIP:
        x1 = tl.minimum(tl.maximum(x1, -clip), clip)
        x2 = tl.minimum(tl.maximum(x2, -clip), clip)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); each product rounded to dt
    o1 = ((x1 * c1).to(dt).to(tl.float32) - (x2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
    return o1, o2, h * D + j, m


# positions and slots are views at token-count-dependent offsets of the step's metadata copy,
# read one per program: not specialised on their alignment (no recompile per batch size)
@triton.jit(do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
def attention_input_kernel(
    qkv_ptr,  # (T, QH*D + 2*KVH*D): q | k | v columns, last dim contiguous
    qn_ptr,  # q norm weight: (QH*D,) if Q_NORM == 1, (D,) if Q_NORM == 2
    kn_ptr,  # k norm weight: (KVH*D,) if K_NORM == 1, (D,) if K_NORM == 2
    cos_ptr,  # (P, D) model dtype
    sin_ptr,  # (P, D)
    pos_ptr,  # (T,) int64
    slot_ptr,  # (T,) int64 cache slot, -1 = do not store
    q_ptr,  # (T, QH, D) out, contiguous
    kc_ptr,  # (NB, BS, KVH, D) contiguous
    vc_ptr,  # (NB, BS, KVH, D) contiguous
    QH,
    KVH,
    D,
    eps,
    clip,
    stride_qkv,
    stride_cos,
    Q_NORM: tl.constexpr,  # 0 none, 1 full width, 2 per head
    K_NORM: tl.constexpr,
    CLIP: tl.constexpr,
    QHP: tl.constexpr,
    KVHP: tl.constexpr,
    HALFP: tl.constexpr,
):
    """Semantics (dt = the model dtype; the torch twin's rounding points):
        q, k, v = split(qkv[t]);  q = q_norm(q), k = k_norm(k)   (RMSNorm over the full width,
        per head, or none);  q, k, v = clamp(., -clip, clip) if CLIP;
        q, k = x * cos[pos[t]] + rotate_half(x) * sin[pos[t]]  (each head, rotate-half RoPE)
        q_out[t] = q;  k_cache/v_cache.view(-1, KVH, D)[slot[t]] = k, v  unless slot[t] < 0
    GQA: KVH <= QH, any ratio. Grid: (T,); one program holds all of a token's heads.
    """
    t = tl.program_id(0).to(tl.int64)
    half = D // 2
    pos = tl.load(pos_ptr + t)
    j = tl.arange(0, HALFP)[None, :]
    jm = j < half
    c1 = tl.load(cos_ptr + pos * stride_cos + j, mask=jm, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * stride_cos + half + j, mask=jm, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * stride_cos + j, mask=jm, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * stride_cos + half + j, mask=jm, other=0.0).to(tl.float32)
    row = qkv_ptr + t * stride_qkv
    q1, q2, qoff, qm = _norm_clip_rope(row, qn_ptr, QH, D, eps, clip, c1, s1, c2, s2, q_ptr,
                                       Q_NORM, CLIP, QHP, HALFP)
    q_out = q_ptr + t * QH * D + qoff
    tl.store(q_out, q1, mask=qm)
    tl.store(q_out + half, q2, mask=qm)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        k1, k2, koff, km = _norm_clip_rope(row + QH * D, kn_ptr, KVH, D, eps, clip, c1, s1, c2, s2, kc_ptr,
                                           K_NORM, CLIP, KVHP, HALFP)
        dst = slot * KVH * D + koff
        tl.store(kc_ptr + dst, k1, mask=km)
        tl.store(kc_ptr + dst + half, k2, mask=km)
        vrow = row + (QH + KVH) * D + koff
        v1 = tl.load(vrow, mask=km, other=0.0)
        v2 = tl.load(vrow + half, mask=km, other=0.0)
        if CLIP:
            v1 = tl.minimum(tl.maximum(v1.to(tl.float32), -clip), clip).to(v1.dtype)
            v2 = tl.minimum(tl.maximum(v2.to(tl.float32), -clip), clip).to(v2.dtype)
        tl.store(vc_ptr + dst, v1, mask=km)
        tl.store(vc_ptr + dst + half, v2, mask=km)
