"""Public entry points. Each op dispatches to its Triton kernel when the tensors are on CUDA
(or when DRLORA_FORCE_TRITON=1, e.g. tests under TRITON_INTERPRET=1) and to its plain-torch
twin otherwise. Triton is imported lazily, so this module imports without it.

Legend: T tokens, K top-k, N = T*K pairs, E experts, S adapter slots, R pool rank rows,
RM rank bound, H hidden, I intermediate, B sequences, QH/KVH heads, D head dim,
NB cache blocks, BS block size, MAXB blocks per sequence.

A decoder layer's ops, one launch each on the Triton path: rms_norm / add_rms_norm_ (residual
add + RMSNorm; folds in the MoE combine), attention_input (q/k norm, RoPE, KV store),
paged_decode_attention / paged_prefill_attention, route_topk (softmax, top-k, renorm, cast),
fused_moe (alignment, two expert GEMMs with fused epilogues, LoRA shrinks), dense_lora_.
"""

from __future__ import annotations

import torch

from kernels._dispatch import use_triton
from kernels.attention_input import attention_input
from kernels.dense_lora import dense_lora_, dense_lora_cols_, dense_lora_plan
from kernels.fused_moe import fused_moe
from kernels.lora_types import DenseLoraLayer, MoeLoraLayer
from kernels.moe_align import MoeAlignment, dense_lora_align, moe_align, moe_lora_align
from kernels.moe_lora import moe_lora_expand_, moe_lora_shrink
from kernels.norm import add_rms_norm_, moe_combine, rms_norm
from kernels.padded import pad_moe_lora
from kernels.paged_attention import paged_decode_attention, paged_prefill_attention, store_kv
from kernels.router import route_topk
from kernels.tiles import lora_block_m

__all__ = [
    "DenseLoraLayer",
    "MoeAlignment",
    "MoeLoraLayer",
    "add_rms_norm_",
    "attention_input",
    "dense_lora_",
    "dense_lora_cols_",
    "dense_lora_plan",
    "dense_lora_align",
    "fused_moe",
    "moe_align",
    "moe_combine",
    "moe_lora_align",
    "moe_lora_expand_",
    "moe_lora_shrink",
    "pad_moe_lora",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "route_topk",
    "store_kv",
    "moe_lora_delta",
]


def moe_lora_delta(
    x: torch.Tensor,  # (T, IN) or (N, IN)
    a: torch.Tensor,  # (R, IN)
    b: torch.Tensor,  # (R, OUT)
    offsets: torch.Tensor,  # (S, E) int32
    ranks: torch.Tensor,  # (S, E) int32
    scales: torch.Tensor,  # (S,) fp32
    topk_ids: torch.Tensor,  # (T, K)
    slot_ids: torch.Tensor,  # (T,)
    y: torch.Tensor,  # (N, >= y_col + OUT), updated in place
    y_col: int = 0,
    rank_bound: int | None = None,
) -> torch.Tensor:
    """Shrink + expand for one projection: y[p, y_col:] += scale[s] * x[row(p)] @ a[o:o+r].T @ b[o:o+r]."""
    rb = int(ranks.max().item()) if rank_bound is None else rank_bound
    if rb == 0:
        return y
    align = None
    if use_triton(x, y):  # share one alignment between shrink and expand
        align = moe_lora_align(topk_ids, slot_ids, offsets.shape[1], offsets.shape[0], lora_block_m(topk_ids.numel()))
    u = moe_lora_shrink(x, a, offsets, ranks, topk_ids, slot_ids, rb, align=align)
    return moe_lora_expand_(y, u, b, offsets, ranks, scales, topk_ids, slot_ids, y_col, align=align)
