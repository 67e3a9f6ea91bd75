"""Paged KV cache: store new keys/values and single-query (decode) attention.

Legend: T tokens, B sequences, QH query heads, KVH kv heads (QH % KVH == 0), D head dim,
NB cache blocks, BS block size, MAXB max blocks per sequence.

store_kv:  k_cache[slot // BS, slot % BS] = k[t] for slot = slot_mapping[t] >= 0 (same for v).
paged_decode_attention: out[b, h] = softmax(scale * q[b, h] . K_b^T) V_b over positions
    [0, context_lens[b]) read through block_tables[b]; kv head = h // (QH // KVH); fp32 softmax.
paged_prefill_attention: causal attention of C prefill chunks (varlen, C = chunks; rows
    [cu_q[c], cu_q[c+1]) of q) over their cached prefix and themselves, in one launch.

Decode on Triton (G = QH // KVH, S splits): one program per (sequence, kv head, split) handles
the kv head's G query heads together (GQA grouping: each K/V block is read once per kv head, not
G times; G = 1, OLMoE, keeps the previous vector-only path; G > 1 runs the heads as the rows of
tl.dot tiles, padded to 16). When B x KVH programs are too few to fill the GPU (small batch,
long block tables), each sequence's context is split over S programs
(flash-decoding): each takes its share of the sequence's blocks (computed in-kernel from the
context length) and writes a partial (max, sum, acc) in fp32, then a reduce kernel (grid (B, QH))
combines them. S = kernels.tiles.decode_splits(B, KVH, MAXB, device): static values only, so a
CUDA graph captured per padded batch size holds the launches of every step it replays; S = 1
is the single unsplit launch. `num_splits=` (or DRLORA_DECODE_SPLITS) forces S (tests), capped
at MAXB. The scratch partials (B, QH, S, D + 2) fp32 are allocated per call (in a captured graph:
from its memory pool).
"""

from __future__ import annotations

import os

import torch

from kernels._dispatch import check, check_same_device, checked_once, dot_precision, empty, interp_upcast, meta, use_triton
from kernels.tiles import decode_splits, prefill_attention_tiles

SPLITS_ENV = "DRLORA_DECODE_SPLITS"  # force the decode split count S (tests; capped at MAXB)


