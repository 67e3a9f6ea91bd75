"""Rank-exact MoE LoRA: shrink (x @ A^T) and expand (u @ B^T) over aligned routed pairs.

Legend: T tokens, K top-k, N = T*K pairs, E experts, S adapter slots, R pool rank rows,
RM rank bound (width of the shrink buffer), IN/OUT projection dims.

For pair p = t*K + k with e = topk_ids[t, k], s = slot_ids[t] >= 0, o = offsets[s, e],
r = ranks[s, e] (r == 0: no LoRA):
    u[p, :r]             = x[row(p)] @ a[o:o+r].T             (shrink; row(p) = t or p)
    y[p, col:col+OUT]   += scale[s] * u[p, :r] @ b[o:o+r]     (expand, in place)
Only r rank rows are touched per pair (rank tiles of BR, masked): cost ~ sum of ranks.
The kernels read each row's slot, so any alignment by expert serves them: the (expert, slot)
one of `moe_lora_align` (the standalone ops here, the dense attention LoRA) or fused MoE's
slot-sorted by-expert one, where the expand runs inside the expert GEMM (kernels/fused_moe.py).
"""

from __future__ import annotations

import torch

from kernels._dispatch import check, check_same_device, checked_once, dot_precision, empty, interp_upcast, meta, use_triton
from kernels.moe_align import MoeAlignment, moe_lora_align
from kernels.tiles import RANK_TILE, LoraTiles, lora_block_m, lora_expand_tiles, lora_shrink_tiles


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


def moe_lora_shrink_triton(x, projections, align: MoeAlignment, slot_ids, row_div: int, topk: int, rank_bound: int,
                           out=None, tiles: LoraTiles | None = None):
    """u (N, NP * RM) fp32 from NP <= 3 projections [(a, offsets, ranks)] reading the same x, in
    one launch: projection q in columns [q * RM, q * RM + r). slot_ids (T,) int32. tiles: BK and
    launch options (default: kernels.tiles, a tuned table's or the heuristic's)."""
    from kernels._tl.lora import lora_shrink_kernel

    n = align.num_pairs
    num_p = len(projections)
    width = max(rank_bound, 1)
    u = out if out is not None else empty(n, num_p * width, dtype=torch.float32, device=x.device)
    if rank_bound == 0 or n == 0:
        return u
    (a0, off0, rk0), (a1, off1, rk1), (a2, off2, rk2) = (projections + [projections[0]] * 2)[:3]
    in_dim = x.shape[1]
    tiles = tiles or lora_shrink_tiles(n, off0.shape[1], in_dim, align.block_m, x.dtype, x.device)
    grid = (align.max_blocks, triton_cdiv(rank_bound, RANK_TILE), num_p)
    lora_shrink_kernel[grid](
        x, a0, a1, a2, u, align.sorted_ids, align.block_expert, align.num_blocks, slot_ids,
        off0, rk0, off1, rk1, off2, rk2, n, off0.shape[1], in_dim, u.shape[1] // num_p,
        x.stride(0), a0.stride(0), a1.stride(0), a2.stride(0), u.stride(0),
        X_ROW_DIV=row_div, TOPK=topk, PRECISION=dot_precision(x.dtype), UPCAST=interp_upcast(x.dtype),
        BM=align.block_m, BR=RANK_TILE, BK=tiles.BLOCK, **tiles.launch_kwargs(),
    )
    return u


