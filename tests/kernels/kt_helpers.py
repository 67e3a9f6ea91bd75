"""Shared builders and dumbest-possible loop references for the kernel tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.lora_types import DenseLoraLayer, MoeLoraLayer

TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}
# Normwise slack, as a fraction of max|expected|: low-precision kernels round intermediates
# (the LoRA shrink result, the activation) that can be much larger than an output element
# that nearly cancels, so an elementwise bound alone fails on rare draws. About 8 ulps.
NORM = {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close(actual, expected, dtype):
    """|actual - expected| <= atol + rtol*|expected| + norm*max|expected|, elementwise."""
    atol, rtol = TOL[dtype]
    assert not torch.isnan(actual).any(), "NaN in output (poisoned entry not written?)"
    a, e = actual.float().cpu(), expected.float().cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    scale = e.abs().max().item() if e.numel() else 0.0
    bound = atol + rtol * e.abs() + NORM[dtype] * scale
    err = (a - e).abs()
    bad = err > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{int(bad.sum())}/{err.numel()} elements off (max err {err.max().item():.4g}, "
            f"max|expected| {scale:.4g}); first at flat index {i}: "
            f"{a.flatten()[i].item():.6g} vs {e.flatten()[i].item():.6g}"
        )


def pack_pool(ranks: torch.Tensor, dim_a: int, dim_b: int, dtype, device, std=0.3):
    """Random packed pools for a rank table of any shape; offsets shuffled, junk rows between."""
    flat = ranks.flatten().tolist()
    perm = torch.randperm(len(flat)).tolist()
    offsets = [0] * len(flat)
    pos = 2  # junk rows in front
    for i in perm:
        offsets[i] = pos
        pos += flat[i] + 1  # one junk row after each block
    a = (torch.randn(pos, dim_a) * std).to(dtype).to(device)
    b = (torch.randn(pos, dim_b) * std).to(dtype).to(device)
    off = torch.tensor(offsets, dtype=torch.int32).view(ranks.shape).to(device)
    return a, b, off


def random_ranks(shape, choices, device):
    c = torch.tensor(choices, dtype=torch.int32)
    return c[torch.randint(0, len(c), shape)].to(device)


def make_moe_lora(S, E, H, I, dtype, device, choices=(0, 1, 3, 8, 16, 17, 24), projections=("gate", "up", "down")):
    dims = {"gate": (H, I), "up": (H, I), "down": (I, H)}
    layer = MoeLoraLayer(scales=(torch.rand(S) + 0.5).to(device))
    for p in projections:
        r = random_ranks((S, E), choices, device)
        a, b, off = pack_pool(r, *dims[p], dtype, device)
        layer.a[p], layer.b[p], layer.offsets[p], layer.ranks[p] = a, b, off, r
    return layer


def make_dense_lora(S, IN, OUT, dtype, device, choices=(0, 1, 5, 16, 33)):
    r = random_ranks((S,), choices, device)
    a, b, off = pack_pool(r, IN, OUT, dtype, device)
    return DenseLoraLayer(a=a, b=b, offsets=off, ranks=r, scales=(torch.rand(S) + 0.5).to(device))


def make_moe(T, K, E, H, I, dtype, device):
    hidden = torch.randn(T, H).to(dtype).to(device)
    w_gate_up = (torch.randn(E, 2 * I, H) / H**0.5).to(dtype).to(device)
    w_down = (torch.randn(E, H, I) / I**0.5).to(dtype).to(device)
    scores = torch.randn(T, E)
    topk_w, topk_ids = torch.softmax(scores, -1).topk(K, dim=-1)
    return hidden, w_gate_up, w_down, topk_w.to(device), topk_ids.to(torch.int32).to(device)


def lora_vec(layer, p, s, e, x):
    """Per-vector LoRA delta with explicit matmuls (fp32)."""
    if p not in layer.a or s < 0:
        return 0.0
    o, r = int(layer.offsets[p][s, e]), int(layer.ranks[p][s, e])
    if r == 0:
        return 0.0
    a = layer.a[p][o : o + r].float()
    b = layer.b[p][o : o + r].float()
    return float(layer.scales[s]) * (b.T @ (a @ x.float()))


def ref_fused_moe(hidden, w_gate_up, w_down, topk_w, topk_ids, lora=None, slot_ids=None):
    """Dumbest loop: per token, per k, explicit matvecs in fp32 (h rounded to the input dtype)."""
    T, H = hidden.shape
    K = topk_ids.shape[1]
    I = w_gate_up.shape[1] // 2
    out = torch.zeros(T, H)
    for t in range(T):
        s = int(slot_ids[t]) if slot_ids is not None else -1
        x = hidden[t].float().cpu()
        for k in range(K):
            e = int(topk_ids[t, k])
            gu = w_gate_up[e].float().cpu() @ x
            gate = gu[:I] + (lora_vec(lora, "gate", s, e, x) if lora else 0.0)
            up = gu[I:] + (lora_vec(lora, "up", s, e, x) if lora else 0.0)
            h = (F.silu(gate) * up).to(hidden.dtype).float()
            y = w_down[e].float().cpu() @ h + (lora_vec(lora, "down", s, e, h) if lora else 0.0)
            out[t] += float(topk_w[t, k]) * y
    return out


def cpu_lora(layer: MoeLoraLayer) -> MoeLoraLayer:
    c = lambda d: {k: v.cpu() for k, v in d.items()}  # noqa: E731
    return MoeLoraLayer(c(layer.a), c(layer.b), c(layer.offsets), c(layer.ranks), layer.scales.cpu())
