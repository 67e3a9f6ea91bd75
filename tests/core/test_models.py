"""Model resolution and the tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from drlora.models import ModelNotFoundError, MoeShape, resolve_model
from drlora.tiny import TinySpec, build_tiny


def test_tiny_loads_through_the_hf_path(tiny_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((tiny_path / "config.json").read_text())
    assert cfg["model_type"] == "olmoe" and 8 <= cfg["num_experts"] <= 16
    assert cfg["num_experts_per_tok"] == 2
    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    ids = tok("12 + 7 = 19", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "12 + 7 = 19"
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], cfg["vocab_size"])
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|assistant|>")


def test_tiny_is_deterministic(tmp_path):
    spec = TinySpec(num_hidden_layers=1, num_experts=8, hidden_size=32, intermediate_size=32,
                    vocab_size=512)
    a, b = build_tiny(spec, tmp_path / "a"), build_tiny(spec, tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    # the hub's per-expert layout, which transformers fuses on load
    from safetensors import safe_open

    with safe_open(str(a / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.7.up_proj.weight" in f.keys()


def test_missing_model_is_one_line_naming_what_was_tried(tmp_path):
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(str(tmp_path / "nothing-here"))
    msg = str(e.value)
    assert "\n" not in msg and "nothing-here" in msg and "tried" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_shape_from_config(tiny_path):
    s = MoeShape.from_model_dir(tiny_path)
    assert s.proj_dims("up") == (s.hidden_size, s.intermediate_size)
    assert s.proj_dims("down") == (s.intermediate_size, s.hidden_size)


def test_weights_fingerprint_tells_retrained_weights_apart(tiny_path, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from drlora.models import weights_fingerprint

    fp = weights_fingerprint(tiny_path)
    assert fp is not None and len(fp) == 16
    copy = tmp_path / "copy"
    shutil.copytree(tiny_path, copy)
    assert weights_fingerprint(copy) == fp  # same bytes, other folder
    # same shapes, one weight nudged in the middle of the file (another training run)
    sd = load_file(copy / "model.safetensors")
    names = sorted(sd)
    mid = names[len(names) // 2]
    sd[mid] = sd[mid] + 1e-3
    save_file(sd, copy / "model.safetensors", metadata={"format": "pt"})
    assert weights_fingerprint(copy) != fp
    assert weights_fingerprint(tmp_path) is None


def test_weights_fingerprint_windows_for_large_files(tiny_path, tmp_path):
    import shutil

    from drlora.models import weights_fingerprint

    copy = tmp_path / "copy"
    shutil.copytree(tiny_path, copy)
    f = copy / "model.safetensors"
    a = weights_fingerprint(copy, full_below=0, window=4096)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1  # inside the middle window
    f.write_bytes(bytes(data))
    assert weights_fingerprint(copy, full_below=0, window=4096) != a
