"""Routing alignment invariants (pure torch, runs on every device)."""

import pytest
import torch

from kernels.moe_align import dense_lora_align, moe_align, moe_align_torch, moe_lora_align, moe_lora_align_torch


def _check(al, keys, valid, num_groups, bm):
    n = keys.numel()
    sid = al.sorted_ids.cpu()
    nb = int(al.num_blocks)
    assert sid.numel() % bm == 0 and al.max_blocks * bm == sid.numel()
    assert nb <= al.max_blocks
    real = sid[sid < n]
    expected = torch.nonzero(valid).squeeze(1) if valid is not None else torch.arange(n)
    assert sorted(real.tolist()) == expected.tolist(), "every valid pair exactly once"
    assert (sid[nb * bm :] == n).all(), "tail is all sentinel"
    prev = -1
    for blk in range(al.max_blocks):
        ids = sid[blk * bm : (blk + 1) * bm]
        if blk >= nb:
            assert int(al.block_expert[blk]) == -1
            continue
        got = ids[ids < n]
        assert got.numel() > 0, "used blocks are never empty"
        g = keys[got.long()]
        assert (g == g[0]).all(), "one group per block"
        # padding only at the end of a group's last block
        assert (ids[: got.numel()] < n).all()
        assert int(g[0]) >= prev, "groups in ascending key order"
        prev = int(g[0])
        yield blk, int(g[0]), got


