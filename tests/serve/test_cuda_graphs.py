"""CUDA-graph bookkeeping on the CPU: capture sizes, rank buckets, start-up captures, key
selection, replay counters and loud capture failures. A fake graph stands in for
torch.cuda.CUDAGraph: its replay re-runs the captured forward on the static tensors under the
capture's LoRA layout (the host decisions a real graph freezes), so the tokens of replayed steps
are checked against the eager engine's."""

from __future__ import annotations

import contextlib
import logging

import pytest

from drlora_serve import cuda_graphs
from drlora_serve.cuda_graphs import DecodeGraphs, capture_sizes, rank_bucket
from drlora_serve.types import SamplingParams

from serve_helpers import PROMPTS, make_adapter, make_engine, run_all

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
MAX_SEQS = 8


class FakeGraph:
    def __init__(self, fn, out, lora, layout):
        self.fn, self.out, self.lora, self.layout = fn, out, lora, layout

    def replay(self):
        cm = self.lora.capture_layout(*self.layout) if self.layout is not None else contextlib.nullcontext()
        with cm:
            self.out.copy_(self.fn())


class FakeGraphs(DecodeGraphs):
    """DecodeGraphs whose recording is a FakeGraph (or raises `fail`)."""

    fail: Exception | None = None

    def _capture(self, size, layout):
        self._layout_now = layout
        return super()._capture(size, layout)

    def _record(self, fn):
        if self.fail is not None:
            raise self.fail
        out = fn()
        return FakeGraph(fn, out, self.runner.lora, self._layout_now), out


def attach(engine, fail=None, **kw) -> FakeGraphs:
    r = engine.runner  # a CPU runner: what ModelRunner does on CUDA, with a fake graph
    g = FakeGraphs(r, r.args.max_num_seqs, r.args.cuda_graph_sizes, r.args.max_lora_rank, r.args.strict_cuda_graphs,
                   r.graph_stats, **kw)
    g.fail = fail
    r.graphs = g
    return g


@pytest.fixture(scope="module")
def strong_adapters(tmp_path_factory, tiny_shape):
    """a (experts), b (+ attention LoRA), c (+ its own router), strong enough to change the
    greedy tokens (so a replay that drops an adapter shows)."""
    root = tmp_path_factory.mktemp("graph_adapters")
    make_adapter(root / "a", tiny_shape, seed=1, max_rank=8, std=0.3)
    make_adapter(root / "b", tiny_shape, seed=2, max_rank=4, dense=True, std=0.3)
    make_adapter(root / "c", tiny_shape, seed=3, max_rank=12, router=True, std=0.3)
    return root


def engine_(tiny_dir, tokenizer, strong_adapters, **kw):
    kw = {"max_num_seqs": MAX_SEQS, "max_lora_rank": 32, "max_num_batched_tokens": 64} | kw
    return make_engine(tiny_dir, tokenizer, adapters_dir=str(strong_adapters), **kw)


def generate(engine, tokenizer, names) -> dict:
    for i, name in enumerate(names):
        engine.add_request(f"r{i}", tokenizer.encode(PROMPTS[i % len(PROMPTS)]), GREEDY, name)
    return {rid: o.outputs[0].token_ids for rid, o in run_all(engine).items()}


def test_capture_sizes():
    assert capture_sizes(128) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128]
    assert capture_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]  # every batch covered
    assert capture_sizes(1) == [1]
    assert capture_sizes(0) == [1]
    assert capture_sizes(300)[-2:] == [256, 300]
    assert capture_sizes(1000)[-1] == 256  # past MAX_CAPTURE_SIZE the largest batches run eagerly
    assert capture_sizes(64, [48, 8, 8, 96]) == [8, 48]  # explicit sizes: as given, up to max_num_seqs


def test_rank_bucket():
    assert [rank_bucket(r) for r in (0, 1, 16, 17, 32, 33, 200, 256)] == [16, 16, 16, 32, 32, 64, 256, 256]


def test_cpu_counts_eager_decode_steps(tiny_dir, tokenizer, strong_adapters):
    e = engine_(tiny_dir, tokenizer, strong_adapters)
    assert e.runner.graphs is None and not e.runner.graph_stats.enabled
    generate(e, tokenizer, [None, "a"])
    s = e.stats()
    assert not s.cuda_graphs_enabled and s.cuda_graph_replays_total == 0
    assert s.eager_decode_steps_total >= GREEDY.max_tokens - 2  # the decode-only steps, all eager


def test_startup_captures_and_replays_match_eager(tiny_dir, tokenizer, strong_adapters):
    names = [None, "a", "b", None, "a", "c"]  # c brings its own router: never replayed
    eager = generate(engine_(tiny_dir, tokenizer, strong_adapters), tokenizer, names)
    base = generate(engine_(tiny_dir, tokenizer, strong_adapters), tokenizer, [None] * len(names))
    assert all(eager[f"r{i}"] != base[f"r{i}"] for i in (1, 2, 4))  # the adapters show in the tokens
    e = engine_(tiny_dir, tokenizer, strong_adapters)
    g = attach(e)
    g.capture_all()
    lay = [None, (32, False), (32, True)]  # tiny has attention LoRA projections
    assert sorted(g.graphs, key=str) == sorted(((s, l) for s in (1, 2, 4, 8) for l in lay), key=str)
    assert g.stats.captured == 12
    assert generate(e, tokenizer, names) == eager
    s = e.stats()
    assert s.cuda_graphs_enabled and s.cuda_graph_replays_total > 0
    assert s.eager_decode_steps_total > 0  # the steps with c's router
    assert s.cuda_graph_lazy_captures_total == 0 and s.cuda_graph_capture_failures_total == 0
    # without c every decode-only step replays
    before = s.eager_decode_steps_total
    generate(e, tokenizer, ["a", "b", None])
    assert e.stats().eager_decode_steps_total == before


