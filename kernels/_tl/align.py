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
def _group_keys(topk_ids_ptr, slot_ids_ptr, p, N, K: tl.constexpr, S: tl.constexpr, MODE: tl.constexpr):
    """Group key of pairs p and the mask of pairs that exist and are kept (see MODE)."""
    m = p < N
    key = tl.load(topk_ids_ptr + p, mask=m, other=0).to(tl.int32)
    if MODE == 1:
        s = tl.load(slot_ids_ptr + p // K, mask=m, other=-1)
        m = m & (s >= 0)
        key = key * S + s
    elif MODE == 2:
        s = tl.load(slot_ids_ptr + p // K, mask=m, other=-1)
        key = key * S + s + 1
    return key, m


# N, L, NB follow the step's token count: not specialised (==1, %16), no recompile per batch size
@triton.jit(do_not_specialize=["N", "L", "NB"])
def moe_align_kernel(
    topk_ids_ptr,  # (N,) int32/int64 expert of pair p
    slot_ids_ptr,  # (T,) int32 adapter slot of token t (-1: base model); read in modes 1, 2
    counts_ptr,  # (G,) int32 scratch: counts, then group start offsets
    pos_ptr,  # (N,) int32 scratch: rank of a pair inside its group
    sorted_ids_ptr,  # (L,) int32 out, sentinel N
    block_expert_ptr,  # (NB,) int32 out, -1 for unused blocks
    block_slot_ptr,  # (NB,) int32 out (MODE 1), -1 for unused blocks
    num_blocks_ptr,  # (1,) int32 out
    N,
    G,
    L,
    NB,
    K: tl.constexpr,
    S: tl.constexpr,
    MODE: tl.constexpr,
    BM: tl.constexpr,
    BLOCK: tl.constexpr,
    EB: tl.constexpr,
    SP: tl.constexpr,
):
    """Semantics, by MODE (e = expert, s = adapter slot of the pair's token):
      0: groups are experts (G = E), every pair kept; each group padded with N to a multiple
         of BM; block_expert[b] = the block's expert.
      1: groups are (e, s) with key e * S + s (G = E * S); pairs with s < 0 dropped; each group
         padded to BM; block_expert[b] = g // S, block_slot[b] = g % S.
      2: key e * S + s + 1 (S = slots + 1, base pairs s = -1 first), every pair kept; pairs sorted
         by key, padded per expert (not per key) to BM: the by-expert layout of mode 0 with each
         expert's pairs ordered by slot, so blocks may mix slots; block_expert[b] = g // S.
    Groups in ascending key order; num_blocks = the used blocks. Order inside a group follows
    atomic arrival (any order is a valid alignment). EB x SP: the (experts, slots) tile of
    mode 2's scan (SP >= S). Grid: (1,).
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
        if MODE == 1:
            tl.store(block_slot_ptr + i + offs, tl.zeros((BLOCK,), tl.int32) - 1, mask=m)
    tl.debug_barrier()
    # phase 1: count per group; the value an atomic returns is the pair's rank in its group
    for i in range(0, N, BLOCK):
        p = i + offs
        key, m = _group_keys(topk_ids_ptr, slot_ids_ptr, p, N, K, S, MODE)
        rank = tl.atomic_add(counts_ptr + key, 1, mask=m)
        tl.store(pos_ptr + p, rank, mask=m)
    tl.debug_barrier()
    # phase 2: exclusive scan of the BM-padded counts -> group starts (in place)
    carry = tl.zeros((), tl.int32)
    if MODE == 2:  # padded per expert: an expert's start, then its slots' counts back to back
        for e0 in range(0, G // S, EB):
            er = e0 + tl.arange(0, EB)[:, None]
            sc = tl.arange(0, SP)[None, :]
            mm = (er < G // S) & (sc < S)
            c = tl.load(counts_ptr + er * S + sc, mask=mm, other=0)
            padded = (tl.sum(c, axis=1) + BM - 1) // BM * BM
            estart = carry + tl.cumsum(padded, 0) - padded
            tl.store(counts_ptr + er * S + sc, estart[:, None] + tl.cumsum(c, axis=1) - c, mask=mm)
            carry += tl.sum(padded, 0)
    else:
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
        key, m = _group_keys(topk_ids_ptr, slot_ids_ptr, p, N, K, S, MODE)
        dest = tl.load(counts_ptr + key, mask=m, other=0) + tl.load(pos_ptr + p, mask=m, other=0)
        tl.store(sorted_ids_ptr + dest, p, mask=m)
        blk = dest // BM
        if MODE == 1:
            tl.store(block_expert_ptr + blk, key // S, mask=m)
            tl.store(block_slot_ptr + blk, key % S, mask=m)
        elif MODE == 2:
            tl.store(block_expert_ptr + blk, key // S, mask=m)
        else:
            tl.store(block_expert_ptr + blk, key, mask=m)
