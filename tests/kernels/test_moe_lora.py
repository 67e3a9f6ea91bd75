"""Standalone rank-exact shrink/expand and the padded baseline."""

import pytest
import torch

from kernels import moe_lora_expand_, moe_lora_shrink, pad_moe_lora
from kernels.fused_moe import fused_moe_torch
from kernels.moe_lora import moe_lora_expand_torch, moe_lora_shrink_torch
from kt_helpers import assert_close, make_moe, make_moe_lora, pack_pool, random_ranks


def _case(T, K, E, S, IN, OUT, dtype, device, choices):
    ranks = random_ranks((S, E), choices, device)
    a, b, off = pack_pool(ranks, IN, OUT, dtype, device)
    topk = torch.randint(0, E, (T, K), dtype=torch.int32, device=device)
    slots = torch.randint(-1, S, (T,), dtype=torch.int32, device=device)
    scales = (torch.rand(S) + 0.5).to(device)
    return ranks, a, b, off, topk, slots, scales


def _loop_shrink_expand(x, a, b, off, ranks, scales, topk, slots, y, per_pair):
    """Dumbest loop: per pair, explicit matmuls. Returns (valid-mask, u, y_new)."""
    T, K = topk.shape
    rb = max(1, int(ranks.max()))
    u = torch.zeros(T * K, rb)
    valid = torch.zeros(T * K, rb, dtype=torch.bool)
    y = y.float().clone()
    for t in range(T):
        for k in range(K):
            p, e, s = t * K + k, int(topk[t, k]), int(slots[t])
            if s < 0 or int(ranks[s, e]) == 0:
                continue
            o, r = int(off[s, e]), int(ranks[s, e])
            xv = x[p if per_pair else t].float()
            u[p, :r] = a[o : o + r].float() @ xv
            valid[p, :r] = True
            y[p] += float(scales[s]) * (b[o : o + r].float().T @ u[p, :r])
    return valid, u, y


@pytest.mark.parametrize("per_pair", [False, True])
@pytest.mark.parametrize("T,K,E,S", [(1, 1, 3, 2), (6, 2, 4, 3), (11, 3, 5, 3)])
def test_twins_vs_loop(T, K, E, S, per_pair):
    IN, OUT = 40, 24
    ranks, a, b, off, topk, slots, scales = _case(T, K, E, S, IN, OUT, torch.float32, "cpu", (0, 1, 7, 16, 19))
    rb = max(1, int(ranks.max()))
    x = torch.randn(T * K if per_pair else T, IN)
    y0 = torch.randn(T * K, OUT)
    valid, u_ref, y_ref = _loop_shrink_expand(x, a, b, off, ranks, scales, topk, slots, y0, per_pair)
    u = moe_lora_shrink_torch(x, a, off, ranks, topk, slots, rb, out=torch.full((T * K, rb), float("nan")))
    torch.testing.assert_close(u[valid], u_ref[valid])
    y = moe_lora_expand_torch(y0.clone(), u, b, off, ranks, scales, topk, slots)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "T,K,E,S,dtype,choices",
    [
        (1, 1, 3, 2, torch.float32, (1,)),
        (7, 2, 4, 3, torch.bfloat16, (0, 1, 3, 16, 17, 32)),
        (12, 2, 5, 3, torch.float16, (0, 2, 9, 24)),
        (4, 2, 3, 2, torch.float32, (256, 1, 0, 100)),  # rank up to 256 in one launch
    ],
)
def test_triton_vs_twin(T, K, E, S, dtype, choices, triton_on):
    dev = triton_on
    IN, OUT = 40, 24
    ranks, a, b, off, topk, slots, scales = _case(T, K, E, S, IN, OUT, dtype, dev, choices)
    rb = int(ranks.max())
    for per_pair in (False, True):
        x = torch.randn(T * K if per_pair else T, IN).to(dtype).to(dev)
        u = moe_lora_shrink(x, a, off, ranks, topk, slots, rb)
        c = lambda *ts: [t.cpu() for t in ts]  # noqa: E731
        u_ref = moe_lora_shrink_torch(*c(x, a, off, ranks, topk, slots), rb, out=torch.zeros(T * K, rb))
        # compare only entries the op defines: pairs with a slot, columns < their rank
        e = topk.reshape(-1).long().cpu()
        s = slots.long().cpu().repeat_interleave(K)
        r = torch.where(s >= 0, ranks.cpu()[s.clamp(min=0), e], 0)
        valid = torch.arange(rb)[None, :] < r[:, None]
        assert_close(u.cpu()[valid], u_ref[valid], dtype)
        y0 = torch.randn(T * K, 3 + OUT).to(dtype).to(dev)
        y = moe_lora_expand_(y0.clone(), u, b, off, ranks, scales, topk, slots, y_col=3)
        y_ref = moe_lora_expand_torch(y0.cpu().clone(), u.cpu(), *c(b, off, ranks, scales, topk, slots), y_col=3)
        assert_close(y, y_ref, dtype)


@pytest.mark.parametrize("use_triton", [False, True])
def test_padded_equals_exact(use_triton, monkeypatch):
    if use_triton:
        pytest.importorskip("triton")
        monkeypatch.setenv("DRLORA_FORCE_TRITON", "1")
    T, K, E, S, H, I = 6, 2, 4, 3, 40, 24
    args = make_moe(T, K, E, H, I, torch.float32, "cpu")
    layer = make_moe_lora(S, E, H, I, torch.float32, "cpu", (0, 1, 5, 16))
    slots = torch.tensor([0, 1, 2, -1, 1, 0], dtype=torch.int32)
    padded = pad_moe_lora(layer, 16)
    assert padded.a["gate"].shape == (S * E * 16, H)
    from kernels import fused_moe

    assert_close(fused_moe(*args, lora=padded, slot_ids=slots), fused_moe_torch(*args, layer, slots), torch.float32)


def test_shrink_errors():
    ranks, a, b, off, topk, slots, scales = _case(3, 2, 4, 2, 40, 24, torch.float32, "cpu", (1, 2))
    x = torch.randn(3, 40)
    with pytest.raises(ValueError, match="int32"):
        moe_lora_shrink(x, a, off.long(), ranks, topk, slots, 2)
    with pytest.raises(ValueError, match="rows"):
        moe_lora_shrink(torch.randn(5, 40), a, off, ranks, topk, slots, 2)
    with pytest.raises(ValueError, match="slot_ids"):
        moe_lora_shrink(x, a, off, ranks, topk, slots[:2], 2)
