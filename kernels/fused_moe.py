"""Fused MoE forward on base expert weights, with optional rank-exact LoRA.

Legend: T tokens, K top-k, N = T*K routed pairs, E experts, H hidden, I intermediate,
S adapter slots.

Semantics (pair p = t*K + k, e = topk_ids[t, k], s = slot_ids[t]):
    gu[p]  = hidden[t] @ w_gate_up[e].T  (+ LoRA gate delta on [:I], up delta on [I:])   (N, 2I)
    h[p]   = silu(gu[p, :I]) * gu[p, I:]                                                  (N, I)
    y[p]   = h[p] @ w_down[e].T          (+ LoRA down delta)                              (N, H)
    out[t] = sum_k topk_weights[t, k] * y[t*K + k]                                         (T, H)
w_gate_up (E, 2I, H): gate rows [0, I), up rows [I, 2I) (transformers v5); w_down (E, H, I).
Accumulation in fp32; pairs are grouped per expert so experts without tokens cost nothing.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels._dispatch import check, empty, check_same_device, dot_precision, interp_upcast, use_triton
from kernels.lora_types import MoeLoraLayer
from kernels.moe_align import MoeAlignment, moe_align, moe_lora_align
from kernels.moe_lora import (
    lora_block_m,
    moe_lora_expand_torch,
    moe_lora_expand_triton,
    moe_lora_shrink_torch,
    moe_lora_shrink_triton,
    silu_mul_triton,
)

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
        check(slot_ids.shape == (t,), f"slot_ids must be (T={t},), got {tuple(slot_ids.shape)}")
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


def fused_moe_torch(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora: MoeLoraLayer | None = None, slot_ids=None):
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
    out = (y.view(t, k, hdim) * topk_weights.float().unsqueeze(-1)).sum(1)
    return out.to(hidden.dtype)


# ----------------------------------------------------------------------------- triton path


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def gemm_config(num_pairs: int, num_experts: int, out_dim: int, in_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Heuristic tiles: BM by tokens per expert, BN shrunk until all SMs get work."""
    per_expert = num_pairs / max(num_experts, 1)
    bm = 16 if per_expert <= 16 else (32 if per_expert <= 48 else 64)
    bk = 128 if per_expert <= 48 else 64
    if dtype == torch.float32:
        bk = min(bk, 32)
    bk = min(bk, max(16, 1 << (in_dim - 1).bit_length()))
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 132
    blocks = min(num_pairs, num_experts) + num_pairs // bm
    bn = 128 if bm == 64 else 64
    while bn > 32 and blocks * -(-out_dim // bn) < 2 * sms:
        bn //= 2
    bn = min(bn, max(16, 1 << (out_dim - 1).bit_length()))
    warps = 8 if bm * bn >= 64 * 128 else 4
    return dict(BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=3 if bm == 64 else 4)


def moe_gemm_triton(x, w, align: MoeAlignment, out, cfg, x_row_div, fuse_act=False, routed=None):
    """out[p] = x[row(p)] @ w[e].T (or the fused SiLU*up form), written per pair id."""
    from kernels._tl.moe_gemm import moe_gemm_kernel

    out_dim = out.shape[1]
    grid = (align.max_blocks, -(-out_dim // cfg["BN"]))
    moe_gemm_kernel[grid](
        x, w, out, routed if routed is not None else out, align.sorted_ids, align.block_expert, align.num_blocks,
        align.num_pairs, out_dim, x.shape[1], w.shape[1] // 2 if fuse_act else 0,
        x.stride(0), w.stride(0), w.stride(1), out.stride(0),
        X_ROW_DIV=x_row_div, FUSE_ACT=fuse_act, MUL_ROUTED=routed is not None, PRECISION=dot_precision(x.dtype), UPCAST=interp_upcast(x.dtype),
        **cfg,
    )
    return out


def fused_moe_triton(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora: MoeLoraLayer | None = None, slot_ids=None):
    t, hdim = hidden.shape
    k = topk_ids.shape[1]
    e_num, i2, _ = w_gate_up.shape
    i = i2 // 2
    n = t * k
    dev = hidden.device
    cfg_gu = gemm_config(n, e_num, i if lora is None else i2, hdim, hidden.dtype, dev)
    cfg_dn = gemm_config(n, e_num, hdim, i, hidden.dtype, dev)
    align = moe_align(topk_ids, e_num, cfg_gu["BM"])
    align_dn = align if cfg_dn["BM"] == cfg_gu["BM"] else moe_align(topk_ids, e_num, cfg_dn["BM"])
    routed = topk_weights.reshape(-1).to(torch.float32)
    lora_gu = lora is not None and ("gate" in lora.a or "up" in lora.a)
    lora_dn = lora is not None and "down" in lora.a
    if lora is not None and (lora_gu or lora_dn):
        rb = lora.rank_bound()
        la = moe_lora_align(topk_ids, slot_ids, e_num, lora.num_slots, lora_block_m(n))
    if lora_gu:
        gu = moe_gemm_triton(hidden, w_gate_up, align, empty(n, i2, dtype=torch.float32, device=dev), cfg_gu, k)
        first, *second = [p for p in ("gate", "up") if p in lora.a]  # both (one launch) or one
        tables = lambda pool, p: (pool[p], lora.offsets[p], lora.ranks[p])  # noqa: E731
        u = moe_lora_shrink_triton(hidden, *tables(lora.a, first), la, k, rb,
                                   second=tables(lora.a, second[0]) if second else None)
        moe_lora_expand_triton(gu, u, *tables(lora.b, first), lora.scales, la, 0 if first == "gate" else i,
                               second=tables(lora.b, second[0]) if second else None, y_pcol=i)
        h = silu_mul_triton(gu, hidden.dtype)
    else:
        cfg_act = gemm_config(n, e_num, i, hdim, hidden.dtype, dev)
        cfg_act["BM"] = cfg_gu["BM"]
        h = moe_gemm_triton(hidden, w_gate_up, align, empty(n, i, dtype=hidden.dtype, device=dev), cfg_act, k, fuse_act=True)
    y = empty(n, hdim, dtype=torch.float32, device=dev)
    moe_gemm_triton(h, w_down, align_dn, y, cfg_dn, 1, routed=routed)
    if lora_dn:  # the delta is added before the combine, so it is weighted like the base output
        u = moe_lora_shrink_triton(h, lora.a["down"], lora.offsets["down"], lora.ranks["down"], la, 1, rb)
        moe_lora_expand_triton(y, u, lora.b["down"], lora.offsets["down"], lora.ranks["down"], lora.scales, la, 0,
                               routed=routed)
    return y.view(t, k, hdim).sum(1).to(hidden.dtype)


def fused_moe(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora: MoeLoraLayer | None = None, slot_ids=None):
    """out (T, H) = MoE(hidden) with optional per-slot expert LoRA (see module docstring)."""
    check_moe_inputs(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, slot_ids)
    if lora is not None and not lora.projections:
        lora = None
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, hidden.shape[1])
    if use_triton(hidden):
        return fused_moe_triton(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, slot_ids)
    return fused_moe_torch(hidden, w_gate_up, w_down, topk_weights, topk_ids, lora, slot_ids)
