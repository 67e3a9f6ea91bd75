"""MoE router in one launch: fp32 softmax, top-k, optional renormalisation, model-dtype rounding.

Legend: T tokens, E experts, K top-k.

Semantics (transformers' OLMoE / Qwen-MoE / Mixtral-style routers, with their rounding points):
    p = softmax(logits.float())                (T, E) fp32
    w, ids = topk(p, K)                        descending
    w = w / w.sum(-1)                          if renormalize (norm_topk_prob)
    w = w.to(logits.dtype).float()             if round_weights: rounded to the model dtype (transformers'
                                               OLMoE and Qwen-MoE; Mixtral keeps them fp32)
returns (w (T, K) fp32, ids (T, K) int32). On exact ties the kernel takes the lower expert
index; torch.topk (the twin) leaves the choice among equal values unspecified.
"""

from __future__ import annotations

import torch

from kernels._dispatch import check, checked_once, empty, meta, use_triton
from kernels.tiles import router_tiles

ROUTER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def route_topk_torch(logits: torch.Tensor, top_k: int, renormalize: bool = False,
                     round_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    if round_weights:
        w = w.to(logits.dtype).float()
    return w, ids.to(torch.int32)


def _check(logits: torch.Tensor, top_k: int) -> None:
    check(logits.dim() == 2 and logits.stride(1) == 1,
          f"logits must be (T, E) with a contiguous last dim, got {tuple(logits.shape)}")
    check(logits.dtype in ROUTER_DTYPES, f"unsupported dtype {logits.dtype}")
    check(0 < top_k <= logits.shape[1], f"top_k must be in [1, E={logits.shape[1]}], got {top_k}")


def route_topk(logits: torch.Tensor, top_k: int, renormalize: bool = False,
               round_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, E) router logits -> (weights (T, K) fp32 (rounded to logits.dtype if round_weights),
    ids (T, K) int32), one launch (see module docstring)."""
    checked_once(("route_topk", meta(logits), top_k), lambda: _check(logits, top_k))
    if not use_triton(logits):
        return route_topk_torch(logits, top_k, renormalize, round_weights)
    from kernels._tl.router import route_topk_kernel

    t, e = logits.shape
    w = empty(t, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    if t == 0:
        return w, ids
    tiles = router_tiles(e)
    route_topk_kernel[(-(-t // tiles.BT),)](
        logits, w, ids, t, e, logits.stride(0), K=top_k, KP=max(2, 1 << (top_k - 1).bit_length()),
        RENORM=bool(renormalize), ROUND=bool(round_weights), BT=tiles.BT, EP=tiles.BLOCK, num_warps=tiles.num_warps,
    )
    return w, ids
