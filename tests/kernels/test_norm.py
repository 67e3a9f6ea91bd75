"""RMSNorm, residual add + RMSNorm, the MoE combine: twins vs transformers, Triton vs twins."""

import pytest
import torch

from kernels import add_rms_norm_, moe_combine, rms_norm
from kernels.norm import add_rms_norm_torch_, moe_combine_torch, rms_norm_torch
from kt_helpers import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 16), (7, 40), (13, 200)]  # (T, W): one row, ragged widths


def _olmoe_norm(w: torch.Tensor, eps: float):
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    m = OlmoeRMSNorm(w.shape[0], eps=eps).to(w.dtype)
    with torch.no_grad():
        m.weight.copy_(w)
    return m


@pytest.mark.parametrize("dtype", DTYPES)
def test_twins_equal_transformers(dtype):
    pytest.importorskip("transformers")
    x = (torch.randn(9, 48) * 3).to(dtype)
    r = torch.randn(9, 48).to(dtype)
    w = (torch.rand(48) + 0.5).to(dtype)
    ref = _olmoe_norm(w, 1e-5)
    with torch.no_grad():
        assert torch.equal(rms_norm_torch(x, w, 1e-5), ref(x))
        res = r.clone()
        assert torch.equal(add_rms_norm_torch_(x, res, w, 1e-5), ref(r + x))
        assert torch.equal(res, r + x)  # the residual add in the model dtype, in place
        parts = torch.randn(9, 3, 48)
        res = r.clone()
        assert torch.equal(add_rms_norm_torch_(parts, res, w, 1e-5), ref(r + parts.sum(1).to(dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,W", SHAPES)
def test_rms_norm_triton(T, W, dtype, triton_on):
    x = (torch.randn(T, W) * 2).to(dtype).to(triton_on)
    w = (torch.rand(W) + 0.5).to(dtype).to(triton_on)
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == dtype and out.shape == (T, W)
    assert_close(out, rms_norm_torch(x.cpu(), w.cpu(), 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,W", SHAPES)
@pytest.mark.parametrize("parts", [0, 1, 3])
def test_add_rms_norm_triton(T, W, parts, dtype, triton_on):
    x = (torch.randn(T, parts, W) if parts else torch.randn(T, W).to(dtype)).to(triton_on)
    if parts:  # a strided (T, K, W) view, as fused_moe returns (N, H) viewed per token
        x = torch.randn(T, parts, W + 5)[:, :, :W].to(triton_on)
    r0 = torch.randn(T, W).to(dtype).to(triton_on)
    w = (torch.rand(W) + 0.5).to(dtype).to(triton_on)
    res = r0.clone()
    out = add_rms_norm_(x, res, w, 1e-5)
    res_ref = r0.cpu().clone()
    ref = add_rms_norm_torch_(x.cpu(), res_ref, w.cpu(), 1e-5)
    assert_close(out, ref, dtype)
    assert_close(res, res_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_combine_triton(dtype, triton_on):
    parts = torch.randn(5, 4, 72).to(triton_on)
    out = moe_combine(parts, dtype)
    assert out.dtype == dtype
    assert_close(out, moe_combine_torch(parts.cpu(), dtype), dtype)


def test_errors():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="W=9"):
        add_rms_norm_(x, torch.randn(3, 9), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="partials"):
        add_rms_norm_(torch.randn(3, 2, 8, dtype=torch.float16), x, torch.ones(8), 1e-5)
