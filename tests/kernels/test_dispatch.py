"""Package import without triton, and backend selection."""

import subprocess
import sys
from pathlib import Path

import torch

from kernels._dispatch import use_triton


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import kernels, torch\n"
        "from kernels import fused_moe\n"
        "assert 'kernels._tl.moe_gemm' not in sys.modules\n"
        "h = torch.randn(2, 8); w = torch.randn(3, 8, 8); d = torch.randn(3, 8, 4)\n"
        "ids = torch.tensor([[0, 2], [1, 0]], dtype=torch.int32)\n"
        "print(fused_moe(h, w, d, torch.ones(2, 2), ids).shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "", "DRLORA_FORCE_TRITON": "0"},
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr
    assert "torch.Size([2, 8])" in res.stdout


def test_cpu_uses_twin(monkeypatch):
    monkeypatch.delenv("DRLORA_FORCE_TRITON", raising=False)
    assert not use_triton(torch.zeros(1))
    monkeypatch.setenv("DRLORA_FORCE_TRITON", "1")
    assert use_triton(torch.zeros(1))
