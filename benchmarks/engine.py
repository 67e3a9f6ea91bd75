"""Serving engine throughput at a real model's shapes with random weights (no download).

    python benchmarks/engine.py --out engine.json [--batches 1 16 64 128] [--skip-hf]
    python benchmarks/engine.py --shape qwen3-moe --out engine_qwen3.json     # Qwen3-30B-A3B shapes

`--shape` picks the preset config (drlora.models.PRESETS: olmoe = OLMoE-1B-7B, qwen3-moe =
Qwen3-30B-A3B, qwen2-moe = Qwen1.5-MoE-A2.7B, mixtral = Mixtral-8x7B, which needs more than
80 GB in bf16). The number of resident adapters defaults to what fits beside the weights on an
80 GB GPU: 16 at OLMoE and Qwen1.5-MoE shapes, 4 at Qwen3-30B-A3B's (one DR-LoRA-like adapter
there is 1.7 GB: 48 layers x 3 projections x 128 experts x rank ~16).

Measures, at several batch sizes, the drlora engine with no adapter, with N resident adapters
whose per-expert ranks are DR-LoRA-like (8..32, mean ~16, skewed, seeded), and with the same
adapters padded (every expert at rank 32, zero rows: the work of a padded-rank layout through the
same engine; `--no-padded` skips it, the default where the padded pool does not fit), then
transformers' `generate` on the same model shape (random weights too); and the device memory of
the adapters' packed buffers vs a padded layout. Steady state: CUDA graphs are captured when the
engine starts, and every measured shape (batch size, its prefill chunks, each series' adapters)
runs once untimed (`--warmup-tokens` output tokens) before it is timed. Each row reports
end-to-end output tok/s, prefill tok/s (until every prompt is computed), decode tok/s and the
mean decode step (ms/token) over the decode-only steps after it, and how many decode-only steps
replayed a CUDA graph vs ran eagerly. The run checks its steady state (graphs on, every
decode-only step of a batch within the capture sizes replayed, no lazy capture, no Triton
compile while timed, no prefix-cache hit: every run has fresh prompts) and exits 1 if it does not hold (after writing the JSON). Needs CUDA
(refuses otherwise), except `--smoke` (the tiny model on CPU: checks the script only) and:

    python benchmarks/engine.py --memory-only --out mem.json

which builds only the adapter pool (LoraBuffers + AdapterPool, bf16, on CUDA if present else
CPU), makes all N adapters resident at once and reports its bytes. Buffer sizes do not depend
on the device, so this part of the benchmark is meaningful on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, uninstalled

import torch  # noqa: E402

from drlora.models import PRESETS  # noqa: E402  (the real models' config.json, as dicts)

DEFAULT_ADAPTERS = {"olmoe": 16, "qwen3-moe": 4, "qwen2-moe": 16, "mixtral": 4}
# the step budget: its activation reserve (logits over a 152k vocabulary) must fit beside 57 GiB
# of Qwen3-30B-A3B weights on an 80 GB GPU
DEFAULT_BATCHED_TOKENS = {"olmoe": 8192, "qwen3-moe": 4096, "qwen2-moe": 8192, "mixtral": 4096}
# the padded-LoRA series (every expert at PAD_RANK) needs a pool about twice the rank-exact one:
# it fits beside OLMoE's and Qwen1.5-MoE's weights on an 80 GB GPU, not beside Qwen3-30B-A3B's
DEFAULT_PADDED = {"olmoe": True, "qwen3-moe": False, "qwen2-moe": True, "mixtral": False}
PAD_RANK = 32


class NullTokenizer:
    eos_token_id = None

    def decode(self, ids, **kwargs):  # whatever the detokenizer passes
        return ""


def dr_lora_ranks(shape, seed: int, lo: int = 8, hi: int = 32, mean: float = 16.0) -> dict:
    """Skewed per-(layer, expert) ranks in [lo, hi]: lo + exponential tail, clipped at hi. The
    tail's scale (mean - lo + 0.5) is calibrated for the defaults: the 16 benchmark adapters'
    ranks average 16.00 (scale mean - lo + 1.5, used before, gave 16.74)."""
    g = torch.Generator().manual_seed(seed)
    L, E = shape.num_hidden_layers, shape.num_experts
    out = {}
    for p in ("gate", "up", "down"):
        x = torch.empty(L, E).exponential_(1.0 / (mean - lo + 0.5), generator=g)
        r = (lo + x).round().clamp(lo, hi).long()
        r[list(shape.dense_layers)] = 0  # no experts on dense-MLP layers
        out[p] = r.tolist()
    return out


def make_adapter(shape, seed: int, device, dtype: torch.dtype = torch.bfloat16):
    from drlora.adapter_format import Adapter, AdapterConfig

    ranks = dr_lora_ranks(shape, seed)
    cfg = AdapterConfig(base_model=f"{shape.model_type}-random", base_shape=shape, method="dr-lora", scaling=2.0, ranks=ranks,
                        dtype=str(dtype).removeprefix("torch."))
    g = torch.Generator(device=device).manual_seed(seed)
    t = {}
    for p, per_layer in ranks.items():
        i, o = shape.proj_dims(p)
        for l, r in enumerate(per_layer):
            if not shape.is_sparse(l):
                continue
            R = sum(r)
            t[f"layers.{l}.experts.{p}.lora_A"] = torch.randn(R, i, generator=g, device=device, dtype=dtype) * 0.01
            t[f"layers.{l}.experts.{p}.lora_B"] = torch.randn(o, R, generator=g, device=device, dtype=dtype) * 0.01
    return Adapter(cfg, t)


def pad_adapter(adapter, rank: int = PAD_RANK):
    """The same adapter in the padded layout: every expert of every sparse layer at `rank`, its
    real rank rows first, zero rows after. Same outputs; the work and memory of a padded pool
    (what a padded-rank server computes), through the same engine and kernels."""
    from drlora.adapter_format import Adapter

    cfg, t = adapter.config, adapter.tensors
    shape = cfg.base_shape
    ranks, out = {}, {}
    for p, per_layer in cfg.ranks.items():
        ranks[p] = [[rank if shape.is_sparse(l) else 0] * len(r) for l, r in enumerate(per_layer)]
        for l, r in enumerate(per_layer):
            if not shape.is_sparse(l):
                continue
            A, B = t[f"layers.{l}.experts.{p}.lora_A"], t[f"layers.{l}.experts.{p}.lora_B"]
            # real row j of expert e -> padded row e * rank + j
            idx = torch.cat([torch.arange(r_e) + e * rank for e, r_e in enumerate(r)]).to(A.device)
            Ap = A.new_zeros(len(r) * rank, A.shape[1])
            Bp = B.new_zeros(B.shape[0], len(r) * rank)
            Ap[idx], Bp[:, idx] = A, B
            out[f"layers.{l}.experts.{p}.lora_A"], out[f"layers.{l}.experts.{p}.lora_B"] = Ap, Bp
    return Adapter(dataclasses.replace(cfg, ranks=ranks), out)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class CompileCounter:
    """Triton kernel compilations (or loads from Triton's disk cache) while active, through
    triton.knobs' post-compile hook; count None where this Triton has no such hook."""

    def __enter__(self):
        self.count, self._knobs = None, None
        try:
            from triton import knobs
        except ImportError:
            return self
        if hasattr(knobs.runtime, "jit_post_compile_hook"):
            self._knobs, self.count = knobs, 0
            self._prev = knobs.runtime.jit_post_compile_hook
            knobs.runtime.jit_post_compile_hook = self._hook
        return self

    def _hook(self, *args, **kwargs):
        self.count += 1
        return self._prev(*args, **kwargs) if self._prev is not None else None

    def __exit__(self, *exc):
        if self._knobs is not None:
            self._knobs.runtime.jit_post_compile_hook = self._prev


_RUNS = iter(range(1 << 30))  # a new seed per run: a warm-up's prompts must not be in the prefix cache


def run_engine(engine, batch: int, prompt_len: int, out_len: int, adapters: list[str | None]) -> dict:
    """One batch through the engine: `batch` prompts of prompt_len random tokens, out_len tokens
    each (greedy, no eos). Two phases: prefill (until every prompt is computed; the first
    sequences' decodes share those steps) and decode (every step after: decode-only, where CUDA
    graphs replay). Reports end-to-end output tok/s, prefill tok/s, decode tok/s, the mean decode
    step (per-token latency), and the decode-only steps replayed from graphs vs run eagerly."""
    from drlora_serve.types import SamplingParams

    dev = engine.runner.device
    # "final": one output per request at the end, as the offline LLM asks (no per-token snapshots)
    sp = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True, output_kind="final")
    g = torch.Generator().manual_seed(next(_RUNS))
    for i in range(batch):
        toks = torch.randint(10, engine.runner.config["vocab_size"] - 10, (prompt_len,), generator=g).tolist()
        engine.add_request(f"b{batch}-{i}-{time.monotonic_ns()}", toks, sp, adapters[i % len(adapters)])
    gs, sched = engine.runner.graph_stats, engine.scheduler
    replays0, eager0, hits0 = gs.replays, gs.eager_decode_steps, engine.blocks.num_cache_hits
    sync(dev)
    t0 = time.perf_counter()
    t_dec = None
    with CompileCounter() as compiles:
        while engine.has_unfinished():
            engine.step()  # no sync per step: the engine overlaps scheduling with the device
            if t_dec is None and not sched.num_waiting and all(s.num_computed_tokens >= s.num_prompt_tokens
                                                               for s in sched.running):
                # every prompt scheduled: the steps from here on are decode-only (one sync, here)
                sync(dev)
                t_dec, launched_dec = time.perf_counter(), gs.replays + gs.eager_decode_steps
                # tokens still to sample: each running sequence has sampled (launched) one token per
                # computed position past its prompt, plus the prompt's last one
                gen = sum(out_len - (s.num_computed_tokens - s.num_prompt_tokens + 1) for s in sched.running)
        sync(dev)
        total = time.perf_counter() - t0
    if t_dec is None:
        t_dec, gen, launched_dec = t0 + total, 0, gs.replays + gs.eager_decode_steps
    dec_s = t0 + total - t_dec
    dec_steps = gs.replays + gs.eager_decode_steps - launched_dec  # decode-only steps launched in the phase
    return {"batch": batch, "output_tok_s": batch * out_len / total, "prefill_s": t_dec - t0,
            "prefill_tok_s": batch * prompt_len / max(t_dec - t0, 1e-9),
            "decode_tok_s": gen / dec_s if dec_s > 0 and gen else None,
            "per_token_latency_ms": 1000 * dec_s / dec_steps if dec_steps else None, "decode_steps": dec_steps,
            "decode_tokens": gen,
            "wall_s": total, "graph_replays": gs.replays - replays0, "eager_decode_steps": gs.eager_decode_steps - eager0,
            "triton_compiles": compiles.count, "prefix_cache_hits": engine.blocks.num_cache_hits - hits0}


