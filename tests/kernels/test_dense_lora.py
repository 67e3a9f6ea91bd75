"""Dense multi-adapter LoRA: twin vs loop, Triton vs twin."""

import pytest
import torch

from kernels import dense_lora_
from kernels.dense_lora import dense_lora_torch_
from kernels.lora_types import DenseLoraLayer
from kt_helpers import assert_close, make_dense_lora


def _loop(y, x, lora, slots):
    y = y.float().clone()
    for t in range(x.shape[0]):
        s = int(slots[t])
        if s < 0 or int(lora.ranks[s]) == 0:
            continue
        o, r = int(lora.offsets[s]), int(lora.ranks[s])
        a, b = lora.a[o : o + r].float(), lora.b[o : o + r].float()
        y[t] += float(lora.scales[s]) * (b.T @ (a @ x[t].float()))
    return y


def _cpu(l: DenseLoraLayer) -> DenseLoraLayer:
    return DenseLoraLayer(l.a.cpu(), l.b.cpu(), l.offsets.cpu(), l.ranks.cpu(), l.scales.cpu())


@pytest.mark.parametrize("T,S", [(1, 1), (5, 3), (12, 3)])
def test_twin_vs_loop(T, S):
    lora = make_dense_lora(S, 40, 24, torch.float32, "cpu")
    x, y0 = torch.randn(T, 40), torch.randn(T, 24)
    slots = torch.randint(-1, S, (T,), dtype=torch.int32)
    torch.testing.assert_close(dense_lora_torch_(y0.clone(), x, lora, slots), _loop(y0, x, lora, slots), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,S,IN,OUT,dtype", [(1, 2, 40, 24, torch.float32), (9, 3, 48, 40, torch.bfloat16), (12, 3, 32, 48, torch.float16)])
def test_triton_vs_twin(T, S, IN, OUT, dtype, triton_on):
    dev = triton_on
    lora = make_dense_lora(S, IN, OUT, dtype, dev, choices=(0, 1, 5, 16, 33, 64))
    x = torch.randn(T, IN).to(dtype).to(dev)
    y0 = torch.randn(T, OUT).to(dtype).to(dev)
    slots = torch.randint(-1, S - 1 if S > 1 else S, (T,), dtype=torch.int32).to(dev)  # top slot unused
    y = dense_lora_(y0.clone(), x, lora, slots)
    ref = dense_lora_torch_(y0.cpu().clone(), x.cpu(), _cpu(lora), slots.cpu())
    assert_close(y, ref, dtype)


def test_base_only_untouched(device):
    lora = make_dense_lora(2, 40, 24, torch.float32, device)
    y0 = torch.randn(4, 24, device=device)
    y = dense_lora_(y0.clone(), torch.randn(4, 40, device=device), lora, torch.full((4,), -1, dtype=torch.int32, device=device))
    torch.testing.assert_close(y, y0)


def test_errors():
    lora = make_dense_lora(2, 40, 24, torch.float32, "cpu")
    with pytest.raises(ValueError, match="b must be"):
        dense_lora_(torch.zeros(3, 25), torch.zeros(3, 40), lora, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="dtype"):
        dense_lora_(torch.zeros(3, 24), torch.zeros(3, 40).half(), lora, torch.zeros(3, dtype=torch.int32))


def _shared_scales(loras):
    for l in loras[1:]:
        l.scales = loras[0].scales
    return loras


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("present", [(True, True, True), (True, False, True), (False, True, False)])
def test_cols_triton_vs_twin(present, dtype, triton_on):
    """q, k, v (GQA widths 24, 8, 8) into their columns of one qkv output: one shrink, one expand,
    over the step's shared alignment (dense_lora_plan)."""
    from kernels import dense_lora_cols_, dense_lora_plan

    T, S, IN, outs = 11, 3, 40, (24, 8, 8)
    dev = triton_on
    loras = _shared_scales([make_dense_lora(S, IN, o, dtype, dev) for o in outs])
    cols = (0, 24, 32)
    parts = [(l if p else None, c) for l, c, p in zip(loras, cols, present)]
    x = torch.randn(T, IN).to(dtype).to(dev)
    y0 = torch.randn(T, 40).to(dtype).to(dev)
    slots = torch.randint(-1, S, (T,), dtype=torch.int32).to(dev)
    plan = dense_lora_plan(slots, S)
    assert plan is not None
    y = dense_lora_cols_(y0.clone(), x, parts, slots, plan)
    ref = y0.cpu().clone()
    for l, c, p in zip(loras, cols, present):
        if p:
            dense_lora_torch_(ref[:, c:c + l.b.shape[1]], x.cpu(), _cpu(l), slots.cpu())
    assert_close(y, ref, dtype)


def test_cols_twin_equals_per_projection():
    from kernels import dense_lora_cols_

    T, S = 6, 2
    loras = _shared_scales([make_dense_lora(S, 40, o, torch.float32, "cpu") for o in (16, 8, 8)])
    x, y0 = torch.randn(T, 40), torch.randn(T, 32)
    slots = torch.randint(-1, S, (T,), dtype=torch.int32)
    y = dense_lora_cols_(y0.clone(), x, [(loras[0], 0), (loras[1], 16), (loras[2], 24)], slots)
    ref = y0.clone()
    for l, c in zip(loras, (0, 16, 24)):
        ref[:, c:c + l.b.shape[1]] = _loop(ref[:, c:c + l.b.shape[1]], x, l, slots)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        dense_lora_cols_(y0.clone(), x, [(loras[0], 20)], slots)
