"""Rank-exact multi-adapter LoRA for dense projections (attention q/k/v/o), segmented by slot.

Legend: T tokens, S adapter slots, R pool rank rows, IN/OUT projection dims, RM rank bound,
W width of an output holding several projections side by side (qkv).

Semantics: y[t] += scale[s] * (x[t] @ a[o:o+r].T) @ b[o:o+r]   with s = slot_ids[t],
o = offsets[s], r = ranks[s]; s == -1 or r == 0 adds nothing. In place on y.
`dense_lora_cols_` does it for up to three projections reading the same x (q, k, v), each
adding into its own columns of y, in one shrink and one expand launch.
The Triton path is the MoE LoRA shrink/expand with one expert and top-1 (tokens are the pairs),
over an alignment of the tokens by slot that depends on slot_ids only: `dense_lora_plan`
computes it once per step for every layer's launches to share (None on the torch path).
"""

from __future__ import annotations

import torch

from kernels._dispatch import check, check_same_device, checked_once, meta, use_triton
from kernels.lora_types import DenseLoraLayer
from kernels.moe_align import MoeAlignment, dense_lora_align
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


def dense_lora_plan(slot_ids: torch.Tensor, num_slots: int) -> MoeAlignment | None:
    """The tokens' alignment by slot (base tokens dropped) that dense LoRA launches share; one
    launch (+ a memset). None where the ops run their torch twins (they need none)."""
    if not use_triton(slot_ids) or slot_ids.shape[0] == 0:
        return None
    return dense_lora_align(slot_ids, num_slots, lora_block_m(slot_ids.shape[0]))


def _triton_cols_(y, x, parts: list[tuple[DenseLoraLayer, int]], slot_ids, align: MoeAlignment | None):
    t = x.shape[0]
    rb = max(lora.rank_bound() for lora, _ in parts)
    if t == 0 or rb == 0:
        return y
    s_num = parts[0][0].offsets.shape[0]
    if align is None:
        align = dense_lora_align(slot_ids, s_num, lora_block_m(t))
    slots = slot_ids.to(torch.int32)
    tables = [(lora.offsets.view(s_num, 1), lora.ranks.view(s_num, 1)) for lora, _ in parts]
    u = moe_lora_shrink_triton(x, [(lora.a, *tab) for (lora, _), tab in zip(parts, tables)], align, slots, 1, 1, rb)
    return moe_lora_expand_triton(y, u, [(lora.b, *tab, col) for (lora, col), tab in zip(parts, tables)],
                                  parts[0][0].scales, align, slots, 1)


def dense_lora_(y: torch.Tensor, x: torch.Tensor, lora: DenseLoraLayer, slot_ids: torch.Tensor,
                align: MoeAlignment | None = None) -> torch.Tensor:
    """y (T, OUT) += per-slot LoRA delta of x (T, IN); returns y. align: `dense_lora_plan`'s."""
    checked_once(("dense_lora_", meta(y), meta(x), lora.signature(), meta(slot_ids)),
                 lambda: check_dense_inputs(y, x, lora, slot_ids))
    if use_triton(y):
        return _triton_cols_(y, x, [(lora, 0)], slot_ids, align)
    return dense_lora_torch_(y, x, lora, slot_ids)


def dense_lora_cols_(y: torch.Tensor, x: torch.Tensor, parts: list[tuple[DenseLoraLayer | None, int]],
                     slot_ids: torch.Tensor, align: MoeAlignment | None = None) -> torch.Tensor:
    """y (T, W): y[:, col:col+OUT_p] += the LoRA delta of x (T, IN) for each (lora_p, col) of
    parts (None: skipped); up to three projections sharing x and scales, one shrink and one
    expand launch. Returns y."""
    parts = [(lora, col) for lora, col in parts if lora is not None]
    if not parts:
        return y

    def run_check():
        check(len(parts) <= 3, f"at most 3 projections per launch, got {len(parts)}")
        check(y.dim() == 2, f"y must be (T, W), got {tuple(y.shape)}")
        for lora, col in parts:
            check(0 <= col and col + lora.b.shape[1] <= y.shape[1], f"columns [{col}, {col + lora.b.shape[1]}) "
                  f"outside y's {y.shape[1]}")
            check_dense_inputs(y[:, col:col + lora.b.shape[1]], x, lora, slot_ids)
            check(lora.scales is parts[0][0].scales and lora.offsets.shape == parts[0][0].offsets.shape,
                  "projections launched together must share the slots' scales")

    checked_once(("dense_lora_cols_", meta(y), meta(x), meta(slot_ids),
                  tuple((lora.signature(), col, id(lora.scales)) for lora, col in parts)), run_check)
    if use_triton(y):
        return _triton_cols_(y, x, parts, slot_ids, align)
    for lora, col in parts:
        dense_lora_torch_(y[:, col:col + lora.b.shape[1]], x, lora, slot_ids)
    return y
