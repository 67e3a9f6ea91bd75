"""Launches per layer in one decode step (benchmarks/launch_count.py) stay under issue 12's
ceilings: <= 12 without adapters, <= 18 with two adapters (expert LoRA), and the decode step has
no host sync. Runs the benchmark script itself (one layer of the tiny model, bf16, Triton path
in the interpreter), so the figure it prints is the one held here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CEILINGS = {"per_layer_base": 12, "per_layer_lora": 18}


def test_launches_per_layer_under_ceilings(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "launches.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "launch_count.py"), "--layers", "1", "--out",
                          str(out)], env=env, capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr[-3000:]
    counts = json.loads(out.read_text())
    for key, ceiling in CEILINGS.items():
        assert 0 < counts[key] <= ceiling, (key, counts[key], res.stdout)
    for setup in ("base", "lora"):
        assert counts[setup]["host_syncs"] == 0, counts[setup]
        assert counts[setup]["triton_per_layer"] >= 6, "the fused kernels ran (not the twins)"
    assert counts["lora"]["layer0_ops"].get("triton.lora_shrink_kernel") == 2, "the adapters' LoRA ran"
