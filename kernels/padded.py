"""Padded MoE LoRA baseline (benchmark only): every (slot, expert) pair computed at Rmax.

Legend: S slots, E experts, RM padded rank (max rank), IN/OUT projection dims.

Mimics the common padded layout (vLLM-style): each projection gets zero-padded buffers
  a_pad (S, E, RM, IN), b_pad (S, E, RM, OUT)
and every routed pair with a slot runs the full RM rank, whatever its real rank.
Semantics are identical to the rank-exact layer (padding rows are zero); it reuses the
same shrink/expand kernels with uniform rank tables so that the benchmark isolates
rank-exactness. `pad_moe_lora` returns an equivalent MoeLoraLayer over flattened
(S*E*RM, dim) pools with offsets (s*E + e) * RM and ranks RM everywhere.
"""

from __future__ import annotations

import torch

from kernels.lora_types import MoeLoraLayer


def pad_pool(a: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor, rmax: int) -> torch.Tensor:
    """a (R, D) packed pool -> (S, E, RM, D) zero padded (rows >= r are zero)."""
    s_num, e_num = offsets.shape
    d = a.shape[1]
    j = torch.arange(rmax, device=a.device)
    src = offsets.long().unsqueeze(-1) + j  # (S, E, RM)
    valid = j < ranks.long().unsqueeze(-1)
    src = torch.where(valid, src, torch.zeros_like(src))
    out = a[src.reshape(-1)].view(s_num, e_num, rmax, d)
    return out * valid.unsqueeze(-1).to(a.dtype)


def pad_moe_lora(lora: MoeLoraLayer, rmax: int | None = None) -> MoeLoraLayer:
    """Padded equivalent of `lora`: (S, E, RM, dim) buffers, every pair at rank RM."""
    rmax = rmax or lora.rank_bound()
    padded = MoeLoraLayer(scales=lora.scales, max_rank=rmax)
    for p in lora.projections:
        s_num, e_num = lora.offsets[p].shape
        dev = lora.a[p].device
        a_pad = pad_pool(lora.a[p], lora.offsets[p], lora.ranks[p], rmax)
        b_pad = pad_pool(lora.b[p], lora.offsets[p], lora.ranks[p], rmax)
        padded.a[p] = a_pad.reshape(-1, a_pad.shape[-1])
        padded.b[p] = b_pad.reshape(-1, b_pad.shape[-1])
        idx = torch.arange(s_num * e_num, device=dev, dtype=torch.int32).view(s_num, e_num)
        padded.offsets[p] = (idx * rmax).contiguous()
        padded.ranks[p] = torch.full((s_num, e_num), rmax, dtype=torch.int32, device=dev)
    return padded