def build_hf(config: dict, dtype: torch.dtype, dev: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            return AutoModelForCausalLM.from_config(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def run_hf(model, vocab_size: int, batch: int, prompt_len: int, out_len: int, dev: torch.device) -> dict:
    """transformers' generate (greedy, exactly out_len tokens), warmed up at this batch and
    prompt shape first; prefill timed apart (a 1-token generate), decode = the rest."""
    ids = torch.randint(10, min(vocab_size, 50000) - 10, (batch, prompt_len), device=dev)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=1)

    def gen(n: int) -> float:
        sync(dev)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync(dev)
        return time.perf_counter() - t

    with torch.no_grad():
        gen(min(out_len, 4))  # warm up (this batch's shapes, the cache's first growth)
        prefill = gen(1)
        total = gen(out_len)
    dec = max(total - prefill, 1e-9)
    return {"batch": batch, "output_tok_s": batch * out_len / total, "prefill_s": prefill,
            "prefill_tok_s": batch * prompt_len / prefill, "decode_tok_s": batch * (out_len - 1) / dec,
            "per_token_latency_ms": 1000 * dec / max(out_len - 1, 1), "wall_s": total}


def adapter_memory(engine, names: list[str]) -> dict:
    buf = engine.runner.lora
    s = engine.runner.shape
    elt = torch.empty((), dtype=buf.dtype).element_size()
    exact = padded = 0
    for n in names:
        a = engine.pool.current[n]
        adapter = engine.pool._host_get(a)
        for p, per_layer in adapter.config.ranks.items():
            i, o = s.proj_dims(p)
            for r in per_layer:
                exact += sum(r) * (i + o) * elt
                padded += len(r) * 32 * (i + o) * elt
    return {"rank_exact_bytes": exact, "padded_rank32_bytes": padded, "pool_allocated_bytes": buf.nbytes,
            "saving": 1 - exact / padded}


def memory_only(num_adapters: int, out: str, preset: str = "olmoe") -> int:
    """Adapter-pool bytes at a preset's shapes: rank-exact pool sized for the adapters, all of
    them resident together, vs the padded layout (every expert of every adapter at rank 32)."""
    from drlora.models import MoeShape
    from drlora_serve.adapter_pool import AdapterPool
    from drlora_serve.lora_buffers import LoraBuffers

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = MoeShape.from_config(PRESETS[preset])
    ranks = [dr_lora_ranks(shape, 1000 + i) for i in range(num_adapters)]  # the adapters make_adapter builds
    rows = max(sum(sum(r[p][l]) for r in ranks) for p in ("gate", "up", "down") for l in range(shape.num_hidden_layers))
    buf = LoraBuffers(shape, num_adapters, rows, 16, torch.bfloat16, dev)
    pool = AdapterPool(shape, buf, max_cpu_loras=num_adapters)
    names = [f"ad{i}" for i in range(num_adapters)]
    for i, n in enumerate(names):
        pool.add(n, make_adapter(shape, 1000 + i, dev))
    slots = [pool.activate(pool.get(n)) for n in names]
    assert all(s is not None for s in slots), "not every adapter became resident"
    elt = 2
    L, E, H, I = len(shape.sparse_layers), shape.num_experts, shape.hidden_size, shape.intermediate_size
    exact = sum(sum(sum(per) for per in r[p]) * (H + I) * elt for r in ranks for p in r)
    padded = num_adapters * 3 * L * E * 32 * (H + I) * elt
    moe_pool = sum(buf.a[k].nbytes + buf.b[k].nbytes for k in buf.keys if k[1] in ("gate", "up", "down"))
    mean_rank = sum(x for r in ranks for p in r for per in r[p] for x in per) / (num_adapters * 3 * L * E)
    res = {"shape": preset, "device": str(dev), "num_adapters": num_adapters, "resident": len(slots), "mean_rank": mean_rank,
           "rank_exact_adapter_bytes": exact, "moe_pool_allocated_bytes": moe_pool,
           "pool_allocated_bytes_total": buf.nbytes, "padded_rank32_bytes": padded,
           "pool_total_vs_padded": buf.nbytes / padded, "date": datetime.datetime.now().isoformat(),
           "torch": torch.__version__, "python": platform.python_version()}
    print(f"{num_adapters} adapters resident at once (mean rank {mean_rank:.2f}, ranks 8..32), bf16, {preset} shapes:")
    print(f"  rank-exact expert LoRA bytes      {exact / 2**30:7.2f} GiB")
    print(f"  expert pool allocated             {moe_pool / 2**30:7.2f} GiB")
    print(f"  whole pool (+ attention, routers) {buf.nbytes / 2**30:7.2f} GiB")
    print(f"  padded layout (rank 32)           {padded / 2**30:7.2f} GiB")
    print(f"  whole pool / padded               {buf.nbytes / padded:7.3f}  (target <= 0.55)")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}")
    return 0