@pytest.mark.parametrize("T,K,E,bm", [(1, 1, 4, 16), (1, 2, 6, 4), (7, 2, 5, 4), (12, 3, 6, 16), (40, 2, 3, 8)])
def test_moe_align(T, K, E, bm, device):
    ids = torch.randint(0, E, (T, K), dtype=torch.int32, device=device)
    al = moe_align(ids, E, bm)
    keys = ids.reshape(-1).long().cpu()
    counts = torch.bincount(keys, minlength=E)
    assert int(al.num_blocks) == int(((counts + bm - 1) // bm).sum())
    for blk, g, got in _check(al, keys, None, E, bm):
        assert int(al.block_expert[blk]) == g
        assert got.tolist() == sorted(got.tolist()), "stable order inside a group"


@pytest.mark.parametrize("T,K,E,S,bm", [(1, 2, 4, 3, 4), (9, 2, 5, 3, 4), (12, 3, 6, 2, 16)])
def test_moe_lora_align(T, K, E, S, bm, device):
    ids = torch.randint(0, E, (T, K), dtype=torch.int32, device=device)
    slots = torch.randint(-1, S, (T,), dtype=torch.int32, device=device)
    al = moe_lora_align(ids, slots, E, S, bm)
    s = slots.long().cpu().repeat_interleave(K)
    valid = s >= 0
    keys = ids.reshape(-1).long().cpu() * S + s.clamp(min=0)
    for blk, g, _ in _check(al, keys, valid, E * S, bm):
        assert int(al.block_expert[blk]) == g // S and int(al.block_slot[blk]) == g % S


def test_dense_align_all_base(device):
    al = dense_lora_align(torch.full((5,), -1, dtype=torch.int32, device=device), 3, 16)
    assert int(al.num_blocks) == 0 and (al.sorted_ids == 5).all()


def _same_layout(al, tw):
    """Block tables equal the twin's; pair order inside a group may differ (atomics)."""
    assert int(al.num_blocks) == int(tw.num_blocks) and al.max_blocks == tw.max_blocks
    assert al.block_expert.cpu().tolist() == tw.block_expert.tolist()
    if tw.block_slot is not None:
        assert al.block_slot.cpu().tolist() == tw.block_slot.tolist()
    bm, sid, tsid = al.block_m, al.sorted_ids.cpu(), tw.sorted_ids
    b = 0
    while b < al.max_blocks and int(tw.block_expert[b]) >= 0:  # compare each group's pair set
        e = b
        while e < al.max_blocks and tw.block_expert[e] == tw.block_expert[b] and (
            tw.block_slot is None or tw.block_slot[e] == tw.block_slot[b]
        ):
            e += 1
        assert sorted(sid[b * bm : e * bm].tolist()) == sorted(tsid[b * bm : e * bm].tolist())
        b = e


@pytest.mark.parametrize("T,K,E,bm", [(1, 1, 4, 16), (1, 2, 6, 4), (7, 2, 5, 4), (40, 2, 3, 8), (300, 8, 64, 16)])
def test_moe_align_triton(T, K, E, bm, triton_on):
    ids = torch.randint(0, E, (T, K), dtype=torch.int32, device=triton_on)
    ids[0, 0] = E - 1
    al = moe_align(ids, E, bm)
    keys = ids.reshape(-1).long().cpu()
    for blk, g, _ in _check(al, keys, None, E, bm):
        assert int(al.block_expert[blk]) == g
    _same_layout(al, moe_align_torch(ids.cpu(), E, bm))


@pytest.mark.parametrize("T,K,E,S,bm", [(1, 2, 4, 3, 4), (9, 2, 5, 3, 4), (12, 3, 6, 2, 16), (64, 8, 64, 16, 16)])
def test_moe_lora_align_triton(T, K, E, S, bm, triton_on):
    ids = torch.randint(0, E, (T, K), dtype=torch.int64, device=triton_on)  # int64 ids too
    slots = torch.randint(-1, S, (T,), dtype=torch.int32, device=triton_on)
    al = moe_lora_align(ids, slots, E, S, bm)
    s = slots.long().cpu().repeat_interleave(K)
    keys = ids.reshape(-1).long().cpu() * S + s.clamp(min=0)
    for blk, g, _ in _check(al, keys, s >= 0, E * S, bm):
        assert int(al.block_expert[blk]) == g // S and int(al.block_slot[blk]) == g % S
    _same_layout(al, moe_lora_align_torch(ids.cpu(), slots.cpu(), E, S, bm))


def test_dense_align_all_base_triton(triton_on):
    al = dense_lora_align(torch.full((5,), -1, dtype=torch.int32, device=triton_on), 3, 16)
    assert int(al.num_blocks) == 0 and (al.sorted_ids.cpu() == 5).all() and (al.block_slot.cpu() == -1).all()


def _check_slot_sorted(al, ids, slots, E, bm):
    """The slot-sorted by-expert layout: the blocks of moe_align (padding per expert), each
    expert's pairs ordered by slot (base pairs first). Returns the slot of every position."""
    K = ids.shape[1]
    e = ids.reshape(-1).long().cpu()
    s = slots.long().cpu().repeat_interleave(K)
    n = e.numel()
    counts = torch.bincount(e, minlength=E)
    assert int(al.num_blocks) == int(((counts + bm - 1) // bm).sum()), "padding per expert, not per slot"
    for _ in _check(al, e, None, E, bm):  # blocks hold one expert, ascending, every pair once
        pass
    sid = al.sorted_ids.cpu()
    pos_slot = torch.where(sid < n, s[sid.clamp(max=n - 1)], -2)
    for ex in range(E):
        blocks = (al.block_expert.cpu() == ex).nonzero().squeeze(1)
        if blocks.numel() == 0:
            continue
        rows = torch.cat([sid[b * bm:(b + 1) * bm] for b in blocks.tolist()])
        real = rows[rows < n]
        assert (rows[: real.numel()] < n).all(), "an expert's padding is at its end only"
        assert (e[real] == ex).all()
        assert s[real].tolist() == sorted(s[real].tolist()), "pairs ordered by slot inside an expert"
    return pos_slot


@pytest.mark.parametrize("T,K,E,S,bm", [(1, 2, 4, 3, 4), (9, 2, 5, 3, 4), (30, 3, 4, 2, 8), (64, 8, 64, 16, 16)])
def test_moe_align_slot_sorted(T, K, E, S, bm, device):
    from kernels.moe_align import moe_align_slots_torch

    ids = torch.randint(0, E, (T, K), dtype=torch.int32, device=device)
    slots = torch.randint(-1, S, (T,), dtype=torch.int32, device=device)
    al = moe_align(ids, E, bm, slots, S)
    _check_slot_sorted(al, ids, slots, E, bm)
    tw = moe_align_slots_torch(ids.cpu(), slots.cpu(), E, S, bm)
    assert tw.block_expert.tolist() == moe_align(ids.cpu(), E, bm).block_expert.tolist(), "same blocks as by expert"


@pytest.mark.parametrize("T,K,E,S,bm", [(1, 2, 4, 3, 4), (9, 2, 5, 3, 4), (30, 3, 4, 2, 8), (64, 8, 64, 16, 16),
                                        (20, 2, 3, 40, 16)])  # more slots than one scan tile row
def test_moe_align_slot_sorted_triton(T, K, E, S, bm, triton_on):
    from kernels.moe_align import moe_align_slots_torch

    ids = torch.randint(0, E, (T, K), dtype=torch.int64, device=triton_on)
    slots = torch.randint(-1, S, (T,), dtype=torch.int32, device=triton_on)
    slots[0] = S - 1
    al = moe_align(ids, E, bm, slots, S)
    got = _check_slot_sorted(al, ids, slots, E, bm)
    tw = moe_align_slots_torch(ids.cpu(), slots.cpu(), E, S, bm)
    assert al.block_expert.cpu().tolist() == tw.block_expert.tolist()
    assert got.tolist() == _check_slot_sorted(tw, ids.cpu(), slots.cpu(), E, bm).tolist(), "same slot per position"
