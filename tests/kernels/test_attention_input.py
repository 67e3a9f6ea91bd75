"""Attention input (q/k norm, clip, RoPE, paged KV store): twin vs transformers' ops, Triton vs twin."""

import pytest
import torch

from kernels import attention_input
from kernels.attention_input import attention_input_torch
from kt_helpers import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEADS = [(4, 4, 16), (6, 2, 24), (5, 1, 10)]  # (QH, KVH, D): MHA, GQA, MQA with odd head count and D/2


def _case(T, QH, KVH, D, norm, dtype, device, P=50, NB=6, BS=4):
    qkv = (torch.randn(T, (QH + 2 * KVH) * D) * 2).to(dtype)
    widths = {"full": (QH * D, KVH * D), "head": (D, D), "none": None}[norm]
    qn, kn = (None, None) if widths is None else ((torch.rand(widths[0]) + 0.5).to(dtype),
                                                  (torch.rand(widths[1]) + 0.5).to(dtype))
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.outer(torch.arange(P).float(), inv)
    emb = torch.cat((emb, emb), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    pos = torch.randint(0, P, (T,))
    slots = torch.randperm(NB * BS)[:T]
    slots[T // 2] = -1  # a row that stores nothing (CUDA-graph padding)
    kc, vc = torch.randn(NB, BS, KVH, D).to(dtype), torch.randn(NB, BS, KVH, D).to(dtype)
    ts = [qkv, qn, kn, cos, sin, pos, kc, vc, slots]
    return [t.to(device) if t is not None else None for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
def test_twin_equals_transformers_olmoe(dtype):
    """Full-width q/k norm, then rotate-half RoPE: transformers' OlmoeRMSNorm and apply_rotary_pos_emb."""
    pytest.importorskip("transformers")
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm, apply_rotary_pos_emb

    T, QH, KVH, D = 7, 4, 2, 16
    qkv, qn, kn, cos, sin, pos, kc, vc, slots = _case(T, QH, KVH, D, "full", dtype, "cpu")
    kc0, vc0 = kc.clone(), vc.clone()
    q = attention_input_torch(qkv, qn, kn, 1e-5, cos, sin, pos, kc, vc, slots, QH, KVH, D)
    norms = []
    for w in (qn, kn):
        m = OlmoeRMSNorm(w.shape[0], eps=1e-5).to(dtype)
        with torch.no_grad():
            m.weight.copy_(w)
        norms.append(m)
    with torch.no_grad():
        rq = norms[0](qkv[:, :QH * D]).view(1, T, QH, D).transpose(1, 2)
        rk = norms[1](qkv[:, QH * D:(QH + KVH) * D]).view(1, T, KVH, D).transpose(1, 2)
        rq, rk = apply_rotary_pos_emb(rq, rk, cos[pos][None], sin[pos][None])
    assert torch.equal(q, rq[0].transpose(0, 1))
    v = qkv[:, (QH + KVH) * D:].view(T, KVH, D)
    for t in range(T):
        s = int(slots[t])
        if s < 0:
            continue
        assert torch.equal(kc.view(-1, KVH, D)[s], rk[0, :, t]) and torch.equal(vc.view(-1, KVH, D)[s], v[t])
    keep = torch.ones(kc.numel() // (KVH * D), dtype=torch.bool)
    keep[slots[slots >= 0]] = False
    assert torch.equal(kc.view(-1, KVH, D)[keep], kc0.view(-1, KVH, D)[keep]), "other slots untouched"
    assert torch.equal(vc.view(-1, KVH, D)[keep], vc0.view(-1, KVH, D)[keep])


def test_twin_per_head_norm():
    """Per-head q/k norm (Qwen3): RMSNorm over D of each head, the weight shared by heads."""
    T, QH, KVH, D = 5, 4, 2, 16
    qkv, qn, kn, cos, sin, pos, kc, vc, slots = _case(T, QH, KVH, D, "head", torch.float32, "cpu")
    q = attention_input_torch(qkv, qn, kn, 1e-6, cos, sin, pos, kc, vc, slots, QH, KVH, D)
    x = qkv[:, :QH * D].view(T, QH, D)
    xn = qn * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    c, s = cos[pos][:, None], sin[pos][:, None]
    rot = torch.cat((-xn[..., D // 2:], xn[..., :D // 2]), -1)
    torch.testing.assert_close(q, xn * c + rot * s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["full", "head", "none"])
@pytest.mark.parametrize("QH,KVH,D", HEADS)
def test_triton_vs_twin(QH, KVH, D, norm, dtype, triton_on):
    T = 9
    qkv, qn, kn, cos, sin, pos, kc, vc, slots = _case(T, QH, KVH, D, norm, dtype, triton_on)
    clip = 1.5 if norm == "none" else None  # OLMoE's clip_qkv, exercised where values exceed it
    kr, vr = kc.cpu().clone(), vc.cpu().clone()
    q_ref = attention_input_torch(qkv.cpu(), *[t.cpu() if t is not None else None for t in (qn, kn)], 1e-5,
                                  cos.cpu(), sin.cpu(), pos.cpu(), kr, vr, slots.cpu(), QH, KVH, D, clip)
    q = attention_input(qkv, qn, kn, 1e-5, cos, sin, pos, kc, vc, slots, QH, KVH, D, clip)
    assert q.shape == (T, QH, D) and q.dtype == dtype
    assert_close(q, q_ref, dtype)
    assert_close(kc, kr, dtype)
    assert_close(vc, vr, dtype)


def test_errors():
    qkv, qn, kn, cos, sin, pos, kc, vc, slots = _case(3, 4, 2, 16, "full", torch.float32, "cpu")
    with pytest.raises(ValueError, match="qkv"):
        attention_input(qkv[:, 1:], qn, kn, 1e-5, cos, sin, pos, kc, vc, slots, 4, 2, 16)
    with pytest.raises(ValueError, match="q_norm"):
        attention_input(qkv, qn[:10], kn, 1e-5, cos, sin, pos, kc, vc, slots, 4, 2, 16)
    with pytest.raises(ValueError, match="positions"):
        attention_input(qkv, qn, kn, 1e-5, cos, sin, pos.int(), kc, vc, slots, 4, 2, 16)