def test_select_covering_key(tiny_dir, tokenizer, strong_adapters):
    e = engine_(tiny_dir, tokenizer, strong_adapters)
    g = attach(e)
    g.capture_all()
    assert g.select(3, None) == (4, None)
    assert g.select(3, (16, False)) == (4, (32, False))  # a larger rank bucket is exact
    assert g.select(1, (32, True)) == (1, (32, True))
    assert g.select(5, (16, True)) == (8, (32, True))  # a dense step needs the dense launches
    assert g.select(2, (64, False)) is None  # above the start-up bucket: nothing covers it
    assert g.select(9, None) is None
    del g.graphs[(4, None)]
    g._choice.clear()
    assert g.select(3, None) == (4, (32, False))  # a LoRA graph with slots -1 is exact too


def test_lazy_capture_counted(tiny_dir, tokenizer, strong_adapters, caplog):
    e = engine_(tiny_dir, tokenizer, strong_adapters)
    g = attach(e)  # nothing captured at start-up
    with caplog.at_level(logging.WARNING, logger=cuda_graphs.__name__):
        generate(e, tokenizer, [None, "a"])
    assert g.stats.lazy_captures >= 1 and g.stats.replays > 0
    assert "lazy CUDA graph capture" in caplog.text


def test_capture_failure_is_loud(tiny_dir, tokenizer, strong_adapters, caplog):
    eager = generate(engine_(tiny_dir, tokenizer, strong_adapters), tokenizer, [None, "a"])
    e = engine_(tiny_dir, tokenizer, strong_adapters)
    g = attach(e, fail=RuntimeError("boom"))
    with caplog.at_level(logging.ERROR, logger=cuda_graphs.__name__):
        g.capture_all()
    assert "CUDA graph capture failed" in caplog.text and "boom" in caplog.text
    assert caplog.records[-1].levelno == logging.ERROR and caplog.records[-1].exc_info is not None
    assert generate(e, tokenizer, [None, "a"]) == eager  # eager from then on, still correct
    s = e.stats()
    assert not s.cuda_graphs_enabled and s.cuda_graph_capture_failures_total == 1
    assert s.cuda_graph_error == "RuntimeError: boom"
    assert s.cuda_graph_replays_total == 0 and s.eager_decode_steps_total > 0
    assert g.graphs == {}  # no retry: one failure turns graphs off


@pytest.mark.parametrize("how", ["arg", "env"])
def test_capture_failure_strict_raises(tiny_dir, tokenizer, strong_adapters, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv(cuda_graphs.STRICT_ENV, "1")
    e = engine_(tiny_dir, tokenizer, strong_adapters, strict_cuda_graphs=how == "arg")
    g = attach(e, fail=RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="CUDA graph capture failed") as info:
        g.capture_all()
    assert isinstance(info.value.__cause__, RuntimeError) and str(info.value.__cause__) == "boom"
    assert g.stats.capture_failures == 1 and not g.stats.enabled


def test_batch_above_largest_size_runs_eagerly(tiny_dir, tokenizer, strong_adapters):
    e = engine_(tiny_dir, tokenizer, strong_adapters, cuda_graph_sizes=[1, 2])
    g = attach(e)
    g.capture_all()
    generate(e, tokenizer, [None] * 4)  # 4 decodes > 2: eager
    assert g.stats.eager_decode_steps > 0 and g.stats.lazy_captures == 0


TRITON_SCRIPT = r'''
import json, os, sys
sys.path.insert(0, sys.argv[3])
os.environ["DRLORA_FORCE_TRITON"] = "1"
import torch
torch.set_num_threads(1)
from pathlib import Path
from transformers import AutoTokenizer
from test_cuda_graphs import attach, engine_, generate, SamplingParams
import test_cuda_graphs as T
tiny, adapters = Path(sys.argv[1]), sys.argv[2]
tok = AutoTokenizer.from_pretrained(str(tiny))
T.GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=0)
kw = dict(max_num_seqs=2, cuda_graph_sizes=[2])
res = {}
for mode in ("eager", "graphs"):
    e = engine_(tiny, tok, adapters, **kw)
    if mode == "graphs":
        g = attach(e)
        g.capture_all()
        for key in [k for k in g.graphs if k[1] == (32, False)]:
            del g.graphs[key]  # steps with expert LoRA only replay the graph with the dense launches
        g._choice.clear()
    # b (attention LoRA) is not resident during the first batch: its steps' dense pools are inactive
    res[mode] = [generate(e, tok, names) for names in ([None, "a"], ["b", "a"])]
    res[mode + "_stats"] = [e.stats().cuda_graph_replays_total, e.stats().eager_decode_steps_total]
print("RESULT" + json.dumps(res))
'''


@pytest.mark.slow
def test_replays_on_triton_kernels_match_eager(tiny_dir, strong_adapters):
    """The graph layouts on the Triton launchers (interpreter): a rank bucket above the adapters'
    ranks and dense launches over inactive pools give the eager engine's tokens."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, str(tiny_dir), str(strong_adapters), str(here)], env=env,
                       capture_output=True, text=True, timeout=900, cwd=str(here.parent.parent))
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    res = json.loads(r.stdout.split("RESULT", 1)[1])
    assert res["graphs"] == res["eager"]
    replays, eager = res["graphs_stats"]
    assert replays > 0 and eager == 0
