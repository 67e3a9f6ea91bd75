"""PEFT interop (drlora.peft) on Qwen3-MoE, Qwen2-MoE and Mixtral: export + import round trip,
PEFT loading the export onto transformers' model, and importing a LoRA made by PEFT itself
(expert target_parameters, attention and, on Qwen2-MoE, shared-expert target_modules)."""

from __future__ import annotations

import copy

import pytest
import torch

from drlora.adapter_format import AdapterConfig, expected_shapes, read_adapter, write_adapter
from drlora.models import MoeShape, resolve_model
from drlora.peft import export_peft, peft_to_drlora

from tests.family_helpers import FAMILIES, merged_hf_model

peft = pytest.importorskip("peft")
NAMES = {"qwen3_moe": "tiny-qwen3-moe", "qwen2_moe": "tiny-qwen2-moe", "mixtral": "tiny-mixtral"}
IDS = torch.tensor([[5, 17, 300, 42, 9, 700, 77, 3]])


def random_adapter(path, shape: MoeShape, seed: int):
    """Uneven per-expert ranks (some 0, none on dense-MLP layers), attention LoRA on q/v and,
    where the base has one, shared-expert LoRA; random non-zero A and B."""
    g = torch.Generator().manual_seed(seed)
    L, E = shape.num_hidden_layers, shape.num_experts
    ranks = {p: [[0] * E if l in shape.dense_layers else torch.randint(0, 5, (E,), generator=g).tolist()
                 for l in range(L)] for p in ("gate", "up", "down")}
    dense = {p: torch.randint(0, 4, (L,), generator=g).tolist() for p in ("q_proj", "v_proj")}
    if shape.shared_expert_intermediate_size:
        dense |= {p: [0 if l in shape.dense_layers else int(torch.randint(1, 4, (), generator=g)) for l in range(L)]
                  for p in ("shared_gate", "shared_up", "shared_down")}
    cfg = AdapterConfig("tiny", shape, "drlora", 2.0, ranks, dense)
    tensors = {k: torch.randn(*s, generator=g) * 0.1 for k, s in expected_shapes(cfg).items()}
    return write_adapter(path, cfg, tensors)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_export_import_round_trip_and_peft_logits(model_type, tmp_path):
    d = resolve_model(NAMES[model_type])
    shape = MoeShape.from_model_dir(d)
    random_adapter(tmp_path / "ours", shape, seed=3)
    export_peft(tmp_path / "ours", tmp_path / "peft")
    cfg, tensors = peft_to_drlora(tmp_path / "peft", shape)
    ad = read_adapter(tmp_path / "ours", shape)
    assert cfg.ranks == ad.config.ranks and cfg.dense_ranks == ad.config.dense_ranks
    assert cfg.scaling == ad.config.scaling and tensors.keys() == ad.tensors.keys()
    for k, v in ad.tensors.items():
        assert torch.equal(tensors[k], v), k
    # PEFT itself reads the export onto transformers' model: the same function as ours merged
    pm = peft.PeftModel.from_pretrained(merged_hf_model(d), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        got, want = pm(IDS).logits, merged_hf_model(d, ad)(IDS).logits
        plain = merged_hf_model(d)(IDS).logits
    assert (want - plain).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_import_a_lora_made_by_peft(model_type, tmp_path):
    d = resolve_model(NAMES[model_type])
    shape = MoeShape.from_model_dir(d)
    shared = bool(shape.shared_expert_intermediate_size)
    modules = ["q_proj", "v_proj"] + (["shared_expert.gate_proj", "shared_expert.down_proj"] if shared else [])
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=modules,
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm = peft.get_peft_model(copy.deepcopy(merged_hf_model(d)), cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "peft")
    c, tensors = peft_to_drlora(tmp_path / "peft", shape)
    assert c.scaling == 4.0 and set(c.ranks) == {"gate", "up", "down"}
    want_dense = {"q_proj", "v_proj"} | ({"shared_gate", "shared_down"} if shared else set())
    assert set(c.dense_ranks) == want_dense
    for l in range(shape.num_hidden_layers):
        sparse = shape.is_sparse(l)
        assert c.ranks["up"][l] == ([4] * shape.num_experts if sparse else [0] * shape.num_experts)
        if shared:
            assert c.dense_ranks["shared_gate"][l] == (4 if sparse else 0)
    write_adapter(tmp_path / "ours", c, tensors)  # validates
    ad = read_adapter(tmp_path / "ours", shape)
    pm.eval()
    with torch.no_grad():
        got = merged_hf_model(d, ad)(IDS).logits
        want = pm(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
