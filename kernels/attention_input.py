"""Attention input in one launch: q/k RMSNorm, clip, RoPE and the paged KV store.

Legend: T tokens, QH/KVH query/kv heads (QH % KVH == 0), D head dim (even), P max positions,
NB cache blocks, BS block size.

Semantics, with transformers' rounding points (dt = the model dtype):
    q, k, v = qkv.split([QH*D, KVH*D, KVH*D], -1)           qkv (T, QH*D + 2*KVH*D)
    q = rms_norm(q, q_norm)   q_norm (QH*D,): over the full width, before the head split (OLMoE);
                              q_norm (D,): per head (Qwen3); None: no norm (Mixtral, Qwen2)
    k = rms_norm(k, k_norm)   likewise with (KVH*D,) / (D,) / None
    q, k, v = clamp(., -clip, clip)                          if clip is not None (OLMoE clip_qkv)
    q, k = x * cos[pos] + rotate_half(x) * sin[pos]          per head; cos/sin (P, D) in dt
    k_cache/v_cache at slot_mapping[t] = k[t], v[t]          slot -1: not stored
    returns q (T, QH, D)
The norms couple all of a token's heads, so one program per token does everything (one launch).
"""

from __future__ import annotations

import torch

from kernels._dispatch import check, check_same_device, checked_once, empty, meta, use_triton
from kernels.norm import rms_norm_torch
from kernels.paged_attention import check_cache, store_kv_torch
from kernels.tiles import attn_input_tiles


def _norm_mode(w: torch.Tensor | None, heads: int, d: int) -> int:
    if w is None:
        return 0
    return 1 if w.shape == (heads * d,) else 2


def rotate_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, D), cos/sin (T, 1, D): x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def _norm_torch(x: torch.Tensor, w: torch.Tensor | None, eps: float, heads: int, d: int) -> torch.Tensor:
    if w is None:
        return x
    if w.shape == (heads * d,):
        return rms_norm_torch(x, w, eps)
    return rms_norm_torch(x.reshape(x.shape[0], heads, d), w, eps).reshape(x.shape[0], heads * d)


def attention_input_torch(qkv, q_norm, k_norm, eps, cos, sin, positions, k_cache, v_cache, slot_mapping,
                          num_heads: int, num_kv_heads: int, head_dim: int, clip: float | None = None):
    t = qkv.shape[0]
    qh, kvh, d = num_heads, num_kv_heads, head_dim
    q, k, v = qkv.split([qh * d, kvh * d, kvh * d], dim=-1)
    q = _norm_torch(q, q_norm, eps, qh, d)
    k = _norm_torch(k, k_norm, eps, kvh, d)
    if clip is not None:
        q, k, v = (x.clamp(-clip, clip) for x in (q, k, v))
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (T, 1, D)
    q = rotate_torch(q.reshape(t, qh, d), c, s)
    k = rotate_torch(k.reshape(t, kvh, d), c, s)
    store_kv_torch(k, v.reshape(t, kvh, d), k_cache, v_cache, slot_mapping)
    return q


def _check(qkv, q_norm, k_norm, cos, sin, positions, k_cache, v_cache, slot_mapping, qh, kvh, d) -> None:
    check_cache(k_cache, v_cache)
    check(k_cache.shape[2:] == (kvh, d), f"caches must be (NB, BS, KVH={kvh}, D={d}), got {tuple(k_cache.shape)}")
    check(d % 2 == 0 and qh % kvh == 0, f"need an even head dim and QH % KVH == 0, got D={d}, QH={qh}, KVH={kvh}")
    width = (qh + 2 * kvh) * d
    check(qkv.dim() == 2 and qkv.shape[1] == width and qkv.stride(1) == 1,
          f"qkv must be (T, {width}) with a contiguous last dim, got {tuple(qkv.shape)}")
    t = qkv.shape[0]
    check(qkv.dtype == k_cache.dtype, f"qkv dtype {qkv.dtype} != cache dtype {k_cache.dtype}")
    for name, w, heads in (("q_norm", q_norm, qh), ("k_norm", k_norm, kvh)):
        if w is not None:
            check(w.shape in ((heads * d,), (d,)) and w.dtype == qkv.dtype and w.is_contiguous(),
                  f"{name} must be contiguous ({heads * d},) or ({d},) {qkv.dtype}, got {tuple(w.shape)} {w.dtype}")
    check(cos.dim() == 2 and cos.shape[1] == d and cos.shape == sin.shape and cos.stride() == sin.stride()
          and cos.stride(1) == 1 and cos.dtype == qkv.dtype == sin.dtype,
          f"cos/sin must be (P, D={d}) {qkv.dtype} with contiguous rows, got {tuple(cos.shape)} {cos.dtype}")
    check(positions.shape == (t,) and positions.dtype == torch.int64, "positions must be (T,) int64")
    check(slot_mapping.shape == (t,) and slot_mapping.dtype == torch.int64, "slot_mapping must be (T,) int64")
    check_same_device(qkv=qkv, q_norm=q_norm, k_norm=k_norm, cos=cos, sin=sin, positions=positions,
                      k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)


def attention_input(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                    cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                    head_dim: int, clip: float | None = None) -> torch.Tensor:
    """q (T, QH, D) from qkv (T, QH*D + 2*KVH*D); k and v go to the paged caches (see module)."""
    qh, kvh, d = num_heads, num_kv_heads, head_dim
    checked_once(("attention_input", meta(qkv), meta(q_norm), meta(k_norm), meta(cos), meta(sin), meta(positions),
                  meta(k_cache), meta(v_cache), meta(slot_mapping), qh, kvh, d),
                 lambda: _check(qkv, q_norm, k_norm, cos, sin, positions, k_cache, v_cache, slot_mapping, qh, kvh, d))
    if not use_triton(qkv):
        return attention_input_torch(qkv, q_norm, k_norm, eps, cos, sin, positions, k_cache, v_cache, slot_mapping,
                                     qh, kvh, d, clip)
    from kernels._tl.attn_input import attention_input_kernel

    t = qkv.shape[0]
    q = empty(t, qh, d, dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q
    tiles = attn_input_tiles(qh, kvh, d)
    attention_input_kernel[(t,)](
        qkv, q_norm if q_norm is not None else qkv, k_norm if k_norm is not None else qkv, cos, sin, positions,
        slot_mapping, q, k_cache, v_cache, qh, kvh, d, float(eps), float(clip or 0.0), qkv.stride(0), cos.stride(0),
        Q_NORM=_norm_mode(q_norm, qh, d), K_NORM=_norm_mode(k_norm, kvh, d), CLIP=clip is not None,
        QHP=tiles.QHP, KVHP=tiles.KVHP, HALFP=tiles.HALF, num_warps=tiles.num_warps,
    )
    return q
