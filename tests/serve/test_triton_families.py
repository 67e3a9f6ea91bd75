"""The engine on the Triton kernels (interpreter on CPU) gives the twins' outputs on Qwen3-MoE
(per-head q/k norm, head_dim 24, GQA, a dense-MLP layer) and Qwen2-MoE (q/k/v biases, dense
LoRA into column slices of the shared expert's fused gate/up output). Subprocess: TRITON_INTERPRET
must be set before triton compiles anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drlora.models import MoeShape
from drlora.tiny_families import ensure_tiny_family

from serve_helpers import make_adapter

SCRIPT = r'''
import json, os, sys
sys.path.insert(0, sys.argv[3])
import torch
torch.set_num_threads(1)
from pathlib import Path
from serve_helpers import make_engine, run_all
from drlora_serve.types import SamplingParams
from transformers import AutoTokenizer
model, adapters = Path(sys.argv[1]), sys.argv[2]
tok = AutoTokenizer.from_pretrained(str(model))
prefix = "The quick brown fox jumps over the lazy dog and "
prompts = [(prefix + "runs", None), (prefix + "sleeps", "a"), ("Once upon a time", "b")]
sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=0)
result = {}
for mode in ("twin", "triton"):
    os.environ["DRLORA_FORCE_TRITON"] = "1" if mode == "triton" else "0"
    eng = make_engine(model, tok, adapters_dir=adapters, max_num_batched_tokens=16, block_size=4)
    eng.add_request("warm", tok.encode(prefix + "x"), sp, None)
    run_all(eng)  # a cached prefix for the next prompts
    for i, (p, a) in enumerate(prompts):
        eng.add_request(f"r{i}", tok.encode(p), sp, a)
    outs = run_all(eng)
    result[mode] = {rid: {"ids": o.outputs[0].token_ids, "lp": [t.logprob for t in o.outputs[0].logprobs]}
                    for rid, o in outs.items()}
print("RESULT" + json.dumps(result, default=float))
'''


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe"])
def test_family_engine_on_triton_kernels_matches_twins(model_type, tmp_path):
    pytest.importorskip("triton")
    d = ensure_tiny_family(model_type)
    shape = MoeShape.from_model_dir(d)
    make_adapter(tmp_path / "a", shape, seed=11, max_rank=8, dense=True, shared=bool(shape.shared_expert_intermediate_size))
    make_adapter(tmp_path / "b", shape, seed=12, max_rank=12, router=True, targets=("up", "down"))
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    here = str(Path(__file__).resolve().parent)
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(d), str(tmp_path), here], env=env,
                         capture_output=True, text=True, timeout=600, cwd=str(Path(here).parent.parent))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    twin, tri = out["twin"], out["triton"]
    assert set(twin) == set(tri) and len(twin) == 3
    for rid in twin:
        assert tri[rid]["ids"] == twin[rid]["ids"], rid
        for a, b in zip(tri[rid]["lp"], twin[rid]["lp"]):
            assert abs(a - b) < 1e-3, (rid, a, b)
