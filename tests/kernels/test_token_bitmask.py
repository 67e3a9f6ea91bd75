"""Grammar token masks: the twin (NumPy and torch paths) vs a loop over bits, Triton vs the twin,
and the sampler's greedy CPU path vs masking everything."""

import pytest
import torch

from kernels.token_bitmask import apply_token_bitmask_, apply_token_bitmask_torch_

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N rows, V vocab, W32 words): exact fit, ragged V, a mask shorter than V (the tokens past it
# are forbidden), a mask longer than V (llguidance's tokenizer may count more tokens)
SHAPES = [(5, 64, 2), (9, 849, 27), (4, 100, 3), (6, 70, 4), (3, 1, 1), (7, 2500, 79)]


def _reference(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    V, W = logits.shape[1], bitmask.shape[1]
    for i, r in enumerate(rows.tolist()):
        for t in range(V):
            if not (t < 32 * W and (int(bitmask[i, t // 32]) >> (t % 32)) & 1):
                out[r, t] = float("-inf")
    return out


def _inputs(N, V, W, dtype, device, density=0.7):
    logits = torch.randn(N, V).to(dtype).to(device)
    nc = max(1, N // 2)
    rows = torch.randperm(N)[:nc].to(device)  # distinct, unsorted
    bits = (torch.rand(nc, 32 * W) < density).to(torch.int64)
    words = (bits.view(nc, W, 32) << torch.arange(32)).sum(-1)  # (nc, W) in [0, 2^32)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).to(device)
    return logits, rows, bitmask


@pytest.mark.parametrize("N,V,W", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_twin_matches_bit_loop(N, V, W, dtype):
    logits, rows, bitmask = _inputs(N, V, W, dtype, "cpu")
    ref = _reference(logits, rows, bitmask)
    assert torch.equal(apply_token_bitmask_torch_(logits.clone(), rows, bitmask), ref)
    # the torch path (what a device without Triton runs) and the NumPy one agree
    if dtype != torch.bfloat16:
        assert torch.equal(apply_token_bitmask_torch_(logits.clone().to(torch.float64), rows, bitmask),
                           ref.to(torch.float64))


@pytest.mark.parametrize("N,V,W", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_twin(N, V, W, dtype, triton_on):
    logits, rows, bitmask = _inputs(N, V, W, dtype, triton_on)
    out = apply_token_bitmask_(logits.clone(), rows.to(torch.int32), bitmask)
    assert torch.equal(out.cpu(), apply_token_bitmask_torch_(logits.cpu(), rows.cpu(), bitmask.cpu()))


def test_no_rows_and_errors():
    logits = torch.randn(3, 40)
    assert torch.equal(apply_token_bitmask_(logits.clone(), torch.zeros(0, dtype=torch.long),
                                            torch.zeros(0, 2, dtype=torch.int32)), logits)
    with pytest.raises(ValueError, match="int32"):
        apply_token_bitmask_(logits, torch.tensor([0]), torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="rows for"):
        apply_token_bitmask_(logits, torch.tensor([0, 1]), torch.zeros(1, 2, dtype=torch.int32))


@pytest.mark.parametrize("density", [0.02, 0.5, 0.97])
@pytest.mark.parametrize("N,V,W", [(16, 849, 27), (8, 100, 3), (8, 70, 4)])
def test_greedy_cpu_path_equals_masking_everything(N, V, W, density):
    """The sampler's greedy CPU path (every row's argmax, then the constrained rows' again on a
    masked copy of them) picks what argmax over fully masked logits picks, ties included."""
    from drlora_serve.sampler import greedy_masked_cpu

    for _ in range(20):
        logits, rows, bitmask = _inputs(N, V, W, torch.float32, "cpu", density)
        logits = torch.round(logits * 2) / 2  # many exact ties
        want = torch.argmax(_reference(logits, rows, bitmask), dim=-1)
        before = logits.clone()
        assert torch.equal(greedy_masked_cpu(logits, rows, bitmask), want)
        assert torch.equal(logits, before)  # the model's logits are not changed
