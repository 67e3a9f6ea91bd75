"""Fused MoE (+ LoRA): twin vs loop reference, Triton vs twin."""

import pytest
import torch

from kernels import fused_moe
from kernels.fused_moe import fused_moe_torch
from kt_helpers import assert_close, cpu_lora, make_moe, make_moe_lora, ref_fused_moe

SHAPES = [  # T, K, E, H, I
    (1, 2, 6, 40, 24),  # one token, most experts empty
    (7, 2, 5, 48, 32),
    (12, 3, 6, 40, 24),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _slots(T, S, device):
    s = torch.randint(-1, S - 1, (T,), dtype=torch.int32)  # slot S-1 never used
    s[0] = -1 if T > 1 else 0
    return s.to(device)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("T,K,E,H,I", SHAPES)
def test_twin_vs_loop(T, K, E, H, I, lora):
    dt = torch.float32
    args = make_moe(T, K, E, H, I, dt, "cpu")
    layer = make_moe_lora(3, E, H, I, dt, "cpu") if lora else None
    slots = _slots(T, 3, "cpu") if lora else None
    ref = ref_fused_moe(*args, layer, slots)
    assert_close(fused_moe_torch(*args, layer, slots), ref, dt)


def test_twin_vs_loop_bf16():
    args = make_moe(5, 2, 4, 40, 24, torch.bfloat16, "cpu")
    layer = make_moe_lora(2, 4, 40, 24, torch.bfloat16, "cpu")
    slots = torch.tensor([0, 1, -1, 1, 0], dtype=torch.int32)
    assert_close(fused_moe_torch(*args, layer, slots), ref_fused_moe(*args, layer, slots), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,H,I", SHAPES)
def test_triton_base(T, K, E, H, I, dtype, triton_on):
    args = make_moe(T, K, E, H, I, dtype, triton_on)
    out = fused_moe(*args)
    assert out.shape == (T, H) and out.dtype == dtype and out.device.type == triton_on.type
    assert_close(out, fused_moe_torch(*[a.cpu() for a in args]), dtype)


@pytest.mark.parametrize(
    "dtype,projections,choices",
    [
        (torch.float32, ("gate", "up", "down"), (0, 1, 3, 16, 17, 40)),
        (torch.bfloat16, ("gate", "up", "down"), (0, 1, 8, 16, 24, 32)),
        (torch.float16, ("down",), (1, 5)),
        (torch.float32, ("gate",), (0, 2, 33)),
        (torch.float32, ("up",), (0, 3, 16)),  # one of gate/up: the single-projection launch
    ],
)
@pytest.mark.parametrize("T,K,E,H,I", SHAPES[:2] + [(12, 2, 4, 40, 24)])
def test_triton_lora(T, K, E, H, I, dtype, projections, choices, triton_on):
    S = 3
    args = make_moe(T, K, E, H, I, dtype, triton_on)
    layer = make_moe_lora(S, E, H, I, dtype, triton_on, choices, projections)
    slots = _slots(T, S, triton_on)
    out = fused_moe(*args, lora=layer, slot_ids=slots)
    ref = fused_moe_torch(*[a.cpu() for a in args], cpu_lora(layer), slots.cpu())
    assert_close(out, ref, dtype)


def test_all_slots_base_only_equals_base(device):
    args = make_moe(4, 2, 4, 40, 24, torch.float32, device)
    layer = make_moe_lora(2, 4, 40, 24, torch.float32, device)
    slots = torch.full((4,), -1, dtype=torch.int32, device=device)
    torch.testing.assert_close(fused_moe(*args, lora=layer, slot_ids=slots), fused_moe(*args))


def test_shape_errors():
    h, wgu, wd, tw, ti = make_moe(2, 2, 4, 40, 24, torch.float32, "cpu")
    with pytest.raises(ValueError, match="w_down"):
        fused_moe(h, wgu, wd[:, :, :-1], tw, ti)
    with pytest.raises(ValueError, match="dtype"):
        fused_moe(h.half(), wgu, wd, tw, ti)
    with pytest.raises(ValueError, match="K-major"):
        fused_moe(h, wgu.transpose(1, 2).contiguous().transpose(1, 2), wd, tw, ti)
    with pytest.raises(ValueError, match="slot_ids"):
        fused_moe(h, wgu, wd, tw, ti, lora=make_moe_lora(2, 4, 40, 24, torch.float32, "cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_lora_blocks_mix_slots(dtype, triton_on):
    """Many pairs per expert: each expert spans several blocks, and blocks hold rows of several
    slots (and base rows): the LoRA epilogues walk each block's slots."""
    T, K, E, H, I, S = 100, 2, 2, 40, 24, 4
    args = make_moe(T, K, E, H, I, dtype, triton_on)
    layer = make_moe_lora(S, E, H, I, dtype, triton_on, (0, 1, 5, 16, 20))
    slots = torch.randint(-1, S, (T,), dtype=torch.int32).to(triton_on)
    out = fused_moe(*args, lora=layer, slot_ids=slots)
    assert_close(out, fused_moe_torch(*[a.cpu() for a in args], cpu_lora(layer), slots.cpu()), dtype)


@pytest.mark.parametrize("lora", [False, True])
def test_uncombined_terms(lora, device, monkeypatch):
    """combine=False: the (T, K, H) fp32 weighted terms, whose sum in the model dtype is the output."""
    if device.type == "cpu":
        pytest.importorskip("triton")
        monkeypatch.setenv("DRLORA_FORCE_TRITON", "1")
        monkeypatch.setenv("DRLORA_POISON", "1")
    T, K, E, H, I = 7, 2, 5, 48, 32
    args = make_moe(T, K, E, H, I, torch.float32, device)
    layer = make_moe_lora(3, E, H, I, torch.float32, device) if lora else None
    slots = _slots(T, 3, device) if lora else None
    terms = fused_moe(*args, lora=layer, slot_ids=slots, combine=False)
    assert terms.shape == (T, K, H) and terms.dtype == torch.float32
    ref = fused_moe_torch(*[a.cpu() for a in args], cpu_lora(layer) if lora else None,
                          slots.cpu() if lora else None, combine=False)
    assert_close(terms, ref, torch.float32)
    torch.testing.assert_close(ref.sum(1), fused_moe_torch(*[a.cpu() for a in args],
                                                           cpu_lora(layer) if lora else None,
                                                           slots.cpu() if lora else None))


def test_checks_cached_per_shape_but_sound():
    """Input checks run once per signature; a pool tensor replaced by a bad one is checked again."""
    from kernels import _dispatch

    args = make_moe(3, 2, 4, 40, 24, torch.float32, "cpu")
    layer = make_moe_lora(2, 4, 40, 24, torch.float32, "cpu")
    slots = torch.tensor([0, -1, 1], dtype=torch.int32)
    fused_moe(*args, lora=layer, slot_ids=slots)
    n = len(_dispatch._CHECKED)
    fused_moe(*args, lora=layer, slot_ids=slots)
    assert len(_dispatch._CHECKED) == n, "same shapes: no new check"
    layer.a["down"] = layer.a["down"][:, :-1]  # (R, I - 1): wrong
    with pytest.raises(ValueError, match="down"):
        fused_moe(*args, lora=layer, slot_ids=slots)
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe(args[0], args[1], args[2], args[3], args[4][:2])
