"""Fused MoE forward on base expert weights, with optional rank-exact LoRA.

Legend: T tokens, K top-k, N = T*K routed pairs, E experts, H hidden, I intermediate,
S adapter slots, RM LoRA rank bound.

Semantics (pair p = t*K + k, e = topk_ids[t, k], s = slot_ids[t]):
    gu[p]  = hidden[t] @ w_gate_up[e].T  (+ LoRA gate delta on [:I], up delta on [I:])   (N, 2I)
    h[p]   = silu(gu[p, :I]) * gu[p, I:]                                                  (N, I)
    y[p]   = h[p] @ w_down[e].T          (+ LoRA down delta)                              (N, H)
    out[t] = sum_k topk_weights[t, k] * y[t*K + k]                                         (T, H)
w_gate_up (E, 2I, H): gate rows [0, I), up rows [I, 2I) (transformers v5); w_down (E, H, I).
Accumulation in fp32; pairs are grouped per expert so experts without tokens cost nothing.
With combine=False the (T, K, H) fp32 weighted terms are returned instead of out, for a later
kernel to sum (kernels.norm.add_rms_norm_ folds the combine into the next residual add + norm).

Triton launches: the alignment, the gate/up GEMM with SiLU-and-multiply in its epilogue, the
down GEMM with the routing weight in its epilogue (+ the combine, unless combine=False). With
LoRA, one alignment (by expert, each expert's pairs ordered by slot) serves all of them, and two
shrinks are added (gate and up together, then down); each expand runs in its GEMM's epilogue,
before the activation (gate/up) or the routing weight (down).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import check, check_same_device, checked_once, dot_precision, empty, interp_upcast, meta, use_triton
from kernels.lora_types import MoeLoraLayer
from kernels.moe_align import MoeAlignment, moe_align
from kernels.moe_lora import moe_lora_expand_torch, moe_lora_shrink_torch, moe_lora_shrink_triton
from kernels.norm import moe_combine
from kernels.tiles import RANK_TILE, GemmTiles, moe_gemm_tiles

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- checks


def check_moe_inputs(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, slot_ids) -> None:
    check(hidden.dim() == 2, f"hidden must be (T, H), got {tuple(hidden.shape)}")
    t, h = hidden.shape
    check(w_gate_up.dim() == 3 and w_gate_up.shape[2] == h and w_gate_up.shape[1] % 2 == 0,
          f"w_gate_up must be (E, 2I, H={h}), got {tuple(w_gate_up.shape)}")
    e, i2, _ = w_gate_up.shape
    check(w_down.shape == (e, h, i2 // 2), f"w_down must be (E, H, I)={(e, h, i2 // 2)}, got {tuple(w_down.shape)}")
    check(topk_ids.dim() == 2 and topk_ids.shape[0] == t, f"topk_ids must be (T={t}, K), got {tuple(topk_ids.shape)}")
    check(topk_weights.shape == topk_ids.shape, f"topk_weights {tuple(topk_weights.shape)} != topk_ids {tuple(topk_ids.shape)}")
    check(topk_ids.dtype in (torch.int32, torch.int64), f"topk_ids must be int32/int64, got {topk_ids.dtype}")
    check(hidden.dtype in FLOAT_DTYPES, f"unsupported dtype {hidden.dtype}")
    check(w_gate_up.dtype == hidden.dtype and w_down.dtype == hidden.dtype,
          f"dtype mismatch: hidden {hidden.dtype}, w_gate_up {w_gate_up.dtype}, w_down {w_down.dtype}")
    check(hidden.stride(1) == 1, "hidden must have a contiguous last dim")
    check(w_gate_up.stride(2) == 1 and w_down.stride(2) == 1, "expert weights must be K-major (last dim contiguous)")
    check_same_device(hidden=hidden, w_gate_up=w_gate_up, w_down=w_down, topk_weights=topk_weights, topk_ids=topk_ids)
    if lora is not None:
        check(slot_ids is not None, "slot_ids is required with lora")
        check(slot_ids.shape == (t,) and slot_ids.dtype in (torch.int32, torch.int64),
              f"slot_ids must be (T={t},) int32/int64, got {tuple(slot_ids.shape)} {slot_ids.dtype}")
        check(lora.scales is not None and lora.scales.dtype == torch.float32, "lora.scales must be (S,) float32")
        s = lora.scales.shape[0]
        dims = {"gate": (h, i2 // 2), "up": (h, i2 // 2), "down": (i2 // 2, h)}
        for p in lora.projections:
            a, b = lora.a[p], lora.b[p]
            check(a.dim() == 2 and a.shape[1] == dims[p][0], f"lora.a[{p!r}] must be (R, {dims[p][0]}), got {tuple(a.shape)}")
            check(b.dim() == 2 and b.shape[1] == dims[p][1] and b.shape[0] == a.shape[0],
                  f"lora.b[{p!r}] must be ({a.shape[0]}, {dims[p][1]}), got {tuple(b.shape)}")
            check(a.dtype == hidden.dtype and b.dtype == hidden.dtype, f"lora {p!r} pool dtype must be {hidden.dtype}")
            check(a.stride(1) == 1 and b.stride(1) == 1, f"lora {p!r} pools must have contiguous rows")
            for name, tab in (("offsets", lora.offsets[p]), ("ranks", lora.ranks[p])):
                check(tab.shape == (s, e) and tab.dtype == torch.int32 and tab.is_contiguous(),
                      f"lora.{name}[{p!r}] must be contiguous int32 (S, E)=({s}, {e}), got {tuple(tab.shape)} {tab.dtype}")
            check_same_device(hidden=hidden, a=a, b=b, offsets=lora.offsets[p], ranks=lora.ranks[p], scales=lora.scales)


# ----------------------------------------------------------------------------- torch twin


def fused_moe_torch(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora: MoeLoraLayer | None = None, slot_ids=None,
                    combine: bool = True):
    t, hdim = hidden.shape
    k = topk_ids.shape[1]
    e_num, i2, _ = w_gate_up.shape
    i = i2 // 2
    n = t * k
    flat = topk_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=e_num).tolist()
    segs = []
    start = 0
    for e, c in enumerate(counts):
        if c:
            segs.append((e, order[start : start + c]))
        start += c
    gu = empty(n, i2, dtype=torch.float32, device=hidden.device)
    for e, idx in segs:
        gu[idx] = (hidden[idx // k] @ w_gate_up[e].T).float()
    if lora is not None:
        rb = lora.rank_bound()
        for p, col in (("gate", 0), ("up", i)):
            if p in lora.a:
                u = moe_lora_shrink_torch(hidden, lora.a[p], lora.offsets[p], lora.ranks[p], topk_ids, slot_ids, rb)
                moe_lora_expand_torch(gu, u, lora.b[p], lora.offsets[p], lora.ranks[p], lora.scales, topk_ids, slot_ids, col)
    h = (F.silu(gu[:, :i]) * gu[:, i:]).to(hidden.dtype)
    y = empty(n, hdim, dtype=torch.float32, device=hidden.device)
    for e, idx in segs:
        y[idx] = (h[idx] @ w_down[e].T).float()
    if lora is not None and "down" in lora.a:
        u = moe_lora_shrink_torch(h, lora.a["down"], lora.offsets["down"], lora.ranks["down"], topk_ids, slot_ids, lora.rank_bound())
        moe_lora_expand_torch(y, u, lora.b["down"], lora.offsets["down"], lora.ranks["down"], lora.scales, topk_ids, slot_ids)
    terms = y.view(t, k, hdim) * topk_weights.float().unsqueeze(-1)
    return terms.sum(1).to(hidden.dtype) if combine else terms


# ----------------------------------------------------------------------------- triton path


def moe_gemm_triton(x, w, align: MoeAlignment, out, tiles: GemmTiles, x_row_div: int, topk: int, fuse_act=False,
                    routed=None, slot_ids=None, scales=None, lora0=None, lora1=None, u_stride=0):
    """out[p] = x[row(p)] @ w[e].T (or the fused SiLU*up form), written per pair id, with the LoRA
    expand of lora0 / lora1 = (u, b, offsets, ranks) in the epilogue (see moe_gemm_kernel)."""
    from kernels._tl.moe_gemm import moe_gemm_kernel

    out_dim = out.shape[1]
    u0, b0, off0, rk0 = lora0 if lora0 is not None else (out, out, align.block_expert, align.block_expert)
    u1, b1, off1, rk1 = lora1 if lora1 is not None else (u0, b0, off0, rk0)
    grid = (align.max_blocks, -(-out_dim // tiles.BN))
    moe_gemm_kernel[grid](
        x, w, out, routed if routed is not None else out, align.sorted_ids, align.block_expert, align.num_blocks,
        slot_ids if slot_ids is not None else align.num_blocks, scales if scales is not None else out,
        u0, b0, off0, rk0, u1, b1, off1, rk1,
        align.num_pairs, out_dim, x.shape[1], w.shape[1] // 2 if fuse_act else 0, w.shape[0],
        x.stride(0), w.stride(0), w.stride(1), out.stride(0), u_stride, b0.stride(0), b1.stride(0),
        X_ROW_DIV=x_row_div, TOPK=topk, FUSE_ACT=fuse_act, MUL_ROUTED=routed is not None, LORA_0=lora0 is not None,
        LORA_1=lora1 is not None, PRECISION=dot_precision(x.dtype), UPCAST=interp_upcast(x.dtype), BR=RANK_TILE,
        **tiles.kwargs(),
    )
    return out


def fused_moe_triton(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora: MoeLoraLayer | None = None, slot_ids=None,
                     combine: bool = True):
    t, hdim = hidden.shape
    k = topk_ids.shape[1]
    e_num, i2, _ = w_gate_up.shape
    i = i2 // 2
    n = t * k
    dev, dt = hidden.device, hidden.dtype
    tiles_gu = moe_gemm_tiles(n, e_num, i, hdim, dt, dev)
    tiles_dn = moe_gemm_tiles(n, e_num, hdim, i, dt, dev)  # same BM: both follow pairs per expert
    lora_gu = [p for p in ("gate", "up") if lora is not None and p in lora.a]
    lora_dn = lora is not None and "down" in lora.a
    rb = lora.rank_bound() if lora is not None else 0
    if rb == 0:
        lora_gu, lora_dn = [], False
    slots = slot_ids.to(torch.int32) if lora_gu or lora_dn else None
    align = moe_align(topk_ids, e_num, tiles_gu.BM, slots, lora.num_slots if slots is not None else 0)
    routed = topk_weights.reshape(-1).to(torch.float32)
    epi = dict(slot_ids=slots, scales=lora.scales if slots is not None else None)
    if lora_gu:  # gate and up read the same x: one shrink for both, u (N, len(lora_gu) * RM)
        u = moe_lora_shrink_triton(hidden, [(lora.a[p], lora.offsets[p], lora.ranks[p]) for p in lora_gu], align, slots,
                                   k, k, rb)
        per_proj = {p: (u[:, j * rb:], lora.b[p], lora.offsets[p], lora.ranks[p]) for j, p in enumerate(lora_gu)}
        epi.update(lora0=per_proj.get("gate"), lora1=per_proj.get("up"), u_stride=u.stride(0))
    h = moe_gemm_triton(hidden, w_gate_up, align, empty(n, i, dtype=dt, device=dev), tiles_gu, k, k, fuse_act=True, **epi)
    epi.update(lora0=None, lora1=None)
    if lora_dn:  # the delta joins the base output before the routing weight multiplies both
        u = moe_lora_shrink_triton(h, [(lora.a["down"], lora.offsets["down"], lora.ranks["down"])], align, slots, 1, k, rb)
        epi.update(lora0=(u, lora.b["down"], lora.offsets["down"], lora.ranks["down"]), u_stride=u.stride(0))
    y = moe_gemm_triton(h, w_down, align, empty(n, hdim, dtype=torch.float32, device=dev), tiles_dn, 1, k,
                        routed=routed, **epi)
    terms = y.view(t, k, hdim)
    return moe_combine(terms, dt) if combine else terms


def fused_moe(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora: MoeLoraLayer | None = None, slot_ids=None,
              combine: bool = True):
    """out (T, H) = MoE(hidden) with optional per-slot expert LoRA (see module docstring);
    combine=False: the (T, K, H) fp32 weighted terms of out instead."""
    checked_once(_moe_key(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, slot_ids),
                 lambda: check_moe_inputs(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, slot_ids))
    if lora is not None and not lora.projections:
        lora = None
    if hidden.shape[0] == 0:
        k = topk_ids.shape[1]
        return hidden.new_zeros(0, hidden.shape[1]) if combine else hidden.new_zeros(0, k, hidden.shape[1],
                                                                                      dtype=torch.float32)
    if use_triton(hidden):
        return fused_moe_triton(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, slot_ids, combine)
    return fused_moe_torch(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, slot_ids, combine)


def _moe_key(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, slot_ids) -> tuple:
    key = ("fused_moe", meta(hidden), meta(w_gate_up), meta(w_down), meta(topk_weights), meta(topk_ids), meta(slot_ids))
    return key if lora is None else key + (lora.signature(),)
