"""Router (softmax, top-k, renormalisation, rounding): twin vs transformers, Triton vs twin."""

import pytest
import torch

from kernels import route_topk
from kernels.router import route_topk_torch
from kt_helpers import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _logits(T, E, dtype, device):
    """Distinct logits per row (multiples of 1/16, exact in every dtype): no ties, so the top-k
    set and order are unique and comparable with torch.topk."""
    vals = torch.stack([torch.randperm(E) for _ in range(T)]).float() / 16 - E / 32
    return vals.to(dtype).to(device)


@pytest.mark.parametrize("norm_topk", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_twin_equals_transformers(norm_topk, dtype):
    pytest.importorskip("transformers")
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

    H, E, K = 24, 10, 3
    router = OlmoeTopKRouter(OlmoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K,
                                         norm_topk_prob=norm_topk)).to(dtype)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H))
        h = torch.randn(6, H).to(dtype)
        logits, scores, ids = router(h)
    w, i = route_topk_torch(logits, K, norm_topk)
    assert torch.equal(i, ids.to(torch.int32)) and torch.equal(w, scores.float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,K", [(1, 6, 1), (5, 16, 2), (37, 64, 8), (20, 60, 4)])
@pytest.mark.parametrize("renorm,round_weights", [(False, True), (True, True), (True, False)])
def test_triton_vs_twin(T, E, K, renorm, round_weights, dtype, triton_on):
    logits = _logits(T, E, dtype, triton_on)
    w, ids = route_topk(logits, K, renorm, round_weights)
    w_ref, ids_ref = route_topk_torch(logits.cpu(), K, renorm, round_weights)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and w.shape == (T, K)
    assert torch.equal(ids.cpu(), ids_ref)
    assert_close(w, w_ref, dtype if round_weights else torch.float32)
    if round_weights:  # values are representable in the model dtype
        assert torch.equal(w.cpu(), w.cpu().to(dtype).float())


def test_ties_take_the_lower_index(triton_on):
    logits = torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0, 1.0]]).to(triton_on)
    w, ids = route_topk(logits, 3, False)
    assert ids.cpu().tolist() == [[1, 2, 4]]
    assert torch.allclose(w.cpu(), torch.full((1, 3), w.cpu()[0, 0].item()))


def test_errors():
    with pytest.raises(ValueError, match="top_k"):
        route_topk(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="dtype"):
        route_topk(torch.randn(3, 4).double(), 2)
