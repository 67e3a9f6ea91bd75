"""benchmarks/gpu_summary.py: the first-light figures computed from gpu_all.sh's outputs. The
kernel file is a real `kernel_bench.py --smoke` output (its format as written); the engine,
HTTP and training files hold the fields their scripts write, with chosen numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serve_helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
gs = load_benchmark("gpu_summary")


def engine_rows(decode: dict[int, float], out: dict[int, float]) -> list[dict]:
    return [{"batch": b, "decode_tok_s": decode[b], "output_tok_s": out[b]} for b in decode]


@pytest.fixture(scope="module")
def kernels_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("k") / "kernels.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_bench.py"), "--smoke", "--out", str(path)],
                   check=True, capture_output=True, cwd=ROOT)
    return path


def test_figures_and_targets(tmp_path, kernels_json):
    (tmp_path / "kernels.json").write_text(kernels_json.read_text())
    engine = {"engine": {"no_adapter": engine_rows({1: 300.0, 64: 10000.0, 256: 19000.0},
                                                   {1: 290.0, 64: 9000.0, 256: 18000.0}),
                         "adapters_16": engine_rows({1: 280.0, 64: 8500.0}, {1: 270.0, 64: 8000.0})},
              "meta": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "transformers": "5.17.0", "python": "3.12.3"}}
    (tmp_path / "engine.json").write_text(json.dumps(engine))
    (tmp_path / "serve.json").write_text(json.dumps({"config": {"concurrency": 64}, "results": {"output_tok_s": 7000.0}}))
    (tmp_path / "train_overhead.json").write_text(json.dumps({"rows": [
        {"model": "tiny (4L)", "lora": {"median_ms": 1.0, "peak_mib": None}, "drlora": {"median_ms": 9.0, "peak_mib": None}},
        {"model": "OLMoE-1B-7B shapes, 2 of 16 layers", "lora": {"median_ms": 100.0, "peak_mib": 1000.0},
         "drlora": {"median_ms": 105.0, "peak_mib": 1200.0}}]}))
    out = tmp_path / "gpu-h100.json"
    assert gs.main([str(tmp_path), "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["device"] == "NVIDIA H100 80GB HBM3" and s["versions"]["torch"] == "2.11.0"
    assert s["versions"]["triton"]  # from the kernel file's env
    assert s["decode_tok_s"] == {"1": 300.0, "64": 10000.0, "256": 19000.0}
    assert s["adapters16_ratio_b64"] == pytest.approx(0.85)
    assert s["http_vs_offline_b64"] == pytest.approx(7000 / 8000)
    assert s["train_drlora_vs_lora"] == {"time": pytest.approx(1.05), "memory": pytest.approx(1.2)}
    rows = {r["tokens"]: r for r in json.loads(kernels_json.read_text())["rows"]}
    assert s["rank_exact_vs_padded"]["64"] == pytest.approx(rows[64]["exact_vs_padded_lora_part"])
    assert s["fused_moe_vs_grouped_mm_min"] == pytest.approx(min(r["fused_vs_grouped_mm"] for r in rows.values()))
    met = s["met"]
    assert met["decode_tok_s.1"] is True and met["decode_tok_s.64"] is True and met["decode_tok_s.256"] is False
    assert met["adapters16_ratio_b64"] is False and met["http_vs_offline_b64"] is True
    assert met["train_drlora_vs_lora.time"] is True and met["train_drlora_vs_lora.memory"] is False
    for key in ("device", "date", "versions", "command"):
        assert s[key]


def test_missing_inputs_are_null(tmp_path):
    out = tmp_path / "s.json"
    assert gs.main([str(tmp_path), "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["decode_tok_s"] == {"1": None, "64": None, "256": None}
    assert s["fused_moe_vs_grouped_mm_min"] is None and s["http_vs_offline_b64"] is None
    assert set(s["met"].values()) == {None}
    assert gs.main([str(tmp_path / "nope")]) == 2


def test_structured_host_ratio(tmp_path):
    """The host stage's rounds: medians of the device-0 steps, half constrained / none."""
    def write(kind, rnd, ms):
        rows = [{"batch": 64, "device_ms": 0, "host_ms_per_step": ms}, {"batch": 64, "device_ms": 4.6, "host_ms_per_step": 9.0}]
        (tmp_path / f"host_constrained_{kind}_r{rnd}.json").write_text(json.dumps({"offline": rows}))

    for rnd, (none, half, inline) in enumerate([(0.40, 0.58, 0.62), (0.38, 0.70, 0.60), (0.50, 0.59, 0.61)], 1):
        write("0", rnd, none)
        write("0.5", rnd, half)
        write("inline", rnd, inline)
    s = gs.summarize(tmp_path)
    assert s["structured_half_vs_none_device0"] == pytest.approx(0.59 / 0.40)
    assert s["structured_half_vs_none_device0_inline"] == pytest.approx(0.61 / 0.40)
    assert s["met"]["structured_half_vs_none_device0"] is True
