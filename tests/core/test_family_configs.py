"""drlora.families (what each config means), the real-shape presets and the format's family fields."""

from __future__ import annotations

import json

import pytest
import torch

from drlora.adapter_format import (AdapterConfig, AdapterFormatError, load_config, read_adapter,
                                   write_adapter)
from drlora.families import MoeArch, UnsupportedModelError, check_supported, dense_layers, sliding_window
from drlora.models import PRESETS, MoeShape, resolve_model


@pytest.mark.parametrize("alias", sorted(PRESETS))
def test_presets_are_the_real_shapes(alias, tmp_path, monkeypatch):
    monkeypatch.setenv("DRLORA_HOME", str(tmp_path))
    a = MoeArch.from_config(PRESETS[alias])
    s = MoeShape.from_config(PRESETS[alias])
    want = {"olmoe": (16, 64, 8, 1024, 0), "qwen3-moe": (48, 128, 8, 768, 0),
            "qwen2-moe": (24, 60, 4, 1408, 5632), "mixtral": (32, 8, 2, 14336, 0)}[alias]
    assert (a.num_layers, a.num_experts, a.top_k, a.expert_size, a.shared_size) == want
    assert (s.num_hidden_layers, s.num_experts, s.intermediate_size, s.shared_expert_intermediate_size) == \
        (want[0], want[1], want[3], want[4])
    assert a.dense_layers == () and s.dense_layers == ()
    # --load-format dummy resolves the alias without the hub: preset config + a real tokenizer
    folder = resolve_model(alias, dummy=True)
    assert json.loads((folder / "config.json").read_text()) == PRESETS[alias]
    assert (folder / "tokenizer.json").is_file()


def test_family_switches_follow_transformers():
    q3 = MoeArch.from_config(PRESETS["qwen3-moe"])
    assert q3.family.qk_norm == "head" and q3.norm_topk and q3.head_dim == 128 and q3.attn_bias == ()
    q2 = MoeArch.from_config(PRESETS["qwen2-moe"])
    assert q2.attn_bias == ("q", "k", "v") and not q2.norm_topk  # qkv_bias defaults on
    assert MoeArch.from_config({**PRESETS["qwen2-moe"], "qkv_bias": False}).attn_bias == ()
    mx = MoeArch.from_config(PRESETS["mixtral"])
    assert mx.norm_topk and not mx.family.cast_routing and mx.head_dim == 128 and mx.num_kv_heads == 8
    assert MoeArch.from_config({**PRESETS["mixtral"], "norm_topk_prob": False}).norm_topk  # always, as transformers
    ol = MoeArch.from_config(PRESETS["olmoe"])
    assert ol.family.qk_norm == "full" and ol.family.cast_routing and not ol.norm_topk


