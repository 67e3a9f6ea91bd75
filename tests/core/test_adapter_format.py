"""The adapter format: round trip, and every validation failure refused with its message."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from drlora.adapter_format import (
    CONFIG_NAME, WEIGHTS_NAME, AdapterConfig, AdapterFormatError, NotAnAdapterError,
    expected_shapes, is_adapter_dir, key, read_adapter, validate_adapter, write_adapter,
)
from drlora.models import MoeShape


def make(shape: MoeShape, seed: int = 0, dense: bool = False) -> tuple[AdapterConfig, dict]:
    g = torch.Generator().manual_seed(seed)
    L, E = shape.num_hidden_layers, shape.num_experts
    ranks = {p: [[int(x) for x in torch.randint(0, 9, (E,), generator=g)] for _ in range(L)]
             for p in ("up", "down")}
    cfg = AdapterConfig(base_model="tiny", base_shape=shape, method="drlora", scaling=2.0,
                        ranks=ranks, dense_ranks={"q_proj": [4] * L} if dense else {},
                        provenance={"test": True})
    tensors = {k: torch.randn(s, generator=g) for k, s in expected_shapes(cfg).items()}
    return cfg, tensors


SHAPE = MoeShape("olmoe", 2, 5, 24, 16, 4, 4, 6)


def test_round_trip_packs_only_active_ranks(tmp_path):
    cfg, tensors = make(SHAPE, dense=True)
    write_adapter(tmp_path / "a", cfg, tensors)
    assert is_adapter_dir(tmp_path / "a")
    ad = read_adapter(tmp_path / "a", SHAPE)
    assert ad.config.ranks == cfg.ranks and ad.config.dense_ranks == cfg.dense_ranks
    for k, t in tensors.items():
        torch.testing.assert_close(ad.tensors[k], t)
    # no padding: lora_A rows == sum of the layer's ranks
    A, B, ranks = ad.expert_lora(1, "down")
    assert A.shape[0] == sum(ranks) == B.shape[1]
    # expert_delta is scale * B_e @ A_e at the expert's offset
    e = max(range(SHAPE.num_experts), key=lambda i: ranks[i])
    off = sum(ranks[:e])
    want = 2.0 * B[:, off:off + ranks[e]] @ A[off:off + ranks[e]]
    torch.testing.assert_close(ad.expert_delta(1, "down")[e], want)
    n = sum(sum(map(sum, r)) for r in cfg.ranks.values())
    assert ad.config.num_parameters() == sum(t.numel() for t in tensors.values())
    assert ad.config.total_ranks() == n + 4 * SHAPE.num_hidden_layers


def test_not_mistaken_for_peft(tmp_path):
    cfg, tensors = make(SHAPE)
    write_adapter(tmp_path, cfg, tensors)
    assert not (tmp_path / "adapter_config.json").exists()
    assert not (tmp_path / "adapter_model.safetensors").exists()


def refuses(tmp_path, match: str, base: MoeShape | None = None, exc=AdapterFormatError):
    with pytest.raises(exc, match=match):
        validate_adapter(tmp_path, base)


def test_missing_files(tmp_path):
    refuses(tmp_path / "nope", "is not a folder", exc=NotAnAdapterError)
    refuses(tmp_path, f"has no {CONFIG_NAME}", exc=NotAnAdapterError)
    cfg, tensors = make(SHAPE)
    write_adapter(tmp_path, cfg, tensors)
    (tmp_path / WEIGHTS_NAME).unlink()
    refuses(tmp_path, f"has no {WEIGHTS_NAME}")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    refuses(tmp_path, "only safetensors weights are accepted")


def test_not_safetensors(tmp_path):
    cfg, tensors = make(SHAPE)
    write_adapter(tmp_path, cfg, tensors)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x80\x04\x95 this is a pickle, not safetensors")
    refuses(tmp_path, "is not a safetensors file")


def test_bad_json_and_config(tmp_path):
    cfg, tensors = make(SHAPE)
    write_adapter(tmp_path, cfg, tensors)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    refuses(tmp_path, "is not valid JSON")
    d = cfg.to_json()
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**d, "format": "peft"}))
    refuses(tmp_path, "expected 'drlora-moe-lora'")
    (tmp_path / CONFIG_NAME).write_text(json.dumps({k: v for k, v in d.items() if k != "ranks"}))
    refuses(tmp_path, "malformed adapter config")
    bad = json.loads(json.dumps(d))
    bad["ranks"]["up"][0] = bad["ranks"]["up"][0][:-1]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(bad))
    refuses(tmp_path, r"ranks\['up'\] must be 2 layers x 5 experts")
    bad = json.loads(json.dumps(d))
    bad["ranks"]["up"][0][0] = True  # a JSON boolean is no rank (Python's True == 1)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(bad))
    refuses(tmp_path, r"ranks\['up'\] must hold non-negative integers")
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**d, "format_version": 99}))
    refuses(tmp_path, "newer than this drlora")


def test_shapes_disagree_with_ranks(tmp_path):
    cfg, tensors = make(SHAPE)
    write_adapter(tmp_path, cfg, tensors)
    t = load_file(str(tmp_path / WEIGHTS_NAME))
    k = key(0, "up", "lora_A")
    t[k] = torch.randn(t[k].shape[0] + 1, t[k].shape[1])
    save_file(t, str(tmp_path / WEIGHTS_NAME))
    refuses(tmp_path, f"tensor {k} has shape")
    del t[k]
    save_file(t, str(tmp_path / WEIGHTS_NAME))
    refuses(tmp_path, f"missing tensor {k}")


def test_nan_inf_refused(tmp_path):
    cfg, tensors = make(SHAPE)
    k = key(1, "down", "lora_B")
    for bad in (math.nan, math.inf):
        t = dict(tensors)
        t[k] = t[k].clone()
        t[k].view(-1)[0] = bad
        with pytest.raises(AdapterFormatError, match="NaN or inf"):
            write_adapter(tmp_path / "w", cfg, t)
        write_adapter(tmp_path, cfg, tensors)
        save_file({**tensors, k: t[k]}, str(tmp_path / WEIGHTS_NAME))
        refuses(tmp_path, "NaN or inf")


def test_integer_weights_refused(tmp_path):
    cfg, tensors = make(SHAPE)
    write_adapter(tmp_path, cfg, tensors)
    k = key(1, "down", "lora_B")
    save_file({**tensors, k: tensors[k].to(torch.int32)}, str(tmp_path / WEIGHTS_NAME))
    refuses(tmp_path, f"tensor {k} is int32, not floating point")


def test_base_model_must_fit(tmp_path):
    cfg, tensors = make(SHAPE)
    write_adapter(tmp_path, cfg, tensors)
    validate_adapter(tmp_path, SHAPE)
    refuses(tmp_path, "num_experts=5 but the base model has 8", replace(SHAPE, num_experts=8))
    refuses(tmp_path, "hidden_size=24 but the base model has 32", replace(SHAPE, hidden_size=32))


def test_write_refuses_bad_input(tmp_path):
    cfg, tensors = make(SHAPE)
    with pytest.raises(AdapterFormatError, match="unexpected tensor"):
        write_adapter(tmp_path, cfg, {**tensors, "extra": torch.zeros(1)})
    with pytest.raises(AdapterFormatError, match="unknown expert projection"):
        write_adapter(tmp_path, replace(cfg, ranks={"fc1": cfg.ranks["up"]}), tensors)
    assert not is_adapter_dir(tmp_path)


def test_rewrite_caught_between_renames_is_refused(tmp_path):
    """A reader between write_adapter's two renames sees B's weights with A's config; with
    agreeing shapes only the write ids tell them apart."""
    a_cfg, a_t = make(SHAPE, seed=1)
    b_t = {k: torch.randn_like(v) for k, v in a_t.items()}  # same ranks and shapes, other weights
    write_adapter(tmp_path / "a", a_cfg, a_t)
    write_adapter(tmp_path / "b", replace(a_cfg, method="static"), b_t)
    assert read_adapter(tmp_path / "a").config.write_id  # the id is there (and differs from b's)
    assert read_adapter(tmp_path / "a").config.write_id != read_adapter(tmp_path / "b").config.write_id
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes((tmp_path / "b" / WEIGHTS_NAME).read_bytes())
    refuses(tmp_path / "a", "being rewritten.*config and weights come from different writes")
    # the rewrite completes: consistent again
    (tmp_path / "a" / CONFIG_NAME).write_text((tmp_path / "b" / CONFIG_NAME).read_text())
    assert read_adapter(tmp_path / "a").config.method == "static"


def test_adapter_without_write_id_still_loads(tmp_path):
    """Adapters written before write ids existed carry none, in either file."""
    cfg, tensors = make(SHAPE, seed=2)
    write_adapter(tmp_path, cfg, tensors)
    d = json.loads((tmp_path / CONFIG_NAME).read_text())
    del d["write_id"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(d))
    save_file(load_file(str(tmp_path / WEIGHTS_NAME)), str(tmp_path / WEIGHTS_NAME),
              metadata={"format": "drlora-moe-lora", "format_version": "1"})
    ad = read_adapter(tmp_path)
    assert ad.config.write_id == "" and "write_id" not in ad.config.to_json()


def test_files_are_written_with_the_umask_mode(tmp_path):
    """safetensors creates 0600; a server running as another user must read the weights."""
    import os
    import stat

    from drlora.peft import export_peft

    old = os.umask(0o022)
    try:
        cfg, tensors = make(SHAPE, seed=3)
        write_adapter(tmp_path / "a", cfg, tensors)
        export_peft(tmp_path / "a", tmp_path / "p")
    finally:
        os.umask(old)
    for f in (tmp_path / "a" / WEIGHTS_NAME, tmp_path / "a" / CONFIG_NAME,
              tmp_path / "p" / "adapter_model.safetensors", tmp_path / "p" / "adapter_config.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no .tmp left
