"""Rank-exact MoE LoRA: shrink (x @ A^T) and expand (u @ B^T) over (expert, slot) groups.

Legend: T tokens, K top-k, N = T*K pairs, E experts, S adapter slots, R pool rank rows,
RM rank bound (width of the shrink buffer), IN/OUT projection dims.

For pair p = t*K + k with e = topk_ids[t, k], s = slot_ids[t] >= 0, o = offsets[s, e],
r = ranks[s, e] (r == 0: no LoRA):
    u[p, :r]             = x[row(p)] @ a[o:o+r].T             (shrink; row(p) = t or p)
    y[p, col:col+OUT]   += scale[s] * u[p, :r] @ b[o:o+r]     (expand, in place)
Only r rank rows are touched per pair (rank tiles of BR, masked): cost ~ sum of ranks.
"""

from __future__ import annotations

import torch

from kernels._dispatch import check, empty, check_same_device, dot_precision, interp_upcast, use_triton
from kernels.moe_align import MoeAlignment, moe_lora_align

RANK_TILE = 16  # BR


def _pow2(n: int, lo: int = 16, hi: int = 1 << 30) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def lora_block_m(num_pairs: int) -> int:
    return 16 if num_pairs <= 2048 else (32 if num_pairs <= 16384 else 64)


def _check_tables(offsets: torch.Tensor, ranks: torch.Tensor, num_experts: int, num_slots: int) -> None:
    for name, t in (("offsets", offsets), ("ranks", ranks)):
        check(t.shape == (num_slots, num_experts), f"{name} must be (S, E)=({num_slots}, {num_experts}), got {tuple(t.shape)}")
        check(t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}")
        check(t.is_contiguous(), f"{name} must be contiguous")


def _row_div(x: torch.Tensor, topk_ids: torch.Tensor) -> int:
    t, k = topk_ids.shape
    if x.shape[0] == t * k:
        return 1
    check(x.shape[0] == t, f"x must have T={t} or T*K={t * k} rows, got {x.shape[0]}")
    return k


# ----------------------------------------------------------------------------- torch twins


