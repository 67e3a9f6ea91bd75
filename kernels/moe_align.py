"""Routing alignment for grouped expert GEMMs, computed on the device without host sync.

Legend: T tokens, K top-k, N = T*K routed pairs, E experts, S adapter slots,
G groups (E for experts, E*S for (expert, slot)), BM block rows, L padded length.

Pairs p = t*K + k are stably sorted by group key; each non-empty group is padded to a
multiple of BM with the sentinel N. Block b covers sorted_ids[b*BM:(b+1)*BM] and
belongs to one group. All sizes are static upper bounds derived from (N, G, BM):
  L = round_up(N + min(N, G) * (BM - 1), BM)
so nothing has to be read back to the host; kernels launch L // BM programs and
early-exit on blocks >= num_blocks[0] (a device tensor).

Three layouts:
- `moe_align`: by expert (the base GEMMs).
- `moe_align(..., slot_ids=, num_slots=)`: by expert, each expert's pairs ordered by adapter
  slot (base pairs first) and padded per expert, not per slot. The one alignment of fused MoE
  with LoRA: the base GEMMs see the by-expert blocks (no extra padding), and the LoRA kernels,
  which read each row's slot, find a block's rows of one adapter next to each other.
- `moe_lora_align`: by (expert, slot), base pairs dropped, padded per group (the standalone
  LoRA ops and the dense attention LoRA).

On the Triton path the whole alignment is one launch (kernels/_tl/align.py); its torch twins
are `moe_align_torch` and `moe_lora_align_torch` (about 25 small ops, through `_align`). The
twins keep a stable order inside a group; the kernel
places a group's pairs in atomic arrival order. Both are valid: every pair's result is
computed on its own row, whatever its position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._dispatch import use_triton
from kernels.tiles import pow2

MAX_TRITON_PAIRS = 1 << 16  # one program walks all pairs: beyond this the twin's sort is faster

@dataclass
class MoeAlignment:
    sorted_ids: torch.Tensor  # (L,) int32 pair ids, sentinel = num_pairs
    block_expert: torch.Tensor  # (L // BM,) int32, -1 for unused blocks
    block_slot: torch.Tensor | None  # (L // BM,) int32 for (expert, slot) groups, else None
    num_blocks: torch.Tensor  # (1,) int32, number of used blocks
    block_m: int
    num_pairs: int

    @property
    def max_blocks(self) -> int:
        return self.block_expert.shape[0]


def _max_len(n: int, groups: int, block_m: int) -> int:
    raw = n + min(n, groups) * (block_m - 1)
    return max(block_m, -(-raw // block_m) * block_m)


def _align(keys: torch.Tensor, valid: torch.Tensor | None, num_groups: int, block_m: int,
           sort_keys: torch.Tensor | None = None):
    """keys (N,) int64 in [0, G); valid (N,) bool or None. Returns sorted_ids, block_group, num_blocks.
    sort_keys (N,), ordered like keys (keys = sort_keys // c): pairs ordered by them inside a group."""
    dev = keys.device
    n = keys.numel()
    max_len = _max_len(n, num_groups, block_m)
    # invalid pairs go to an extra group G that is neither counted nor padded
    if valid is not None:
        keys = torch.where(valid, keys, torch.full_like(keys, num_groups))
    counts = torch.zeros(num_groups + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, keys, torch.ones_like(keys))  # no sync (unlike CUDA bincount)
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_groups] = 0
    ends = torch.cumsum(padded, 0)  # (G+1,)
    starts = ends - padded
    cstarts = torch.cumsum(counts, 0) - counts
    order = torch.sort(keys if sort_keys is None else sort_keys, stable=True).indices  # (N,)
    sk = keys[order]
    dest = starts[sk] + torch.arange(n, device=dev) - cstarts[sk]
    dest = torch.where(sk < num_groups, dest, torch.full_like(dest, max_len))
    sorted_ids = torch.full((max_len + 1,), n, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    sorted_ids = sorted_ids[:max_len]
    block_starts = torch.arange(0, max_len, block_m, device=dev)
    group_ends = ends[:num_groups].contiguous()
    block_group = torch.searchsorted(group_ends, block_starts, right=True)  # (max_blocks,)
    total = ends[num_groups - 1] if num_groups > 0 else ends[0]
    used = block_starts < total
    block_group = torch.where(used, block_group, torch.full_like(block_group, -1))
    num_blocks = (total // block_m).to(torch.int32).reshape(1)
    return sorted_ids, block_group, num_blocks


def _align_triton(topk_ids: torch.Tensor, slot_ids: torch.Tensor | None, num_experts: int, num_slots: int,
                  block_m: int, mode: int) -> MoeAlignment:
    """mode: 0 by expert, 1 by (expert, slot) dropping base pairs, 2 by expert sorted by slot."""
    from kernels._tl.align import moe_align_kernel

    dev = topk_ids.device
    n = topk_ids.numel()
    s = (1, num_slots, num_slots + 1)[mode]  # slots per expert in the group key
    groups = num_experts * s
    max_len = _max_len(n, num_experts if mode == 2 else groups, block_m)  # mode 2 pads per expert
    nb = max_len // block_m
    i32 = dict(dtype=torch.int32, device=dev)
    scratch = torch.empty(groups + n, **i32)  # counts (G,) then pos (N,); cleared in the kernel
    sorted_ids, block_expert = torch.empty(max_len, **i32), torch.empty(nb, **i32)
    block_slot = torch.empty(nb, **i32) if mode == 1 else None
    num_blocks = torch.empty(1, **i32)
    ids = topk_ids.reshape(-1)
    moe_align_kernel[(1,)](
        ids, slot_ids if slot_ids is not None else ids, scratch, scratch[groups:], sorted_ids, block_expert,
        block_slot if block_slot is not None else block_expert, num_blocks, n, groups, max_len, nb,
        K=topk_ids.shape[1], S=s, MODE=mode, BM=block_m, BLOCK=1024, EB=max(1, 1024 // pow2(s)), SP=pow2(s),
        num_warps=8,
    )
    return MoeAlignment(sorted_ids, block_expert, block_slot, num_blocks, block_m, n)


def _triton_ok(topk_ids: torch.Tensor) -> bool:
    return use_triton(topk_ids) and 0 < topk_ids.numel() <= MAX_TRITON_PAIRS


def moe_align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    keys = topk_ids.reshape(-1).to(torch.int64)
    sorted_ids, bg, nb = _align(keys, None, num_experts, block_m)
    return MoeAlignment(sorted_ids, bg.to(torch.int32), None, nb, block_m, keys.numel())


def moe_align_slots_torch(topk_ids: torch.Tensor, slot_ids: torch.Tensor, num_experts: int, num_slots: int,
                          block_m: int) -> MoeAlignment:
    """Twin of the slot-sorted by-expert layout (kernel mode 2)."""
    k = topk_ids.shape[1]
    e = topk_ids.reshape(-1).to(torch.int64)
    s = slot_ids.to(torch.int64).repeat_interleave(k)
    sorted_ids, bg, nb = _align(e, None, num_experts, block_m, sort_keys=e * (num_slots + 1) + s + 1)
    return MoeAlignment(sorted_ids, bg.to(torch.int32), None, nb, block_m, e.numel())


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, slot_ids: torch.Tensor | None = None,
              num_slots: int = 0) -> MoeAlignment:
    """Group routed pairs by expert, padded per expert to BM; with slot_ids (T,) (-1 = base) and
    num_slots, each expert's pairs are ordered by slot (see module docstring).

    topk_ids (T, K) int -> sorted_ids (L,), block_expert (L//BM,), num_blocks (1,).
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be (T, K), got {tuple(topk_ids.shape)}")
    if slot_ids is not None and (slot_ids.dim() != 1 or slot_ids.shape[0] != topk_ids.shape[0]):
        raise ValueError(f"slot_ids must be (T={topk_ids.shape[0]},), got {tuple(slot_ids.shape)}")
    if _triton_ok(topk_ids):
        if slot_ids is None:
            return _align_triton(topk_ids.contiguous(), None, num_experts, 1, block_m, 0)
        return _align_triton(topk_ids.contiguous(), slot_ids.to(torch.int32).contiguous(), num_experts, num_slots,
                             block_m, 2)
    if slot_ids is None:
        return moe_align_torch(topk_ids, num_experts, block_m)
    return moe_align_slots_torch(topk_ids, slot_ids, num_experts, num_slots, block_m)


def moe_lora_align_torch(topk_ids: torch.Tensor, slot_ids: torch.Tensor, num_experts: int, num_slots: int,
                         block_m: int) -> MoeAlignment:
    k = topk_ids.shape[1]
    e = topk_ids.reshape(-1).to(torch.int64)
    s = slot_ids.to(torch.int64).repeat_interleave(k)
    valid = s >= 0
    keys = e * num_slots + s.clamp(min=0)
    sorted_ids, bg, nb = _align(keys, valid, num_experts * num_slots, block_m)
    unused = bg < 0
    be = torch.where(unused, -1, bg // max(num_slots, 1)).to(torch.int32)
    bs = torch.where(unused, -1, bg % max(num_slots, 1)).to(torch.int32)
    return MoeAlignment(sorted_ids, be, bs, nb, block_m, e.numel())


def moe_lora_align(
    topk_ids: torch.Tensor, slot_ids: torch.Tensor, num_experts: int, num_slots: int, block_m: int
) -> MoeAlignment:
    """Group routed pairs by (expert, slot) with slot >= 0, padded per group to BM.

    topk_ids (T, K), slot_ids (T,) (-1 = base only, such pairs are dropped).
    Group key = e * S + s; block_expert = key // S, block_slot = key % S.
    """
    if topk_ids.dim() != 2 or slot_ids.dim() != 1 or slot_ids.shape[0] != topk_ids.shape[0]:
        raise ValueError(
            f"need topk_ids (T, K) and slot_ids (T,), got {tuple(topk_ids.shape)}, {tuple(slot_ids.shape)}"
        )
    if _triton_ok(topk_ids) and num_slots > 0:
        return _align_triton(topk_ids.contiguous(), slot_ids.to(torch.int32).contiguous(), num_experts,
                             num_slots, block_m, 1)
    return moe_lora_align_torch(topk_ids, slot_ids, num_experts, num_slots, block_m)


def dense_lora_align(slot_ids: torch.Tensor, num_slots: int, block_m: int) -> MoeAlignment:
    """Segment tokens by adapter slot (dense LoRA = MoE LoRA with E=1, K=1)."""
    zeros = torch.zeros(slot_ids.shape[0], 1, dtype=torch.int32, device=slot_ids.device)
    return moe_lora_align(zeros, slot_ids, 1, num_slots, block_m)