def _p2(n: int) -> int:
    return max(1, 1 << (n - 1).bit_length())


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape, f"caches must be (NB, BS, KVH, D), got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    check(k_cache.dtype == v_cache.dtype, "k_cache and v_cache dtypes differ")
    check(k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous")


def store_kv_torch(k, v, k_cache, v_cache, slot_mapping) -> None:
    nb, bs, kvh, d = k_cache.shape
    keep = slot_mapping >= 0
    idx = slot_mapping[keep]
    k_cache.view(nb * bs, kvh, d)[idx] = k[keep]
    v_cache.view(nb * bs, kvh, d)[idx] = v[keep]


def _check_store(k, v, k_cache, v_cache, slot_mapping) -> None:
    check_cache(k_cache, v_cache)
    _, _, kvh, d = k_cache.shape
    check(k.dim() == 3 and k.shape == v.shape and k.shape[1:] == (kvh, d), f"k, v must be (T, {kvh}, {d}), got {tuple(k.shape)}, {tuple(v.shape)}")
    check(slot_mapping.shape == (k.shape[0],) and slot_mapping.dtype == torch.int64, "slot_mapping must be (T,) int64")
    check(k.dtype == k_cache.dtype and v.dtype == v_cache.dtype, f"k/v dtype {k.dtype} != cache dtype {k_cache.dtype}")
    check(k.stride(2) == 1 and v.stride(2) == 1, "k and v must have a contiguous last dim")
    check_same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Write k, v (T, KVH, D) into the paged caches at slot_mapping (T,) int64 (-1 = skip)."""
    checked_once(("store_kv", *map(meta, (k, v, k_cache, v_cache, slot_mapping))),
                 lambda: _check_store(k, v, k_cache, v_cache, slot_mapping))
    _, _, kvh, d = k_cache.shape
    if k.shape[0] == 0:
        return
    if not use_triton(k):
        store_kv_torch(k, v, k_cache, v_cache, slot_mapping)
        return
    from kernels._tl.attention import store_kv_kernel

    store_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping, kvh, d,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), HP=_p2(kvh), DP=_p2(d),
    )


def paged_decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale):
    b, qh, d = q.shape
    nb, bs, kvh, _ = k_cache.shape
    maxb = block_tables.shape[1]
    tables = block_tables.long().clamp(0, nb - 1)
    k = k_cache[tables].view(b, maxb * bs, kvh, d)
    v = v_cache[tables].view(b, maxb * bs, kvh, d)
    heads = torch.arange(qh, device=q.device) // (qh // kvh)
    k = k[:, :, heads].float()  # (B, L, QH, D)
    v = v[:, :, heads].float()
    s = torch.einsum("bhd,blhd->bhl", q.float(), k) * scale
    valid = torch.arange(maxb * bs, device=q.device)[None, :] < context_lens.long()[:, None]  # (B, L)
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhl,blhd->bhd", p, v).to(q.dtype)


def _check_paged(q, k_cache, v_cache, block_tables, q_rows: str, tables: int | None) -> tuple[int, int, int, int]:
    """Checks decode and prefill attention share: caches, q (q_rows, QH, D) and block tables with
    `tables` rows (None: one per q row). Returns (BS, KVH, D, QH)."""
    check_cache(k_cache, v_cache)
    _, bs, kvh, d = k_cache.shape
    check(q.dim() == 3 and q.shape[2] == d, f"q must be ({q_rows}, QH, D={d}), got {tuple(q.shape)}")
    qh = q.shape[1]
    check(qh % kvh == 0, f"QH={qh} must be a multiple of KVH={kvh}")
    check(q.dtype == k_cache.dtype, f"q dtype {q.dtype} != cache dtype {k_cache.dtype}")
    check(q.stride(2) == 1, "q must have a contiguous last dim")
    n = q.shape[0] if tables is None else tables
    check(block_tables.dim() == 2 and block_tables.shape[0] == n and block_tables.dtype == torch.int32
          and block_tables.is_contiguous(), f"block_tables must be contiguous ({n}, MAXB) int32")
    return bs, kvh, d, qh


def _check_decode(q, k_cache, v_cache, block_tables, context_lens, out) -> None:
    _check_paged(q, k_cache, v_cache, block_tables, "B", None)
    b = q.shape[0]
    check(context_lens.shape == (b,) and context_lens.dtype == torch.int32, "context_lens must be (B,) int32")
    if out is not None:
        check(out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1, "out must be like q")
    check_same_device(q=q, k_cache=k_cache, block_tables=block_tables, context_lens=context_lens, out=out)


def decode_split_count(batch: int, kv_heads: int, max_blocks: int, device: torch.device,
                       num_splits: int | None = None) -> int:
    """S for a decode launch: num_splits, else DRLORA_DECODE_SPLITS, else the heuristic
    (kernels.tiles.decode_splits); at least 1, at most max(MAXB, 1)."""
    if num_splits is None:
        forced = os.environ.get(SPLITS_ENV, "").strip()
        num_splits = int(forced) if forced else decode_splits(batch, kv_heads, max_blocks, device)
    return max(1, min(int(num_splits), max(max_blocks, 1)))


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                           out: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Semantics: out[b, h] = softmax(scale * q[b, h] . K_b^T) V_b over the first context_lens[b]
    cached positions of sequence b (read through block_tables[b]), kv head h // (QH // KVH);
    fp32 softmax; an empty context gives zeros.

    q (B, QH, D) -> (B, QH, D); block_tables (B, MAXB) int32, context_lens (B,) int32.
    out (B, QH, D) like q (a view into a larger buffer is fine): written in place and returned.
    num_splits: force the split-KV count S (None: DRLORA_DECODE_SPLITS, else the heuristic; see
    the module docstring); the Triton path only, the result does not depend on it."""
    checked_once(("paged_decode_attention", *map(meta, (q, k_cache, v_cache, block_tables, context_lens, out))),
                 lambda: _check_decode(q, k_cache, v_cache, block_tables, context_lens, out))
    b, qh, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    if not use_triton(q):
        res = paged_decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale)
        return res if out is None else out.copy_(res)
    from kernels._tl.attention import paged_decode_kernel, paged_decode_reduce_kernel

    out = out if out is not None else empty(*q.shape, dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    maxb = block_tables.shape[1]
    s = decode_split_count(b, kvh, maxb, q.device, num_splits)
    g = qh // kvh
    lo = 1 if g == 1 else 16  # G > 1: tl.dot tiles (every dim >= 16)
    gp, bsp, dp = (1 if g == 1 else max(lo, _p2(g))), max(lo, _p2(bs)), max(lo, _p2(d))
    if s == 1:
        part_m = part_l = part_acc = out  # not read nor written (SPLIT=False)
    else:
        n = b * qh * s
        n16 = -(-n // 4) * 4  # each part starts 16-byte aligned (pointer specialisation stays alike)
        part = empty(2 * n16 + n * d, dtype=torch.float32, device=q.device)
        part_m, part_l, part_acc = part[:n], part[n16:n16 + n], part[2 * n16:]
    paged_decode_kernel[(b, kvh, s)](
        q, k_cache, v_cache, out, block_tables, context_lens, part_m, part_l, part_acc, float(scale),
        qh, kvh, d, maxb, s, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        G=g, GP=gp, BS=bs, BSP=bsp, DP=dp, SPLIT=s > 1, PRECISION=dot_precision(q.dtype),
        UPCAST=interp_upcast(q.dtype), num_warps=4,
    )
    if s > 1:
        paged_decode_reduce_kernel[(b, qh)](
            part_m, part_l, part_acc, out, qh, d, s, out.stride(0), out.stride(1), SP=_p2(s), DP=dp, num_warps=4,
        )
    return out


def paged_prefill_attention_torch(q, k_cache, v_cache, block_tables, cu_q, context_lens, max_q_len, scale, out):
    """Per chunk: gather its keys from the cache, then SDPA (causal, offset by the prefix)."""
    import torch.nn.functional as F

    _, bs, kvh, d = k_cache.shape
    qh = q.shape[1]
    starts, lens = cu_q.tolist(), context_lens.tolist()
    for c, n in enumerate(lens):
        r0, r1 = starts[c], starts[c + 1]
        if r1 == r0:
            continue
        blocks = block_tables[c, : -(-n // bs)].long()
        k = k_cache[blocks].reshape(-1, kvh, d)[:n]  # (L, KVH, D)
        v = v_cache[blocks].reshape(-1, kvh, d)[:n]
        if kvh != qh:
            k, v = k.repeat_interleave(qh // kvh, 1), v.repeat_interleave(qh // kvh, 1)
        qs = q[r0:r1].transpose(0, 1)  # (QH, Lq, D)
        if n == r1 - r0:  # no cached prefix: plain causal
            o = F.scaled_dot_product_attention(qs, k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale)
        else:
            qpos = torch.arange(n - (r1 - r0), n, device=q.device)
            mask = torch.arange(n, device=q.device)[None, :] <= qpos[:, None]  # (Lq, L)
            o = F.scaled_dot_product_attention(qs, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
        out[r0:r1] = o.transpose(0, 1)
    return out


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_q, context_lens, max_q_len: int, scale: float,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """q (T, QH, D); block_tables (C, MAXB) int32; cu_q (C+1,) int32 (rows of chunk c:
    [cu_q[c], cu_q[c+1]), ascending); context_lens (C,) int32 (cached prefix + chunk, >= chunk);
    max_q_len >= every chunk's length. Writes the chunks' rows of out (T, QH, D) and returns it;
    other rows are left as they are."""
    c = context_lens.shape[0]

    def run_check():
        _check_paged(q, k_cache, v_cache, block_tables, "T", c)
        check(cu_q.shape == (c + 1,) and cu_q.dtype == torch.int32, f"cu_q must be (C+1={c + 1},) int32")
        check(context_lens.dtype == torch.int32, "context_lens must be int32")
        if out is not None:
            check(out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1, "out must be like q")
        check_same_device(q=q, k_cache=k_cache, block_tables=block_tables, cu_q=cu_q, context_lens=context_lens,
                          out=out)

    checked_once(("paged_prefill_attention", *map(meta, (q, k_cache, v_cache, block_tables, cu_q, context_lens, out))),
                 run_check)
    t, qh, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    if out is None:
        out = empty(t, qh, d, dtype=q.dtype, device=q.device)
    if c == 0 or max_q_len == 0:
        return out
    if not use_triton(q):
        return paged_prefill_attention_torch(q, k_cache, v_cache, block_tables, cu_q, context_lens, max_q_len,
                                             scale, out)
    from kernels._tl.attention import paged_prefill_kernel

    tiles = prefill_attention_tiles(max_q_len, d)
    paged_prefill_kernel[(c, -(-max_q_len // tiles.BM), qh)](
        q, k_cache, v_cache, out, block_tables, cu_q, context_lens, float(scale), kvh, d, block_tables.shape[1],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        G=qh // kvh, BS=bs, DP=max(16, _p2(d)), PRECISION=dot_precision(q.dtype), UPCAST=interp_upcast(q.dtype),
        BM=tiles.BM, BN=tiles.BN, num_warps=tiles.num_warps,
    )
    return out
