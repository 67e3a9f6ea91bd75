"""Rank-exact multi-adapter LoRA for dense projections (attention q/k/v/o), segmented by slot.

Legend: T tokens, S adapter slots, R pool rank rows, IN/OUT projection dims, RM rank bound.

Semantics: y[t] += scale[s] * (x[t] @ a[o:o+r].T) @ b[o:o+r]   with s = slot_ids[t],
o = offsets[s], r = ranks[s]; s == -1 or r == 0 adds nothing. In place on y.
The Triton path is the MoE LoRA shrink/expand with one expert and top-1 (tokens are the pairs).
"""

from __future__ import annotations

import torch

from kernels._dispatch import check, check_same_device, use_triton
from kernels.lora_types import DenseLoraLayer
from kernels.moe_align import dense_lora_align
from kernels.moe_lora import moe_lora_expand_triton, moe_lora_shrink_triton
from kernels.tiles import lora_block_m


def check_dense_inputs(y: torch.Tensor, x: torch.Tensor, lora: DenseLoraLayer, slot_ids: torch.Tensor) -> None:
    check(x.dim() == 2 and y.dim() == 2 and x.shape[0] == y.shape[0],
          f"x (T, IN) and y (T, OUT) must share T, got {tuple(x.shape)}, {tuple(y.shape)}")
    t = x.shape[0]
    s = lora.offsets.shape[0]
    check(lora.a.dim() == 2 and lora.a.shape[1] == x.shape[1], f"a must be (R, IN={x.shape[1]}), got {tuple(lora.a.shape)}")
    check(lora.b.dim() == 2 and lora.b.shape == (lora.a.shape[0], y.shape[1]),
          f"b must be (R={lora.a.shape[0]}, OUT={y.shape[1]}), got {tuple(lora.b.shape)}")
    check(slot_ids.shape == (t,), f"slot_ids must be (T={t},), got {tuple(slot_ids.shape)}")
    for name, tab in (("offsets", lora.offsets), ("ranks", lora.ranks)):
        check(tab.shape == (s,) and tab.dtype == torch.int32 and tab.is_contiguous(), f"{name} must be contiguous int32 (S,)")
    check(lora.scales.shape == (s,) and lora.scales.dtype == torch.float32, "scales must be (S,) float32")
    check(x.dtype == lora.a.dtype == lora.b.dtype, f"dtype mismatch: x {x.dtype}, a {lora.a.dtype}, b {lora.b.dtype}")
    check(x.stride(1) == 1 and y.stride(1) == 1 and lora.a.stride(1) == 1 and lora.b.stride(1) == 1,
          "x, y, a, b must have a contiguous last dim")
    check_same_device(y=y, x=x, a=lora.a, b=lora.b, offsets=lora.offsets, ranks=lora.ranks, scales=lora.scales, slot_ids=slot_ids)


def dense_lora_torch_(y: torch.Tensor, x: torch.Tensor, lora: DenseLoraLayer, slot_ids: torch.Tensor) -> torch.Tensor:
    """Twin: loop over slots, vectorised over each slot's tokens."""
    s_num = lora.offsets.shape[0]
    slots = slot_ids.long()
    order = torch.sort(slots, stable=True).indices
    counts = torch.bincount(slots + 1, minlength=s_num + 1).tolist()
    off, rk, sc = lora.offsets.tolist(), lora.ranks.tolist(), lora.scales.tolist()
    start = counts[0]  # slot -1 first
    for s in range(s_num):
        c = counts[s + 1]
        idx = order[start : start + c]
        start += c
        o, r = off[s], rk[s]
        if c == 0 or r == 0:
            continue
        u = x[idx].float() @ lora.a[o : o + r].float().T
        y[idx] = (y[idx].float() + (u @ lora.b[o : o + r].float()) * sc[s]).to(y.dtype)
    return y


def dense_lora_triton_(y: torch.Tensor, x: torch.Tensor, lora: DenseLoraLayer, slot_ids: torch.Tensor) -> torch.Tensor:
    t = x.shape[0]
    s_num = lora.offsets.shape[0]
    rb = lora.rank_bound()
    if t == 0 or rb == 0:
        return y
    align = dense_lora_align(slot_ids, s_num, lora_block_m(t))
    offsets, ranks = lora.offsets.view(s_num, 1), lora.ranks.view(s_num, 1)
    slots = slot_ids.to(torch.int32)
    u = moe_lora_shrink_triton(x, [(lora.a, offsets, ranks)], align, slots, 1, 1, rb)
    return moe_lora_expand_triton(y, u, [(lora.b, offsets, ranks, 0)], lora.scales, align, slots, 1)


def dense_lora_(y: torch.Tensor, x: torch.Tensor, lora: DenseLoraLayer, slot_ids: torch.Tensor) -> torch.Tensor:
    """y (T, OUT) += per-slot LoRA delta of x (T, IN); returns y."""
    check_dense_inputs(y, x, lora, slot_ids)
    if use_triton(y):
        return dense_lora_triton_(y, x, lora, slot_ids)
    return dense_lora_torch_(y, x, lora, slot_ids)