def test_dense_layers_match_transformers_decoder_layers():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    small = dict(vocab_size=32, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=6,
                 num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    for cls, mcls, extra in ((Qwen3MoeConfig, Qwen3MoeForCausalLM, {}),
                             (Qwen2MoeConfig, Qwen2MoeForCausalLM, {"shared_expert_intermediate_size": 8})):
        for kw in ({"decoder_sparse_step": 2}, {"mlp_only_layers": [0, 4]}, {"decoder_sparse_step": 3, "mlp_only_layers": [2]}):
            cfg = cls(**small, **extra, **kw)
            model = mcls(cfg)
            want = tuple(l for l, layer in enumerate(model.model.layers) if not hasattr(layer.mlp, "experts"))
            assert dense_layers(cfg.to_dict()) == want == dense_layers(cfg), kw
            assert MoeShape.from_config(cfg.to_dict()).dense_layers == want


def test_unsupported_configs_are_refused_in_one_line():
    q2 = PRESETS["qwen2-moe"]
    assert sliding_window(q2) is None  # sliding_window set but use_sliding_window false
    with pytest.raises(UnsupportedModelError, match="sliding_window=4096 < max_position_embeddings=8192"):
        check_supported({**q2, "use_sliding_window": True, "sliding_window": 4096})
    check_supported({**q2, "use_sliding_window": True, "sliding_window": 8192})  # never shorter than the context
    with pytest.raises(UnsupportedModelError, match="sliding"):
        check_supported({**PRESETS["mixtral"], "sliding_window": 4096})
    with pytest.raises(UnsupportedModelError, match="rope_type 'yarn'"):
        check_supported({**PRESETS["qwen3-moe"], "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedModelError, match="rope_type 'linear'"):
        check_supported({**PRESETS["mixtral"], "rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}})
    with pytest.raises(UnsupportedModelError, match="gelu"):
        check_supported({**PRESETS["mixtral"], "hidden_act": "gelu"})
    with pytest.raises(UnsupportedModelError, match="not supported"):
        MoeArch.from_config({**PRESETS["mixtral"], "model_type": "deepseek_v3"})


SHARED_SHAPE = MoeShape("qwen2_moe", 3, 4, 16, 8, 2, 2, 8, shared_expert_intermediate_size=12, dense_layers=(1,))


def _adapter(shape, ranks, dense_ranks=None, router=False):
    cfg = AdapterConfig("x", shape, "drlora", 2.0, ranks, dense_ranks or {}, train_router=router)
    from drlora.adapter_format import expected_shapes

    try:
        shapes = expected_shapes(cfg)
    except ValueError as exc:  # an unknown projection for this shape
        raise AdapterFormatError(str(exc)) from None
    return cfg, {k: torch.randn(*s) * 0.1 for k, s in shapes.items()}


def test_shared_expert_lora_and_dense_layers_in_the_format(tmp_path):
    ranks = {"up": [[1, 2, 0, 3], [0, 0, 0, 0], [2, 2, 2, 2]]}
    cfg, t = _adapter(SHARED_SHAPE, ranks, {"shared_up": [2, 0, 3], "q_proj": [1, 1, 1]}, router=True)
    assert "layers.0.shared_expert.up.lora_A" in t and t["layers.2.shared_expert.up.lora_B"].shape == (12, 3)
    assert "layers.1.router.weight" not in t and "layers.2.router.weight" in t
    write_adapter(tmp_path / "ok", cfg, t)
    back = read_adapter(tmp_path / "ok", SHARED_SHAPE)
    assert back.config.base_shape == SHARED_SHAPE and back.config.dense_ranks["shared_up"] == [2, 0, 3]
    raw = json.loads((tmp_path / "ok" / "drlora_adapter.json").read_text())["base_shape"]
    assert raw["dense_layers"] == [1] and raw["shared_expert_intermediate_size"] == 12
    with pytest.raises(AdapterFormatError, match="layer 1, a dense-MLP layer"):
        write_adapter(tmp_path / "bad", *_adapter(SHARED_SHAPE, {"up": [[1] * 4] * 3}))
    with pytest.raises(AdapterFormatError, match="dense-MLP layer"):
        write_adapter(tmp_path / "bad", *_adapter(SHARED_SHAPE, ranks, {"shared_down": [1, 1, 1]}))
    olmoe = MoeShape("olmoe", 3, 4, 16, 8, 2, 2, 8)
    with pytest.raises(AdapterFormatError, match="no shared expert"):
        write_adapter(tmp_path / "bad", *_adapter(olmoe, {"up": [[1] * 4] * 3}, {"shared_up": [1, 1, 1]}))
    with pytest.raises(AdapterFormatError, match="model_type=qwen2_moe but the base model has olmoe"):
        read_adapter(tmp_path / "ok", MoeShape("olmoe", *list(vars(SHARED_SHAPE).values())[1:8]))


def test_olmoe_adapters_keep_the_old_config(tmp_path):
    """An OLMoE adapter's base_shape is written without the new fields (older readers take
    it), and an adapter written before they existed reads as an OLMoE one."""
    shape = MoeShape("olmoe", 2, 4, 16, 8, 2, 2, 8)
    write_adapter(tmp_path / "a", *_adapter(shape, {"up": [[1, 0, 2, 1], [1, 1, 1, 1]]}))
    raw = json.loads((tmp_path / "a" / "drlora_adapter.json").read_text())
    assert set(raw["base_shape"]) == {"model_type", "num_hidden_layers", "num_experts", "hidden_size",
                                      "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"}
    assert load_config(tmp_path / "a").base_shape == shape
