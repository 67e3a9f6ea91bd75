"""Paged KV store and decode attention: twin vs loop, Triton vs twin."""

import math

import pytest
import torch

from kernels import paged_decode_attention, store_kv
from kernels.paged_attention import paged_decode_attention_torch, store_kv_torch
from kt_helpers import assert_close


def _setup(B, QH, KVH, D, BS, NB, dtype, device, max_ctx=19):
    lens = torch.randint(0, max_ctx + 1, (B,), dtype=torch.int32)
    lens[0] = max(1, int(lens[0]))
    maxb = -(-max_ctx // BS)
    perm = torch.randperm(NB)[: B * maxb].view(B, maxb).to(torch.int32)  # scattered blocks
    q = torch.randn(B, QH, D).to(dtype)
    kc = torch.randn(NB, BS, KVH, D).to(dtype)
    vc = torch.randn(NB, BS, KVH, D).to(dtype)
    return [t.to(device) for t in (q, kc, vc, perm, lens)]


def _loop_attention(q, kc, vc, tables, lens, scale):
    B, QH, D = q.shape
    _, BS, KVH, _ = kc.shape
    out = torch.zeros(B, QH, D)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        pos = torch.arange(n)
        blocks = tables[b].long()[pos // BS]
        for h in range(QH):
            kv = h // (QH // KVH)
            k = kc[blocks, pos % BS, kv].float()
            v = vc[blocks, pos % BS, kv].float()
            p = torch.softmax(k @ q[b, h].float() * scale, 0)
            out[b, h] = p @ v
    return out


@pytest.mark.parametrize("B,QH,KVH,D,BS", [(1, 2, 1, 16, 4), (3, 4, 2, 24, 8), (4, 6, 3, 32, 16)])
def test_twin_vs_loop(B, QH, KVH, D, BS):
    q, kc, vc, tables, lens = _setup(B, QH, KVH, D, BS, 3 * B * 5, torch.float32, "cpu")
    scale = 1 / math.sqrt(D)
    ref = _loop_attention(q, kc, vc, tables, lens, scale)
    torch.testing.assert_close(paged_decode_attention_torch(q, kc, vc, tables, lens, scale), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,QH,KVH,D,BS", [(1, 2, 1, 16, 4), (3, 8, 2, 24, 8), (4, 6, 6, 32, 16)])
def test_decode_triton_vs_twin(B, QH, KVH, D, BS, dtype, triton_on):
    q, kc, vc, tables, lens = _setup(B, QH, KVH, D, BS, 3 * B * 5, dtype, triton_on)
    lens[-1] = 0 if B > 1 else lens[-1]  # empty context -> zeros
    out = paged_decode_attention(q, kc, vc, tables, lens, 0.3)
    ref = paged_decode_attention_torch(*[t.cpu() for t in (q, kc, vc, tables, lens)], 0.3)
    assert_close(out, ref, dtype)


# ragged contexts over BS = 4, MAXB = 10: one token, empty, under a block, exactly a block, a block
# and one, several blocks, the whole table (with S = 8 most of these are shorter than the split count)
GQA_LENS = [1, 0, 3, 4, 5, 13, 40, 37]
GQA_HEADS = [(4, 4), (4, 2), (6, 2), (8, 2), (12, 2), (16, 2)]  # G = 1, 2, 3, 4, 6, 8


def _gqa_setup(QH, KVH, dtype, device, lens=GQA_LENS, D=24, BS=4, MAXB=10):
    B = len(lens)
    NB = B * MAXB + 3
    tables = torch.randperm(NB)[: B * MAXB].view(B, MAXB).to(torch.int32)
    q = torch.randn(B, QH, D).to(dtype)
    kc = torch.randn(NB, BS, KVH, D).to(dtype)
    vc = torch.randn(NB, BS, KVH, D).to(dtype)
    return [t.to(device) for t in (q, kc, vc, tables, torch.tensor(lens, dtype=torch.int32))]


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
@pytest.mark.parametrize("QH,KVH", GQA_HEADS)
def test_decode_gqa_split_vs_twin(QH, KVH, splits, triton_on):
    """Grouped heads (G = QH // KVH, padded to a power of two) and split-KV (S forced) against the
    twin on ragged contexts; DRLORA_POISON leaves NaN in any partial a split failed to write."""
    q, kc, vc, tables, lens = _gqa_setup(QH, KVH, torch.float32, triton_on)
    out = paged_decode_attention(q, kc, vc, tables, lens, 0.3, num_splits=splits)
    ref = paged_decode_attention_torch(*[t.cpu() for t in (q, kc, vc, tables, lens)], 0.3)
    assert_close(out, ref, torch.float32)
    assert (out[1] == 0).all(), "empty context -> zeros"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("QH,KVH,splits", [(4, 4, 4), (8, 2, 1), (12, 2, 3), (16, 2, 16)])
def test_decode_gqa_split_dtypes(QH, KVH, splits, dtype, triton_on):
    q, kc, vc, tables, lens = _gqa_setup(QH, KVH, dtype, triton_on)
    sentinel = torch.full((len(GQA_LENS), QH + 2, q.shape[2]), 7.0, dtype=dtype, device=q.device)
    out = paged_decode_attention(q, kc, vc, tables, lens, 0.3, out=sentinel[:, 1:QH + 1], num_splits=splits)
    ref = paged_decode_attention_torch(*[t.cpu() for t in (q, kc, vc, tables, lens)], 0.3)
    assert_close(out, ref, dtype)
    assert (sentinel[:, 0] == 7).all() and (sentinel[:, -1] == 7).all(), "only the out view is written"


def test_decode_all_empty_split(triton_on):
    q, kc, vc, tables, lens = _gqa_setup(8, 2, torch.float32, triton_on, lens=[0, 0, 0])
    out = paged_decode_attention(q, kc, vc, tables, lens, 0.3, num_splits=4)
    assert (out == 0).all()


def test_decode_split_env(triton_on, monkeypatch):
    """DRLORA_DECODE_SPLITS forces S (capped at MAXB); the result does not change."""
    from kernels.paged_attention import decode_split_count

    monkeypatch.setenv("DRLORA_DECODE_SPLITS", "5")
    assert decode_split_count(64, 16, 256, torch.device("cpu")) == 5
    assert decode_split_count(1, 4, 3, torch.device("cpu")) == 3
    assert decode_split_count(1, 4, 256, torch.device("cpu"), num_splits=2) == 2
    q, kc, vc, tables, lens = _gqa_setup(6, 2, torch.float32, triton_on)
    out = paged_decode_attention(q, kc, vc, tables, lens, 0.3)
    assert_close(out, paged_decode_attention_torch(*[t.cpu() for t in (q, kc, vc, tables, lens)], 0.3), torch.float32)


def test_decode_split_heuristic():
    """S from static values: 1 once B x KVH gives ~2 programs per SM (132 SMs off CUDA) or the
    table is short; else enough for ~2 waves, capped; never more than MAXB // 4."""
    from kernels.tiles import DECODE_MAX_SPLITS, decode_splits

    cpu = torch.device("cpu")
    assert decode_splits(64, 16, 256, cpu) == 1  # OLMoE batch 64: 1024 programs
    assert decode_splits(256, 4, 256, cpu) == 1  # Qwen3-30B-A3B batch 256
    assert decode_splits(1, 16, 256, cpu) == DECODE_MAX_SPLITS  # OLMoE batch 1, 4096 tokens
    assert decode_splits(1, 4, 256, cpu) == DECODE_MAX_SPLITS  # Qwen3 batch 1
    assert decode_splits(16, 4, 256, cpu) == 5  # 64 programs -> 5 splits (320 >= 264)
    assert decode_splits(1, 16, 32, cpu) == 8  # 512 tokens: at least 4 blocks per split
    assert decode_splits(8, 4, 2, cpu) == 1  # two blocks: no split
    for b in (1, 2, 4, 8, 16, 32, 64):
        assert 1 <= decode_splits(b, 4, 256, cpu) <= DECODE_MAX_SPLITS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv(dtype, device, monkeypatch):
    T, KVH, D, NB, BS = 7, 2, 24, 4, 4
    qkv = torch.randn(T, 3 * KVH, D).to(dtype).to(device)
    k, v = qkv[:, :KVH], qkv[:, KVH : 2 * KVH]  # strided views, as after a qkv split
    slots = torch.randperm(NB * BS)[:T].to(device)
    slots[2] = -1
    kc0 = torch.randn(NB, BS, KVH, D).to(dtype).to(device)
    vc0 = torch.randn(NB, BS, KVH, D).to(dtype).to(device)
    kr, vr = kc0.cpu().clone(), vc0.cpu().clone()
    for t in range(T):
        if int(slots[t]) >= 0:
            kr[int(slots[t]) // BS, int(slots[t]) % BS] = k[t].cpu()
            vr[int(slots[t]) // BS, int(slots[t]) % BS] = v[t].cpu()
    kt, vt = kc0.cpu().clone(), vc0.cpu().clone()
    store_kv_torch(k.cpu(), v.cpu(), kt, vt, slots.cpu())
    assert torch.equal(kt, kr) and torch.equal(vt, vr)
    if device.type == "cpu":
        pytest.importorskip("triton")
        if __import__("os").environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs TRITON_INTERPRET=1")
        monkeypatch.setenv("DRLORA_FORCE_TRITON", "1")
    kc, vc = kc0.clone(), vc0.clone()
    store_kv(k, v, kc, vc, slots)
    assert torch.equal(kc.cpu(), kr) and torch.equal(vc.cpu(), vr)


def test_errors():
    kc = torch.zeros(2, 4, 2, 16)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(torch.zeros(1, 3, 16), kc, kc, torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="int64"):
        store_kv(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), kc, kc.clone(), torch.zeros(1, dtype=torch.int32))


def _prefill_setup(chunks, QH, KVH, D, BS, dtype, device, decode_rows=2):
    """chunks: [(prefix, length)]. Rows: decode_rows untouched rows, then the chunks back to back."""
    C = len(chunks)
    maxb = max(-(-(p + n) // BS) for p, n in chunks)
    NB = C * maxb + 3
    tables = torch.randperm(NB)[: C * maxb].view(C, maxb).to(torch.int32)
    kc = torch.randn(NB, BS, KVH, D).to(dtype)
    vc = torch.randn(NB, BS, KVH, D).to(dtype)
    cu = [decode_rows]
    for _, n in chunks:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], QH, D).to(dtype)
    ctx = torch.tensor([p + n for p, n in chunks], dtype=torch.int32)
    cu_q = torch.tensor(cu, dtype=torch.int32)
    return [t.to(device) for t in (q, kc, vc, tables, cu_q, ctx)], max(n for _, n in chunks)


def _loop_prefill(q, kc, vc, tables, cu_q, ctx, scale):
    _, BS, KVH, D = kc.shape
    QH = q.shape[1]
    out = torch.zeros(q.shape)
    for c in range(ctx.shape[0]):
        n, r0, r1 = int(ctx[c]), int(cu_q[c]), int(cu_q[c + 1])
        for i, row in enumerate(range(r0, r1)):
            pos = torch.arange(n - (r1 - r0) + i + 1)  # causal: keys up to the query's position
            blocks = tables[c].long()[pos // BS]
            for h in range(QH):
                kv = h // (QH // KVH)
                k, v = kc[blocks, pos % BS, kv].float(), vc[blocks, pos % BS, kv].float()
                out[row, h] = torch.softmax(k @ q[row, h].float() * scale, 0) @ v
    return out


CHUNKS = [
    [(0, 5)],  # one fresh prompt
    [(0, 3), (7, 4), (0, 1), (13, 9)],  # fresh and cached prefixes, a one-token chunk
    [(16, 16), (0, 40)],  # prefix on a block boundary; a chunk over several query tiles
]


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("QH,KVH,D,BS", [(2, 1, 16, 4), (4, 2, 24, 8)])
def test_prefill_twin_vs_loop(chunks, QH, KVH, D, BS):
    from kernels.paged_attention import paged_prefill_attention_torch

    (q, kc, vc, tables, cu_q, ctx), mq = _prefill_setup(chunks, QH, KVH, D, BS, torch.float32, "cpu")
    out = paged_prefill_attention_torch(q, kc, vc, tables, cu_q, ctx, mq, 0.4, torch.zeros_like(q))
    torch.testing.assert_close(out, _loop_prefill(q, kc, vc, tables, cu_q, ctx, 0.4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("QH,KVH,D,BS", [(2, 1, 16, 4), (6, 3, 24, 16)])
def test_prefill_triton_vs_twin(chunks, QH, KVH, D, BS, dtype, triton_on):
    from kernels import paged_prefill_attention
    from kernels.paged_attention import paged_prefill_attention_torch

    (q, kc, vc, tables, cu_q, ctx), mq = _prefill_setup(chunks, QH, KVH, D, BS, dtype, triton_on)
    sentinel = torch.full_like(q, 7.0)
    out = paged_prefill_attention(q, kc, vc, tables, cu_q, ctx, mq, 0.4, out=sentinel.clone())
    r0 = int(cu_q[0])
    assert (out[:r0].cpu() == 7.0).all(), "rows before the first chunk are left alone"
    ref = paged_prefill_attention_torch(*[t.cpu() for t in (q, kc, vc, tables, cu_q, ctx)], mq, 0.4,
                                        torch.zeros_like(q.cpu()))
    assert_close(out[r0:], ref[r0:], dtype)


def test_prefill_shape_errors():
    from kernels import paged_prefill_attention

    (q, kc, vc, tables, cu_q, ctx), mq = _prefill_setup([(0, 3)], 2, 1, 16, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="cu_q"):
        paged_prefill_attention(q, kc, vc, tables, cu_q[:1], ctx, mq, 0.4)
    with pytest.raises(ValueError, match="block_tables"):
        paged_prefill_attention(q, kc, vc, tables.long(), cu_q, ctx, mq, 0.4)
