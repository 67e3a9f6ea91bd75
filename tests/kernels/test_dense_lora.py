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
