"""Checkpoint layouts: hub per-expert keys, v5 fused expert keys, sharded with an index."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import save_file

from drlora_serve.models.olmoe import OlmoeForServing
from drlora_serve.weights import WeightSource


def test_fused_and_sharded_layouts_load_identically(tiny_dir, tmp_path):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    ref = OlmoeForServing.from_pretrained(tiny_dir, cfg, torch.float32, torch.device("cpu"))
    src = WeightSource(tiny_dir)
    E = cfg["num_experts"]
    fused, rest = {}, {}
    for name in src.names():
        if ".mlp.experts." not in name:
            rest[name] = src.get(name)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}.mlp.experts"
        fused[f"{p}.gate_up_proj"] = torch.stack([torch.cat([src.get(f"{p}.{e}.gate_proj.weight"),
                                                             src.get(f"{p}.{e}.up_proj.weight")]) for e in range(E)])
        fused[f"{p}.down_proj"] = torch.stack([src.get(f"{p}.{e}.down_proj.weight") for e in range(E)])
    out = tmp_path / "fused"
    out.mkdir()
    shutil.copy(tiny_dir / "config.json", out / "config.json")
    save_file(rest, str(out / "model-00001-of-00002.safetensors"))
    save_file(fused, str(out / "model-00002-of-00002.safetensors"))
    wmap = {k: "model-00001-of-00002.safetensors" for k in rest} | {k: "model-00002-of-00002.safetensors" for k in fused}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    got = OlmoeForServing.from_pretrained(out, cfg, torch.float32, torch.device("cpu"))
    for a, b in zip(ref.layers, got.layers):
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    torch.testing.assert_close(ref.lm_head, got.lm_head, atol=0, rtol=0)
