"""Routing alignment in one launch (Triton): one program walks the routed pairs three times.

Legend: N routed pairs (N = T*K), T tokens, K top-k, S adapter slots, G groups (E or E*S),
BM block rows, L padded length (a static bound, see kernels/moe_align.py), NB = L // BM.

Why one program: at decode sizes (N in the hundreds) the work is a few microseconds, and the
torch formulation costs about 25 small launches per layer. One CTA also makes the phases
cheap to order: a CTA barrier makes its global writes visible to all its threads.
"""

import triton
import triton.language as tl


@triton.jit
def _group_keys(topk_ids_ptr, slot_ids_ptr, p, N, K: tl.constexpr, S: tl.constexpr, HAS_SLOTS: tl.constexpr):
    """Group key of pairs p (e * S + s, or e) and the mask of pairs that exist and are kept."""
    m = p < N
    key = tl.load(topk_ids_ptr + p, mask=m, other=0).to(tl.int32)
    if HAS_SLOTS:
        s = tl.load(slot_ids_ptr + p // K, mask=m, other=-1)
        m = m & (s >= 0)
        key = key * S + s
    return key, m


@triton.jit
def moe_align_kernel(
    topk_ids_ptr,  # (N,) int32/int64 expert of pair p
    slot_ids_ptr,  # (T,) int32 adapter slot of token t (-1: pair dropped); read if HAS_SLOTS
    counts_ptr,  # (G,) int32 scratch: counts, then group start offsets
    pos_ptr,  # (N,) int32 scratch: rank of a pair inside its group
    sorted_ids_ptr,  # (L,) int32 out, sentinel N
    block_expert_ptr,  # (NB,) int32 out, -1 for unused blocks
    block_slot_ptr,  # (NB,) int32 out (HAS_SLOTS), -1 for unused blocks
    num_blocks_ptr,  # (1,) int32 out
    N,
    G,
    L,
    NB,
    K: tl.constexpr,
    S: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    BM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Semantics: group key g(p) = e(p) * S + s(t(p)) (or e(p) without slots); pairs with
    s < 0 are dropped. Each group's pairs are placed contiguously, groups in ascending key
    order, each group padded with N to a multiple of BM; block b holds one group:
    block_expert[b] = g // S, block_slot[b] = g % S; num_blocks = sum_g ceil(count_g / BM).
    Order inside a group follows atomic arrival (any order is a valid alignment).
    Grid: (1,).
    """
    offs = tl.arange(0, BLOCK)
    # phase 0: clear the scratch counts, fill outputs with their "unused" values
    for i in range(0, G, BLOCK):
        tl.store(counts_ptr + i + offs, tl.zeros((BLOCK,), tl.int32), mask=i + offs < G)
    for i in range(0, L, BLOCK):
        tl.store(sorted_ids_ptr + i + offs, tl.zeros((BLOCK,), tl.int32) + N, mask=i + offs < L)
    for i in range(0, NB, BLOCK):
        m = i + offs < NB
        tl.store(block_expert_ptr + i + offs, tl.zeros((BLOCK,), tl.int32) - 1, mask=m)
        if HAS_SLOTS:
            tl.store(block_slot_ptr + i + offs, tl.zeros((BLOCK,), tl.int32) - 1, mask=m)
    tl.debug_barrier()
    # phase 1: count per group; the value an atomic returns is the pair's rank in its group
    for i in range(0, N, BLOCK):
        p = i + offs
        key, m = _group_keys(topk_ids_ptr, slot_ids_ptr, p, N, K, S, HAS_SLOTS)
        rank = tl.atomic_add(counts_ptr + key, 1, mask=m)
        tl.store(pos_ptr + p, rank, mask=m)
    tl.debug_barrier()
    # phase 2: exclusive scan of the BM-padded counts -> group starts (in place)
    carry = tl.zeros((), tl.int32)
    for i in range(0, G, BLOCK):
        m = i + offs < G
        c = tl.load(counts_ptr + i + offs, mask=m, other=0)
        padded = (c + BM - 1) // BM * BM
        incl = tl.cumsum(padded, 0)
        tl.store(counts_ptr + i + offs, carry + incl - padded, mask=m)
        carry += tl.sum(padded, 0)
    tl.store(num_blocks_ptr, carry // BM)
    tl.debug_barrier()
    # phase 3: scatter pair ids; every used block holds at least one real pair, which labels it
    for i in range(0, N, BLOCK):
        p = i + offs
        key, m = _group_keys(topk_ids_ptr, slot_ids_ptr, p, N, K, S, HAS_SLOTS)
        dest = tl.load(counts_ptr + key, mask=m, other=0) + tl.load(pos_ptr + p, mask=m, other=0)
        tl.store(sorted_ids_ptr + dest, p, mask=m)
        blk = dest // BM
        if HAS_SLOTS:
            tl.store(block_expert_ptr + blk, key // S, mask=m)
            tl.store(block_slot_ptr + blk, key % S, mask=m)
        else:
            tl.store(block_expert_ptr + blk, key, mask=m)