def moe_lora_expand_triton(y, u, projections, scales, align: MoeAlignment, slot_ids, topk: int,
                           tiles: LoraTiles | None = None):
    """In place on y from NP <= 3 projections [(b, offsets, ranks, y_col)]: projection q reads
    u's columns from q * (u.shape[1] // NP) and adds at y[:, y_col:y_col + OUT_q], one launch.
    tiles: BN and launch options (default: kernels.tiles)."""
    from kernels._tl.lora import lora_expand_kernel

    n = align.num_pairs
    if n == 0:
        return y
    num_p = len(projections)
    (b0, off0, rk0, c0), (b1, off1, rk1, c1), (b2, off2, rk2, c2) = (projections + [projections[0]] * 2)[:3]
    outs = [p[0].shape[1] for p in projections] + [0] * (3 - num_p)
    tiles = tiles or lora_expand_tiles(n, off0.shape[1], max(outs), align.block_m, b0.dtype, b0.device)
    bn = tiles.BLOCK
    grid = (align.max_blocks, triton_cdiv(max(outs), bn), num_p)
    lora_expand_kernel[grid](
        u, b0, b1, b2, y, scales, align.sorted_ids, align.block_expert, align.num_blocks, slot_ids,
        off0, rk0, off1, rk1, off2, rk2, n, off0.shape[1], *outs, c0, c1, c2, u.shape[1] // num_p,
        u.stride(0), b0.stride(0), b1.stride(0), b2.stride(0), y.stride(0),
        TOPK=topk, PRECISION=dot_precision(b0.dtype), UPCAST=interp_upcast(b0.dtype),
        BM=align.block_m, BN=bn, BR=RANK_TILE, **tiles.launch_kwargs(),
    )
    return y


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
    def run_check():
        _check_common(x, a, offsets, ranks, topk_ids, slot_ids)
        check(x.dim() == 2 and a.shape[1] == x.shape[1], f"a (R, {x.shape[-1]}) expected, got {tuple(a.shape)}")
        check(x.dtype == a.dtype, f"x and a dtypes differ: {x.dtype} vs {a.dtype}")
        if out is not None:
            check(out.shape == (topk_ids.numel(), rank_bound) and out.dtype == torch.float32, "out must be (N, RM) fp32")
        _row_div(x, topk_ids)

    checked_once(("moe_lora_shrink", *map(meta, (x, a, offsets, ranks, topk_ids, slot_ids, out)), rank_bound), run_check)
    if not use_triton(x):
        return moe_lora_shrink_torch(x, a, offsets, ranks, topk_ids, slot_ids, rank_bound, out)
    if align is None:
        align = moe_lora_align(topk_ids, slot_ids, offsets.shape[1], offsets.shape[0], lora_block_m(topk_ids.numel()))
    return moe_lora_shrink_triton(x, [(a, offsets, ranks)], align, slot_ids.to(torch.int32), _row_div(x, topk_ids),
                                  topk_ids.shape[1], rank_bound, out)


def moe_lora_expand_(y, u, b, offsets, ranks, scales, topk_ids, slot_ids, y_col: int = 0, align: MoeAlignment | None = None):
    """In place: y[p, y_col:y_col+OUT] += scale[s] * u[p, :r] @ b[o:o+r]; returns y.

    y (N, >= y_col+OUT) any float dtype; u (N, RM) fp32; b (R, OUT); scales (S,) fp32.
    """
    n = topk_ids.numel()

    def run_check():
        _check_common(u, b, offsets, ranks, topk_ids, slot_ids)
        check(u.shape[0] == n and u.dtype == torch.float32, f"u must be (N={n}, RM) fp32, got {tuple(u.shape)} {u.dtype}")
        check(y.dim() == 2 and y.shape[0] == n and y.shape[1] >= y_col + b.shape[1] and y.stride(1) == 1,
              f"y must be (N={n}, >={y_col + b.shape[1]}) with contiguous rows, got {tuple(y.shape)}")
        check(scales.shape == (offsets.shape[0],) and scales.dtype == torch.float32, "scales must be (S,) float32")
        check_same_device(y=y, scales=scales, u=u)

    checked_once(("moe_lora_expand_", *map(meta, (y, u, b, offsets, ranks, scales, topk_ids, slot_ids)), y_col),
                 run_check)
    if not use_triton(y):
        return moe_lora_expand_torch(y, u, b, offsets, ranks, scales, topk_ids, slot_ids, y_col)
    if align is None:
        align = moe_lora_align(topk_ids, slot_ids, offsets.shape[1], offsets.shape[0], lora_block_m(n))
    return moe_lora_expand_triton(y, u, [(b, offsets, ranks, y_col)], scales, align, slot_ids.to(torch.int32),
                                  topk_ids.shape[1])
