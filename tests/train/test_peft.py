import copy

import pytest
import torch

from drlora.adapter_format import AdapterConfig, read_adapter, write_adapter
from drlora.models import MoeShape
from drlora_train.lora import LoraSpec, adapter_tensors, attach_lora
from drlora.peft import export_peft, peft_to_drlora
from tests.train.conftest import load_tiny

IDS = torch.tensor([[5, 17, 300, 42, 9, 700, 77, 3]])


def _our_adapter(tiny_path, out, targets, seed=0):
    """A LoRA model with uneven ranks and random non-zero B, written as an adapter."""
    model = load_tiny(tiny_path)
    layers = attach_lora(model, LoraSpec(r_max=6, targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in layers:
            m.set_ranks(torch.randint(1, 7, (m.num_experts,), generator=g))
            for p in targets:
                m.lora_B[p].normal_(0, 0.05, generator=g)
            m.set_ranks(m.ranks())  # re-zero B beyond the mask
            for p in targets:
                m.lora_B[p].mul_(m.mask[:, None, :])
    shape = MoeShape.from_model_dir(tiny_path)
    ranks = [m.ranks().tolist() for m in layers]
    cfg = AdapterConfig(str(tiny_path), shape, "drlora", layers[0].scaling, {p: ranks for p in targets})
    write_adapter(out, cfg, adapter_tensors(layers))
    return model


@pytest.mark.parametrize("targets", [("up", "down"), ("gate", "up", "down")])
def test_round_trip(tiny_path, tmp_path, targets):
    _our_adapter(tiny_path, tmp_path / "ours", targets)
    export_peft(tmp_path / "ours", tmp_path / "peft")
    cfg, tensors = peft_to_drlora(tmp_path / "peft", MoeShape.from_model_dir(tiny_path))
    a = read_adapter(tmp_path / "ours")
    assert cfg.ranks == a.config.ranks and cfg.scaling == a.config.scaling
    assert tensors.keys() == a.tensors.keys()
    for k, v in a.tensors.items():
        assert torch.equal(tensors[k], v), k


def test_peft_loads_export_with_same_logits(tiny_path, tmp_path):
    peft = pytest.importorskip("peft")
    ours = _our_adapter(tiny_path, tmp_path / "ours", ("up", "down"), seed=1)
    export_peft(tmp_path / "ours", tmp_path / "peft")
    base = load_tiny(tiny_path)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        want, got = ours(IDS).logits, pm(IDS).logits
        plain = load_tiny(tiny_path)(IDS).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter does something
    assert (got - want).abs().max() < 1e-4


def test_import_peft_trained_uniform_lora(tiny_path, tmp_path):
    peft = pytest.importorskip("peft")
    base = load_tiny(tiny_path)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "peft")
    c, tensors = peft_to_drlora(tmp_path / "peft", MoeShape.from_model_dir(tiny_path))
    assert c.scaling == 4.0 and set(c.ranks) == {"gate", "up", "down"}
    assert c.dense_ranks == {"q_proj": [4] * 4, "v_proj": [4] * 4}
    write_adapter(tmp_path / "ours", c, tensors)  # validates
    ad = read_adapter(tmp_path / "ours")
    # the merged deltas agree with PEFT's own
    pm.eval()
    with torch.no_grad():
        for l in range(4):
            wrapper = pm.base_model.model.model.layers[l].mlp.experts
            for w in (wrapper, wrapper.base_layer):
                d = w.get_delta_weight("default")  # E, out, in
                if d.shape[1] == 256:
                    mine = torch.cat([ad.expert_delta(l, "gate"), ad.expert_delta(l, "up")], 1)
                else:
                    mine = ad.expert_delta(l, "down")
                assert torch.allclose(d, mine, atol=1e-6)
            q = pm.base_model.model.model.layers[l].self_attn.q_proj
            A, B = ad.dense_lora(l, "q_proj")
            assert torch.allclose(q.get_delta_weight("default"), ad.config.scaling * B @ A, atol=1e-6)


def test_round_trip_keeps_zero_b_ranks_and_compacts_without_metadata(tiny_path, tmp_path):
    from safetensors.torch import load_file, save_file

    _our_adapter(tiny_path, tmp_path / "ours", ("up", "down"))
    ad = read_adapter(tmp_path / "ours")
    r0 = ad.config.ranks["up"][0][0]
    ad.tensors["layers.0.experts.up.lora_B"][:, r0 - 1] = 0  # a grown, never-trained rank
    write_adapter(tmp_path / "ours", ad.config, ad.tensors)
    export_peft(tmp_path / "ours", tmp_path / "peft")
    shape = MoeShape.from_model_dir(tiny_path)
    cfg, tensors = peft_to_drlora(tmp_path / "peft", shape)
    assert cfg.ranks == ad.config.ranks  # exact, thanks to the metadata
    w = tmp_path / "peft" / "adapter_model.safetensors"
    save_file(load_file(str(w)), str(w), metadata={"format": "pt"})  # as PEFT would save it
    cfg2, tensors2 = peft_to_drlora(tmp_path / "peft", shape)
    assert cfg2.ranks["up"][0][0] == r0 - 1  # the no-op rank is dropped as padding
    assert cfg2.ranks["down"] == ad.config.ranks["down"]
    write_adapter(tmp_path / "compact", cfg2, tensors2)
    assert torch.allclose(read_adapter(tmp_path / "compact").expert_delta(0, "up"), ad.expert_delta(0, "up"))
