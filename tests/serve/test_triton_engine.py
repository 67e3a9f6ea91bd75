"""The whole engine on the Triton kernels (interpreter on CPU) gives the twins' outputs.

Runs in a subprocess: TRITON_INTERPRET must be set before triton compiles anything. The
engine (tiny model, fp32) serves base and adapter requests with a shared prompt prefix (so
prefix caching makes a prefill chunk with a cached prefix), chunked prefill and decode; the
same requests run with DRLORA_FORCE_TRITON=1 and without, and the greedy tokens and their
logprobs must agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r'''
import json, os, sys
sys.path.insert(0, sys.argv[3])
import torch
torch.set_num_threads(1)
from pathlib import Path
from serve_helpers import make_engine, run_all
from drlora_serve.types import SamplingParams
from transformers import AutoTokenizer
tiny, adapters = Path(sys.argv[1]), sys.argv[2]
tok = AutoTokenizer.from_pretrained(str(tiny))
prefix = "The quick brown fox jumps over the lazy dog and "
prompts = [(prefix + "runs", None), (prefix + "sleeps", "a"), ("Once upon a time", "b"), (prefix + "eats", "c")]
sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=0)
result = {}
for mode in ("twin", "triton"):
    os.environ["DRLORA_FORCE_TRITON"] = "1" if mode == "triton" else "0"
    eng = make_engine(tiny, tok, adapters_dir=adapters, max_num_batched_tokens=16, block_size=4)
    eng.add_request("warm", tok.encode(prefix + "x"), sp, None)
    run_all(eng)  # the prefix is now cached: later prompts get a prefill chunk with a cached prefix
    for i, (p, a) in enumerate(prompts):
        eng.add_request(f"r{i}", tok.encode(p), sp, a)
    outs = run_all(eng)
    result[mode] = {rid: {"ids": o.outputs[0].token_ids,
                          "lp": [t.logprob for t in o.outputs[0].logprobs]}
                    for rid, o in outs.items()}
    result[mode + "_cache_hits"] = eng.blocks.num_cache_hits
print("RESULT" + json.dumps(result, default=float))
'''


def test_engine_on_triton_kernels_matches_twins(tiny_dir, adapters_dir, tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    here = str(Path(__file__).resolve().parent)
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_dir), str(adapters_dir), here], env=env,
                         capture_output=True, text=True, timeout=600, cwd=str(Path(here).parent.parent))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    twin, tri = out["twin"], out["triton"]
    assert out["triton_cache_hits"] > 0  # a prefill chunk attended over a cached prefix
    assert set(twin) == set(tri) and len(twin) == 4
    for rid in twin:
        assert tri[rid]["ids"] == twin[rid]["ids"], rid
        for a, b in zip(tri[rid]["lp"], twin[rid]["lp"]):
            assert abs(a - b) < 1e-3, (rid, a, b)
