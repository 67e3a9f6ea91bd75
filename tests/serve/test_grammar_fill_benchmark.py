"""benchmarks/grammar_fill.py on the tiny tokenizer, a few steps: the table and the JSON."""

from __future__ import annotations

import json

from serve_helpers import load_benchmark

bench = load_benchmark("grammar_fill")


def test_smoke_run(tmp_path, capsys):
    out = tmp_path / "fill.json"
    bench.main(["--rows", "1", "3", "--threads", "1", "2", "--steps", "4", "--out", str(out)])
    res = json.loads(out.read_text())
    assert [r["rows"] for r in res["rows"]] == [1, 3]
    for r in res["rows"]:
        assert r["inline_us"] > 0 and r["pool1_us"] > 0 and r["pool2_us"] > 0
        assert r["inline_advance_us"] > 0 and r["pool1_advance_us"] > 0 and r["pool2_advance_us"] > 0
    assert res["meta"]["vocab"] == 849 and not res["meta"]["bpe_trained"]
    assert "pool(2)" in capsys.readouterr().out
