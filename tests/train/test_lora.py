import copy

import pytest
import torch

from drlora_train.lora import LoraSpec, adapter_tensors, all_ranks, attach_lora, lora_parameters
from tests.train.conftest import load_tiny

IDS = torch.tensor([[5, 17, 300, 42, 9, 700, 77, 3], [8, 600, 21, 4, 512, 13, 90, 250]])


def _randomise(layers, gen):
    with torch.no_grad():
        for m in layers:
            for p in m.spec.targets:
                m.lora_B[p].normal_(0, 0.05, generator=gen)
            ranks = torch.randint(0, m.spec.r_max + 1, (m.num_experts,), generator=gen)
            m.mask.copy_(torch.arange(m.spec.r_max)[None] < ranks[:, None])
            for p in m.spec.targets:  # B beyond the mask is non-zero too: must be ignored
                m.lora_B[p][~m.mask[:, None, :].expand_as(m.lora_B[p])] = 0.3


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["loop", "padded"])
def test_matches_merged_weights(tiny_path, impl, device):
    ref = load_tiny(tiny_path)
    model = copy.deepcopy(ref)
    layers = attach_lora(model, LoraSpec(r_max=8, targets=("gate", "up", "down")))
    for m in layers:
        m.impl = impl
    _randomise(layers, torch.Generator().manual_seed(0))
    I = layers[0].intermediate_dim
    with torch.no_grad():
        for m, layer in zip(layers, ref.model.layers):
            ex = layer.mlp.experts
            mk = m.mask.float()
            for p, rows in (("gate", slice(0, I)), ("up", slice(I, 2 * I))):
                d = torch.einsum("eor,eri->eoi", m.lora_B[p] * mk[:, None], m.lora_A[p])
                ex.gate_up_proj[:, rows] += m.scaling * d
            d = torch.einsum("eor,eri->eoi", m.lora_B["down"] * mk[:, None], m.lora_A["down"])
            ex.down_proj += m.scaling * d
        model, ref = model.to(device), ref.to(device)  # randomised and merged on CPU
        got, want = model(IDS.to(device)).logits, ref(IDS.to(device)).logits
    assert m.scaling == 2.0
    assert (got - want).abs().max() < 1e-4, (got - want).abs().max()


@pytest.mark.parametrize("impl", ["loop", "padded"])
def test_inactive_ranks_frozen_and_activation_is_noop(tiny_path, impl):
    model = load_tiny(tiny_path)
    layers = attach_lora(model, LoraSpec(r_max=8))
    for m in layers:
        m.impl = impl
    for m in layers:
        m.set_ranks(torch.full((m.num_experts,), 3))
    A0 = {id(p): p.detach().clone() for p in lora_parameters(layers)}
    opt = torch.optim.AdamW(lora_parameters(layers), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        for m in layers:
            m.mask_grads()
        opt.step()
        opt.zero_grad()
    for m in layers:
        for p in m.spec.targets:
            A, B = m.lora_A[p], m.lora_B[p]
            assert torch.equal(A[:, 3:], A0[id(A)][:, 3:])  # inactive A rows untouched
            assert not torch.equal(A[:, :3], A0[id(A)][:, :3])  # active ones trained
            assert B[:, :, 3:].abs().max() == 0  # inactive B columns exactly zero
            assert B[:, :, :3].abs().max() > 0
    model.eval()
    with torch.no_grad():
        before = model(IDS).logits
        for m in layers:
            m.set_ranks(torch.full((m.num_experts,), 6))
        after = model(IDS).logits
    assert torch.equal(before, after)
    assert all_ranks(layers).sum() == 4 * 16 * 6


def test_adapter_tensors_pack_active_prefix(tiny_path):
    model = load_tiny(tiny_path)
    layers = attach_lora(model, LoraSpec(r_max=4))
    ranks = torch.tensor([1, 2, 3, 4] * 4)
    for m in layers:
        m.set_ranks(ranks)
    t = adapter_tensors(layers)
    assert t["layers.0.experts.up.lora_A"].shape == (40, 128)
    assert t["layers.3.experts.down.lora_B"].shape == (128, 40)
    assert torch.equal(t["layers.0.experts.up.lora_A"][1:3], layers[0].lora_A["up"][1, :2])
