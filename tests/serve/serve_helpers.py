"""Helpers for the engine tests: random rank-exact adapters, small engines (CPU, fp32)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from drlora.adapter_format import AdapterConfig, key, write_adapter
from drlora.models import MoeShape

from drlora_serve.config import EngineArgs
from drlora_serve.engine import LLMEngine


def make_adapter(path, shape: MoeShape, seed: int, max_rank: int = 8, dense: bool = False, router: bool = False,
                 scaling: float = 2.0, std: float = 0.05, targets=("gate", "up", "down"), fixed_rank: int | None = None,
                 shared: bool = False):
    """Random non-zero adapter; per-(layer, expert) ranks drawn in [0, max_rank] (some zero; all
    zero on dense-MLP layers). `shared`: dense LoRA on a Qwen2-MoE shared expert too."""
    g = torch.Generator().manual_seed(seed)
    L, E = shape.num_hidden_layers, shape.num_experts
    ranks = {p: [[int(x) for x in torch.randint(0, max_rank + 1, (E,), generator=g)] for _ in range(L)] for p in targets}
    if fixed_rank is not None:
        ranks = {p: [[fixed_rank] * E for _ in range(L)] for p in targets}
    for per_layer in ranks.values():
        for l in shape.dense_layers:
            per_layer[l] = [0] * E
    dense_ranks = {p: [int(x) for x in torch.randint(1, 5, (L,), generator=g)] for p in ("q_proj", "v_proj", "o_proj")} if dense else {}
    if shared:
        dense_ranks |= {p: [0 if l in shape.dense_layers else int(torch.randint(1, 7, (), generator=g)) for l in range(L)]
                        for p in ("shared_gate", "shared_up", "shared_down")}
    cfg = AdapterConfig(base_model="tiny", base_shape=shape, method="dr-lora", scaling=scaling, ranks=ranks,
                        dense_ranks=dense_ranks, train_router=router)
    tensors = {}
    for p, per_layer in ranks.items():
        i, o = shape.proj_dims(p)
        for l, r in enumerate(per_layer):
            if l in shape.dense_layers:
                continue
            tensors[f"layers.{l}.experts.{p}.lora_A"] = torch.randn(sum(r), i, generator=g) * std
            tensors[f"layers.{l}.experts.{p}.lora_B"] = torch.randn(o, sum(r), generator=g) * std
    for p, r in dense_ranks.items():
        i, o = shape.proj_dims(p)
        for l in range(L):
            if p.startswith("shared_") and l in shape.dense_layers:
                continue
            tensors[key(l, p, "lora_A")] = torch.randn(r[l], i, generator=g) * std
            tensors[key(l, p, "lora_B")] = torch.randn(o, r[l], generator=g) * std
    if router:
        for l in shape.sparse_layers:
            tensors[f"layers.{l}.router.weight"] = torch.randn(E, shape.hidden_size, generator=g) * 0.1
    return write_adapter(path, cfg, tensors)


def engine_args(tiny_dir, **kw) -> EngineArgs:
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("max_loras", 4)
    kw.setdefault("lora_pool_rank_rows", 1024)
    kw.setdefault("lora_dense_rank_rows", 64)
    kw.setdefault("dtype", "float32")
    kw.setdefault("device", "cpu")
    return EngineArgs(model=str(tiny_dir), **kw)


def make_engine(tiny_dir, tokenizer, **kw) -> LLMEngine:
    return LLMEngine(engine_args(tiny_dir, **kw), model_dir=tiny_dir, tokenizer=tokenizer)


def run_all(engine: LLMEngine, max_steps: int = 10_000) -> dict:
    done = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert not engine.has_unfinished(), "engine did not finish"
    return done


def run_all_with_logits(engine: LLMEngine) -> tuple[dict, dict, dict]:
    """run_all, also collecting the engine's raw logits per request id: (outputs, prompt rows
    (P - 1, V) in position order, generated rows (G, V)), read from each launched step."""
    captured = []
    launch = engine.runner.launch

    def spy(batch):
        step = launch(batch)
        captured.append(step)
        return step

    engine.runner.launch = spy
    try:
        outs = run_all(engine)
    finally:
        engine.runner.launch = launch
    prompt_rows: dict = {}
    gen_rows: dict = {}
    for step in captured:
        for seq, start, rows in step.prompt_logits:
            prompt_rows.setdefault(seq.request.request_id, []).append((start, rows))
        for j, seq in enumerate(step.sample_seqs):
            gen_rows.setdefault(seq.request.request_id, []).append(step.sample_logits[j])
    prompt_logits = {r: torch.cat([rows for _, rows in sorted(v, key=lambda x: x[0])]) for r, v in prompt_rows.items()}
    gen_logits = {r: torch.stack(v) for r, v in gen_rows.items()}
    return outs, prompt_logits, gen_logits


PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "Once upon a time",
    "In the beginning there was",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23",
    "A",
]


# The engine twice in a subprocess (TRITON_INTERPRET must be set before triton compiles
# anything): on the torch twins, then with every op on its Triton kernel (interpreter on CPU).
# A warm-up request first caches PREFIX, so the prompts that share it get a prefill chunk with a
# cached prefix. Greedy, 3 tokens each, with their logprobs.
TRITON_PREFIX = "The quick brown fox jumps over the lazy dog and "
_TRITON_SCRIPT = r'''
import json, os, sys
sys.path.insert(0, sys.argv[3])
import torch
torch.set_num_threads(1)
from pathlib import Path
from serve_helpers import TRITON_PREFIX as prefix, make_engine, run_all
from drlora_serve.types import SamplingParams
from transformers import AutoTokenizer
model, adapters, prompts = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[4])
tok = AutoTokenizer.from_pretrained(str(model))
sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=0)
result = {}
for mode in ("twin", "triton"):
    os.environ["DRLORA_FORCE_TRITON"] = "1" if mode == "triton" else "0"
    eng = make_engine(model, tok, adapters_dir=adapters, max_num_batched_tokens=16, block_size=4)
    eng.add_request("warm", tok.encode(prefix + "x"), sp, None)
    run_all(eng)  # the prefix is now cached
    for i, (p, a) in enumerate(prompts):
        eng.add_request(f"r{i}", tok.encode(p), sp, a)
    outs = run_all(eng)
    result[mode] = {rid: {"ids": o.outputs[0].token_ids, "lp": [t.logprob for t in o.outputs[0].logprobs]}
                    for rid, o in outs.items()}
    result[mode + "_cache_hits"] = eng.blocks.num_cache_hits
print("RESULT" + json.dumps(result, default=float))
'''


def run_twins_and_triton(model_dir, adapters_dir, prompts: list[tuple[str, str | None]]) -> dict:
    """{"twin": {rid: {"ids", "lp"}}, "triton": ..., "twin_cache_hits", "triton_cache_hits"} for
    prompts [(text, adapter or None)] (see _TRITON_SCRIPT)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    here = Path(__file__).resolve().parent
    res = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, str(model_dir), str(adapters_dir), str(here),
                          json.dumps(prompts)], env=env, capture_output=True, text=True, timeout=600,
                         cwd=str(here.parent.parent))
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.split("RESULT", 1)[1])


def assert_triton_matches_twins(out: dict, num_requests: int) -> None:
    """Identical greedy tokens, logprobs within 1e-3."""
    twin, tri = out["twin"], out["triton"]
    assert set(twin) == set(tri) and len(twin) == num_requests
    for rid in twin:
        assert tri[rid]["ids"] == twin[rid]["ids"], rid
        for a, b in zip(tri[rid]["lp"], twin[rid]["lp"]):
            assert abs(a - b) < 1e-3, (rid, a, b)


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
