"""benchmarks/engine.py on the CPU: the whole script in its smoke mode (warm-ups, the prefill /
decode split, the padded-LoRA series, transformers' generate, the table and the JSON), and the
padded adapters it builds."""

from __future__ import annotations

import json

import torch

from serve_helpers import load_benchmark

bench = load_benchmark("engine")


def test_smoke_run(tmp_path, capsys):
    out = tmp_path / "engine.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["engine"]) == {"no_adapter", "adapters_2", "padded_2"}
    for rows in res["engine"].values():
        assert [r["batch"] for r in rows] == [1, 4]
        for r in rows:
            assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["per_token_latency_ms"] > 0
            assert r["decode_steps"] == r["eager_decode_steps"] == 5  # 6 tokens: 1 from the prefill
            assert r["graph_replays"] == 0  # CPU: no graphs
            assert r["prefix_cache_hits"] == 0  # fresh prompts: the warm-up's are not reused
    assert res["engine"]["no_adapter"][0]["decode_tokens"] == 5
    assert [r["batch"] for r in res["hf_generate"]] == [1, 2]
    assert res["steady_state_check"] == {"ok": True, "problems": []}
    assert res["cuda_graphs"]["enabled"] is False
    assert res["adapter_memory"]["pool_sized_for_padded"] is True
    text = capsys.readouterr().out
    assert "engine, 2 padded r32" in text and "transformers generate" in text and "steady state: OK" in text


def test_padded_adapter_is_the_same_adapter(tiny_shape):
    a = bench.make_adapter(tiny_shape, 7, torch.device("cpu"), torch.float32)
    p = bench.pad_adapter(a, 32)
    for proj, per_layer in a.config.ranks.items():
        for l, r in enumerate(per_layer):
            if not tiny_shape.is_sparse(l):
                assert set(p.config.ranks[proj][l]) == {0}
                continue
            assert p.config.ranks[proj][l] == [32] * len(r)
            A, B = a.tensors[f"layers.{l}.experts.{proj}.lora_A"], a.tensors[f"layers.{l}.experts.{proj}.lora_B"]
            PA, PB = p.tensors[f"layers.{l}.experts.{proj}.lora_A"], p.tensors[f"layers.{l}.experts.{proj}.lora_B"]
            off = 0
            for e, r_e in enumerate(r):
                # expert e's delta B_e A_e is unchanged by the zero rows
                d = B[:, off:off + r_e] @ A[off:off + r_e]
                pd = PB[:, e * 32:(e + 1) * 32] @ PA[e * 32:(e + 1) * 32]
                torch.testing.assert_close(pd, d)
                assert not PA[e * 32 + r_e:(e + 1) * 32].any()
                off += r_e