def smoke_config() -> dict:
    """The tiny test model's config (CPU smoke run of the whole script)."""
    from drlora.models import resolve_model

    return json.loads((resolve_model("tiny") / "config.json").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="engine batch sizes (default 1 16 64 128)")
    ap.add_argument("--hf-batches", type=int, nargs="+", default=None, help="transformers batch sizes (default 1 16 64)")
    ap.add_argument("--padded-batches", type=int, nargs="+", default=None, help="padded-LoRA series (default: --batches)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128")
    ap.add_argument("--output-len", type=int, default=None, help="default 128")
    ap.add_argument("--warmup-tokens", type=int, default=8,
                    help="output tokens of each shape's warm-up run (same batch and prompts as the measured run)")
    ap.add_argument("--shape", default="olmoe", choices=sorted(PRESETS), help="preset model shape (random weights)")
    ap.add_argument("--num-adapters", type=int, default=None, help="resident adapters (default: per --shape, "
                    f"{DEFAULT_ADAPTERS})")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help=f"engine step budget (default: per --shape, {DEFAULT_BATCHED_TOKENS})")
    ap.add_argument("--padded", action=argparse.BooleanOptionalAction, default=None,
                    help=f"the padded-LoRA series, every expert at rank {PAD_RANK} (default: per --shape, {DEFAULT_PADDED})")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--strict-graphs", action="store_true", help="a CUDA graph capture failure raises (default: "
                    "logged, the run goes on eagerly and the graph check fails)")
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers' generate")
    ap.add_argument("--out", default="engine_benchmark.json")
    ap.add_argument("--memory-only", action="store_true", help="only the adapter-pool bytes (runs on CPU too)")
    ap.add_argument("--smoke", action="store_true", help="the tiny model on CPU, fp32, tiny batches: checks the script only")
    args = ap.parse_args(argv)
    if args.num_adapters is None:
        args.num_adapters = 2 if args.smoke else DEFAULT_ADAPTERS[args.shape]
    if args.memory_only:
        return memory_only(args.num_adapters, args.out, args.shape)
    small = args.smoke  # defaults scaled down for the smoke run
    args.batches = args.batches or ([1, 4] if small else [1, 16, 64, 128])
    args.hf_batches = args.hf_batches or ([1, 2] if small else [1, 16, 64])
    args.padded_batches = args.padded_batches or args.batches
    args.prompt_len = args.prompt_len or (40 if small else 128)  # smoke: two full KV blocks (cacheable)
    args.output_len = args.output_len or (6 if small else 128)
    if args.padded is None:
        args.padded = True if small else DEFAULT_PADDED[args.shape]
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/engine.py needs a CUDA GPU (none found); nothing run (--smoke checks the script on CPU).")
        return 2

    import transformers

    from drlora.models import MoeShape
    from drlora_serve.config import EngineArgs
    from drlora_serve.engine import LLMEngine
    from drlora_serve.model_runner import ModelRunner
    from drlora_serve.models.registry import get_model_class

    config = smoke_config() if small else PRESETS[args.shape]
    dev = torch.device("cpu" if small else "cuda")
    dtype = torch.float32 if small else torch.bfloat16
    shape = MoeShape.from_config(config)
    # built in host memory (the engine's host tier keeps them there), copied into the device pool
    adapters = [make_adapter(shape, 1000 + i, torch.device("cpu"), dtype) for i in range(args.num_adapters)]
    padded = [pad_adapter(a) for a in adapters] if args.padded else []

    def rows_of(ads):
        return max(sum(sum(a.config.ranks[p][l]) for a in ads) for p in ("gate", "up", "down")
                   for l in range(shape.num_hidden_layers))

    # one pool for either series (the padded one evicts the rank-exact adapters when its turn comes)
    rows = max(rows_of(adapters), rows_of(padded) if padded else 0)
    eargs = EngineArgs(model=f"{args.shape}-random", dtype=str(dtype).removeprefix("torch."), device=dev.type,
                       max_loras=args.num_adapters, max_cpu_loras=2 * args.num_adapters, max_lora_rank=PAD_RANK,
                       lora_pool_rank_rows=rows, lora_dense_rank_rows=16,
                       max_num_seqs=max(args.batches + args.padded_batches),
                       max_num_batched_tokens=args.max_num_batched_tokens or (32 if small else DEFAULT_BATCHED_TOKENS[args.shape]),
                       enforce_eager=args.enforce_eager, strict_cuda_graphs=args.strict_graphs,
                       max_model_len=min(4096, config.get("max_position_embeddings", 4096)),
                       num_kv_blocks=512 if small else None)
    model = get_model_class(config["model_type"]).random(config, dtype, dev)
    t0 = time.perf_counter()
    runner = ModelRunner(eargs, None, model=model, config=config)  # captures the CUDA graphs
    startup_s = time.perf_counter() - t0
    engine = LLMEngine(eargs, model_dir=".", runner=runner, tokenizer=NullTokenizer())
    names = [f"ad{i}" for i in range(args.num_adapters)]
    pnames = [f"pad{i}" for i in range(len(padded))]
    for n, a in zip(names + pnames, adapters + padded):
        engine.pool.add(n, a)
    del adapters, padded
    series = [("no_adapter", "engine, no adapter", [None], args.batches),
              (f"adapters_{args.num_adapters}", f"engine, {args.num_adapters} adapters", names, args.batches)]
    if pnames:
        series.append((f"padded_{args.num_adapters}", f"engine, {args.num_adapters} padded r{PAD_RANK}", pnames,
                       args.padded_batches))
    results = {"shape": "tiny (smoke)" if small else args.shape, "engine": {}, "hf_generate": []}
    for key, _, ads, batches in series:
        # steady state: every measured shape (this batch's prefill chunks and decode batch, with
        # these adapters resident) runs once before it is timed; graphs were captured at start-up
        for b in batches:
            run_engine(engine, b, args.prompt_len, min(args.warmup_tokens, args.output_len), ads)
        results["engine"][key] = [run_engine(engine, b, args.prompt_len, args.output_len, ads) for b in batches]
    results["adapter_memory"] = adapter_memory(engine, names)
    results["adapter_memory"]["pool_sized_for_padded"] = bool(pnames)
    results["kv_blocks"] = engine.blocks.num_blocks
    st = engine.stats()
    graph_sizes = engine.runner.graphs.sizes if engine.runner.graphs is not None else []
    results["cuda_graphs"] = {"enabled": st.cuda_graphs_enabled, "captured": st.cuda_graphs_captured,
                              "sizes": graph_sizes, "replays": st.cuda_graph_replays_total,
                              "eager_decode_steps": st.eager_decode_steps_total,
                              "lazy_captures": st.cuda_graph_lazy_captures_total,
                              "capture_failures": st.cuda_graph_capture_failures_total, "error": st.cuda_graph_error,
                              "startup_s": startup_s}
    del engine, runner, model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_hf:
        hf = build_hf(config, dtype, dev)
        for b in args.hf_batches:
            results["hf_generate"].append(run_hf(hf, config["vocab_size"], b, args.prompt_len, args.output_len, dev))
        del hf
    results["meta"] = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu (smoke)",
                       "date": datetime.datetime.now().isoformat(),
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "python": platform.python_version(), "prompt_len": args.prompt_len,
                       "output_len": args.output_len, "warmup_tokens": args.warmup_tokens,
                       "cuda_graphs": not args.enforce_eager}
    # the steady-state check: decode steps replayed, nothing compiled while timed
    problems = []
    want_graphs = dev.type == "cuda" and not args.enforce_eager
    if want_graphs and not st.cuda_graphs_enabled:
        problems.append(f"CUDA graphs are off: {st.cuda_graph_error}")
    if st.cuda_graph_lazy_captures_total:
        problems.append(f"{st.cuda_graph_lazy_captures_total} CUDA graphs captured lazily (after start-up)")
    for key, _, _, _ in series:
        for r in results["engine"][key]:
            if want_graphs and r["batch"] <= (graph_sizes or [0])[-1] and r["eager_decode_steps"]:
                problems.append(f"{key} batch {r['batch']}: {r['eager_decode_steps']} of "
                                f"{r['eager_decode_steps'] + r['graph_replays']} decode-only steps ran eagerly")
            if r["prefix_cache_hits"]:
                problems.append(f"{key} batch {r['batch']}: {r['prefix_cache_hits']} prefix-cache hits (prompts reused)")
            if r["triton_compiles"]:
                problems.append(f"{key} batch {r['batch']}: {r['triton_compiles']} Triton compiles while timed")
    results["steady_state_check"] = {"ok": not problems, "problems": problems}

    def fmt(x, spec):
        return format(x, spec) if x is not None else format("-", spec.rstrip(".0123456789f") or ">")

    print(f"{'system':<28}{'batch':>6}{'out tok/s':>11}{'decode tok/s':>13}{'ms/token':>10}{'prefill tok/s':>14}"
          f"{'graph/eager':>13}")
    rows_ = [(label, results["engine"][key]) for key, label, _, _ in series]
    rows_.append(("transformers generate", results["hf_generate"]))
    for label, rs in rows_:
        for r in rs:
            ge = f"{r['graph_replays']}/{r['eager_decode_steps']}" if "graph_replays" in r else "-"
            print(f"{label:<28}{r['batch']:>6}{r['output_tok_s']:>11.1f}{fmt(r['decode_tok_s'], '>13.1f')}"
                  f"{fmt(r['per_token_latency_ms'], '>10.2f')}{r['prefill_tok_s']:>14.1f}{ge:>13}")
    m = results["adapter_memory"]
    print(f"adapter buffers: rank-exact {m['rank_exact_bytes'] / 2**30:.2f} GiB vs padded (rank 32) "
          f"{m['padded_rank32_bytes'] / 2**30:.2f} GiB ({100 * m['saving']:.0f}% less); pool allocated "
          f"{m['pool_allocated_bytes'] / 2**30:.2f} GiB" + (" (sized for the padded series)" if pnames else ""))
    g = results["cuda_graphs"]
    print(f"CUDA graphs: {'on' if g['enabled'] else 'off'}, {g['captured']} captured at start-up for sizes {g['sizes']} "
          f"(start-up {startup_s:.1f} s); decode-only steps replayed {g['replays']}, eager {g['eager_decode_steps']}")
    print("steady state: OK" if not problems else "steady state: CHECK FAILED\n  " + "\n  ".join(problems))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