def lora_groups(topk_ids: torch.Tensor, slot_ids: torch.Tensor, num_slots: int):
    """Pairs with slot >= 0 sorted by (e, s); returns (pairs (Nv,), [(e, s, count)])."""
    k = topk_ids.shape[1]
    e = topk_ids.reshape(-1).long()
    s = slot_ids.long().repeat_interleave(k)
    valid = (s >= 0).nonzero().squeeze(1)
    key = e[valid] * num_slots + s[valid]
    order = torch.sort(key, stable=True).indices
    keys, counts = torch.unique_consecutive(key[order], return_counts=True)
    groups = [(kk // num_slots, kk % num_slots, c) for kk, c in zip(keys.tolist(), counts.tolist())]
    return valid[order], groups


def _lora_pairs(topk_ids, slot_ids, offsets, ranks):
    """Per (expert, slot) group with a LoRA: (routed-pair indices, slot, row offset, rank)."""
    pairs, groups = lora_groups(topk_ids, slot_ids, offsets.shape[0])
    off, rk = offsets.tolist(), ranks.tolist()
    start = 0
    for e, s, c in groups:
        idx = pairs[start : start + c]
        start += c
        if rk[s][e]:
            yield idx, s, off[s][e], rk[s][e]


def moe_lora_shrink_torch(x, a, offsets, ranks, topk_ids, slot_ids, rank_bound, out=None):
    n = topk_ids.numel()
    div = _row_div(x, topk_ids)
    u = out if out is not None else empty(n, rank_bound, dtype=torch.float32, device=x.device)
    for idx, s, o, r in _lora_pairs(topk_ids, slot_ids, offsets, ranks):
        u[idx, :r] = x[idx // div].float() @ a[o : o + r].float().T
    return u


def moe_lora_expand_torch(y, u, b, offsets, ranks, scales, topk_ids, slot_ids, y_col=0):
    sc = scales.tolist()
    out_dim = b.shape[1]
    for idx, s, o, r in _lora_pairs(topk_ids, slot_ids, offsets, ranks):
        delta = (u[idx, :r] @ b[o : o + r].float()) * sc[s]
        cols = slice(y_col, y_col + out_dim)
        y[idx, cols] = (y[idx, cols].float() + delta).to(y.dtype)
    return y


# ----------------------------------------------------------------------------- triton launchers


def moe_lora_shrink_triton(x, a, offsets, ranks, align: MoeAlignment, row_div, rank_bound, out=None, second=None):
    """u (N, RM) fp32; with second = (a1, offsets1, ranks1), u (N, 2*RM) holds projection 1 in
    columns [RM, 2RM): both projections (gate and up read the same x) in one launch."""
    from kernels._tl.lora import lora_shrink_kernel

    n = align.num_pairs
    num_p = 1 if second is None else 2
    width = max(rank_bound, 1)
    u = out if out is not None else empty(n, num_p * width, dtype=torch.float32, device=x.device)
    if rank_bound == 0 or n == 0:
        return u
    a1, off1, rk1 = second if second is not None else (a, offsets, ranks)
    in_dim = x.shape[1]
    bk = _pow2(in_dim, 16, 128 if x.dtype != torch.float32 else 64)
    grid = (align.max_blocks, triton_cdiv(rank_bound, RANK_TILE), num_p)
    lora_shrink_kernel[grid](
        x, a, a1, u, align.sorted_ids, align.block_expert, align.block_slot, align.num_blocks,
        offsets, ranks, off1, rk1, n, offsets.shape[1], in_dim, u.shape[1] // num_p,
        x.stride(0), a.stride(0), u.stride(0),
        X_ROW_DIV=row_div, PRECISION=dot_precision(x.dtype), UPCAST=interp_upcast(x.dtype), BM=align.block_m, BR=RANK_TILE, BK=bk,
        num_warps=4,
    )
    return u


def moe_lora_expand_triton(y, u, b, offsets, ranks, scales, align: MoeAlignment, y_col=0, second=None, y_pcol=0,
                           routed=None):
    """In place on y; with second = (b1, offsets1, ranks1), projection 1 reads u's second half
    of columns and adds at y_col + y_pcol. routed (N,) fp32 multiplies the delta per pair."""
    from kernels._tl.lora import lora_expand_kernel

    n = align.num_pairs
    out_dim = b.shape[1]
    if n == 0:
        return y
    num_p = 1 if second is None else 2
    b1, off1, rk1 = second if second is not None else (b, offsets, ranks)
    bn = _pow2(out_dim, 16, 128 if b.dtype != torch.float32 else 64)
    grid = (align.max_blocks, triton_cdiv(out_dim, bn), num_p)
    lora_expand_kernel[grid](
        u, b, b1, y, scales, routed if routed is not None else scales, align.sorted_ids, align.block_expert,
        align.block_slot, align.num_blocks, offsets, ranks, off1, rk1, n, offsets.shape[1], out_dim, y_col,
        u.shape[1] // num_p, y_pcol, u.stride(0), b.stride(0), y.stride(0),
        MUL_ROUTED=routed is not None, PRECISION=dot_precision(b.dtype), UPCAST=interp_upcast(b.dtype),
        BM=align.block_m, BN=bn, BR=RANK_TILE, num_warps=4,
    )
    return y


def silu_mul_triton(gu: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """h (N, I) = silu(gu[:, :I]) * gu[:, I:] in one launch (gu (N, 2I) fp32)."""
    from kernels._tl.lora import silu_mul_kernel

    n, i2 = gu.shape
    i = i2 // 2
    h = empty(n, i, dtype=dtype, device=gu.device)
    if n:
        bi = _pow2(i, 16, 1024)
        silu_mul_kernel[(n, triton_cdiv(i, bi))](gu, h, i, gu.stride(0), h.stride(0), BI=bi, num_warps=4)
    return h


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- public ops


def _check_common(x_or_u, pool, offsets, ranks, topk_ids, slot_ids, num_experts=None):
    check(topk_ids.dim() == 2, f"topk_ids must be (T, K), got {tuple(topk_ids.shape)}")
    check(slot_ids.shape == (topk_ids.shape[0],), f"slot_ids must be (T,)={topk_ids.shape[0]}, got {tuple(slot_ids.shape)}")
    check(pool.dim() == 2 and pool.stride(1) == 1, "LoRA pool must be 2-D with contiguous last dim")
    check(x_or_u.stride(-1) == 1, "activations must have contiguous last dim")
    e = offsets.shape[1] if offsets.dim() == 2 else -1
    _check_tables(offsets, ranks, e if num_experts is None else num_experts, offsets.shape[0])
    check_same_device(x=x_or_u, pool=pool, offsets=offsets, ranks=ranks, topk_ids=topk_ids, slot_ids=slot_ids)


def moe_lora_shrink(x, a, offsets, ranks, topk_ids, slot_ids, rank_bound: int, align: MoeAlignment | None = None, out=None):
    """u (N, RM) fp32 with u[p, :r] = x[row(p)] @ a[o:o+r].T; other entries unspecified.

    x (T, IN) or (N, IN); a (R, IN); offsets/ranks (S, E) int32; topk_ids (T, K); slot_ids (T,).
    """
    _check_common(x, a, offsets, ranks, topk_ids, slot_ids)
    check(x.dim() == 2 and a.shape[1] == x.shape[1], f"a (R, {x.shape[-1]}) expected, got {tuple(a.shape)}")
    check(x.dtype == a.dtype, f"x and a dtypes differ: {x.dtype} vs {a.dtype}")
    if out is not None:
        check(out.shape == (topk_ids.numel(), rank_bound) and out.dtype == torch.float32, "out must be (N, RM) fp32")
    div = _row_div(x, topk_ids)
    if not use_triton(x):
        return moe_lora_shrink_torch(x, a, offsets, ranks, topk_ids, slot_ids, rank_bound, out)
    if align is None:
        align = moe_lora_align(topk_ids, slot_ids, offsets.shape[1], offsets.shape[0], lora_block_m(topk_ids.numel()))
    return moe_lora_shrink_triton(x, a, offsets, ranks, align, div, rank_bound, out)


def moe_lora_expand_(y, u, b, offsets, ranks, scales, topk_ids, slot_ids, y_col: int = 0, align: MoeAlignment | None = None):
    """In place: y[p, y_col:y_col+OUT] += scale[s] * u[p, :r] @ b[o:o+r]; returns y.

    y (N, >= y_col+OUT) any float dtype; u (N, RM) fp32; b (R, OUT); scales (S,) fp32.
    """
    _check_common(u, b, offsets, ranks, topk_ids, slot_ids)
    n = topk_ids.numel()
    check(u.shape[0] == n and u.dtype == torch.float32, f"u must be (N={n}, RM) fp32, got {tuple(u.shape)} {u.dtype}")
    check(y.dim() == 2 and y.shape[0] == n and y.shape[1] >= y_col + b.shape[1] and y.stride(1) == 1,
          f"y must be (N={n}, >={y_col + b.shape[1]}) with contiguous rows, got {tuple(y.shape)}")
    check(scales.shape == (offsets.shape[0],) and scales.dtype == torch.float32, "scales must be (S,) float32")
    check_same_device(y=y, scales=scales, u=u)
    if not use_triton(y):
        return moe_lora_expand_torch(y, u, b, offsets, ranks, scales, topk_ids, slot_ids, y_col)
    if align is None:
        align = moe_lora_align(topk_ids, slot_ids, offsets.shape[1], offsets.shape[0], lora_block_m(n))
    return moe_lora_expand_triton(y, u, b, offsets, ranks, scales, align, y_col)
