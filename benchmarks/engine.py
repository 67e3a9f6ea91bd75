"""Serving engine throughput at a real model's shapes with random weights (no download).

    python benchmarks/engine.py --out engine.json [--batches 1 16 64 128] [--skip-hf]
    python benchmarks/engine.py --shape qwen3-moe --out engine_qwen3.json     # Qwen3-30B-A3B shapes

`--shape` picks the preset config (drlora.models.PRESETS: olmoe = OLMoE-1B-7B, qwen3-moe =
Qwen3-30B-A3B, qwen2-moe = Qwen1.5-MoE-A2.7B, mixtral = Mixtral-8x7B, which needs more than
80 GB in bf16). The number of resident adapters defaults to what fits beside the weights on an
80 GB GPU: 16 at OLMoE and Qwen1.5-MoE shapes, 4 at Qwen3-30B-A3B's (one DR-LoRA-like adapter
there is 1.7 GB: 48 layers x 3 projections x 128 experts x rank ~16).

Measures output tokens/s and per-token (decode step) latency of the drlora engine at several
batch sizes, with no adapter and with N resident adapters whose per-expert ranks are
DR-LoRA-like (8..32, mean ~16, skewed, seeded), beside transformers' `generate` on the same
model shape (random weights too); and the device memory of the adapters' packed buffers
vs a padded layout (every expert at rank 32). Needs CUDA (refuses otherwise), except:

    python benchmarks/engine.py --memory-only --out mem.json

which builds only the adapter pool (LoraBuffers + AdapterPool, bf16, on CUDA if present else
CPU), makes all N adapters resident at once and reports its bytes. Buffer sizes do not depend
on the device, so this part of the benchmark is meaningful on a CPU.
"""

from __future__ import annotations

import argparse
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


class NullTokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
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


def make_adapter(shape, seed: int, device):
    from drlora.adapter_format import Adapter, AdapterConfig

    ranks = dr_lora_ranks(shape, seed)
    cfg = AdapterConfig(base_model=f"{shape.model_type}-random", base_shape=shape, method="dr-lora", scaling=2.0, ranks=ranks,
                        dtype="bfloat16")
    g = torch.Generator(device=device).manual_seed(seed)
    t = {}
    for p, per_layer in ranks.items():
        i, o = shape.proj_dims(p)
        for l, r in enumerate(per_layer):
            if not shape.is_sparse(l):
                continue
            R = sum(r)
            t[f"layers.{l}.experts.{p}.lora_A"] = torch.randn(R, i, generator=g, device=device, dtype=torch.bfloat16) * 0.01
            t[f"layers.{l}.experts.{p}.lora_B"] = torch.randn(o, R, generator=g, device=device, dtype=torch.bfloat16) * 0.01
    return Adapter(cfg, t)


def run_engine(engine, batch: int, prompt_len: int, out_len: int, adapters: list[str | None]) -> dict:
    from drlora_serve.types import SamplingParams

    sp = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        toks = torch.randint(10, engine.runner.config["vocab_size"] - 10, (prompt_len,), generator=g).tolist()
        engine.add_request(f"b{batch}-{i}-{time.monotonic_ns()}", toks, sp, adapters[i % len(adapters)])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    decode_times = []
    while engine.has_unfinished():
        s = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - s
        if not any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in engine.scheduler.running):
            decode_times.append(dt)
    total = time.perf_counter() - t0
    decode_times = decode_times[1:] or decode_times  # first may include the last prefill
    return {"batch": batch, "output_tok_s": batch * out_len / total,
            "per_token_latency_ms": 1000 * sum(decode_times) / max(len(decode_times), 1), "wall_s": total}


def run_hf(config: dict, batch: int, prompt_len: int, out_len: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.randint(10, min(config["vocab_size"], 50000) - 10, (batch, prompt_len), device="cuda")
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_len, min_new_tokens=out_len,
                       do_sample=False, pad_token_id=1)
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return {"batch": batch, "output_tok_s": batch * out_len / total, "per_token_latency_ms": 1000 * total / out_len,
            "wall_s": total}


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128])
    ap.add_argument("--hf-batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--shape", default="olmoe", choices=sorted(PRESETS), help="preset model shape (random weights)")
    ap.add_argument("--num-adapters", type=int, default=None, help="resident adapters (default: per --shape, "
                    f"{DEFAULT_ADAPTERS})")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help=f"engine step budget (default: per --shape, {DEFAULT_BATCHED_TOKENS})")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers' generate")
    ap.add_argument("--out", default="engine_benchmark.json")
    ap.add_argument("--memory-only", action="store_true", help="only the adapter-pool bytes (runs on CPU too)")
    args = ap.parse_args(argv)
    config = PRESETS[args.shape]
    if args.num_adapters is None:
        args.num_adapters = DEFAULT_ADAPTERS[args.shape]
    if args.memory_only:
        return memory_only(args.num_adapters, args.out, args.shape)
    if not torch.cuda.is_available():
        print("benchmarks/engine.py needs a CUDA GPU (none found); nothing run.")
        return 2

    import transformers

    from drlora.models import MoeShape
    from drlora_serve.config import EngineArgs
    from drlora_serve.engine import LLMEngine
    from drlora_serve.model_runner import ModelRunner
    from drlora_serve.models.registry import get_model_class

    dev = torch.device("cuda")
    shape = MoeShape.from_config(config)
    # built in host memory (the engine's host tier keeps them there), copied into the device pool
    adapters = [make_adapter(shape, 1000 + i, torch.device("cpu")) for i in range(args.num_adapters)]
    rows = max(sum(sum(a.config.ranks[p][l]) for a in adapters) for p in ("gate", "up", "down")
               for l in range(shape.num_hidden_layers))
    eargs = EngineArgs(model=f"{args.shape}-random", dtype="bfloat16", device="cuda", max_loras=args.num_adapters,
                       lora_pool_rank_rows=rows, lora_dense_rank_rows=16, max_num_seqs=max(args.batches),
                       max_num_batched_tokens=args.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS[args.shape],
                       enforce_eager=args.enforce_eager, max_model_len=4096)
    model = get_model_class(config["model_type"]).random(config, torch.bfloat16, dev)
    runner = ModelRunner(eargs, None, model=model, config=config)
    engine = LLMEngine(eargs, model_dir=".", runner=runner, tokenizer=NullTokenizer())
    names = [f"ad{i}" for i in range(args.num_adapters)]
    for n, a in zip(names, adapters):
        engine.pool.add(n, a)
    del adapters
    run_engine(engine, 4, 16, 8, [None])  # warm up (Triton compile, graphs)
    run_engine(engine, 4, 16, 8, names)
    with_adapters = f"adapters_{args.num_adapters}"
    results = {"shape": args.shape, "engine": {"no_adapter": [], with_adapters: []}, "hf_generate": []}
    for b in args.batches:
        results["engine"]["no_adapter"].append(run_engine(engine, b, args.prompt_len, args.output_len, [None]))
        results["engine"][with_adapters].append(run_engine(engine, b, args.prompt_len, args.output_len, names))
    results["adapter_memory"] = adapter_memory(engine, names)
    results["kv_blocks"] = engine.blocks.num_blocks
    del engine, runner, model
    torch.cuda.empty_cache()
    if not args.skip_hf:
        for b in args.hf_batches:
            results["hf_generate"].append(run_hf(config, b, args.prompt_len, args.output_len))
    results["meta"] = {"device": torch.cuda.get_device_name(0), "date": datetime.datetime.now().isoformat(),
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "python": platform.python_version(), "prompt_len": args.prompt_len,
                       "output_len": args.output_len, "cuda_graphs": not args.enforce_eager}
    print(f"{'system':<22}{'batch':>6}{'out tok/s':>12}{'ms/token':>10}")
    for label, rows_ in (("engine, no adapter", results["engine"]["no_adapter"]),
                         (f"engine, {args.num_adapters} adapters", results["engine"][with_adapters]),
                         ("transformers generate", results["hf_generate"])):
        for r in rows_:
            print(f"{label:<22}{r['batch']:>6}{r['output_tok_s']:>12.1f}{r['per_token_latency_ms']:>10.2f}")
    m = results["adapter_memory"]
    print(f"adapter buffers: rank-exact {m['rank_exact_bytes'] / 2**30:.2f} GiB vs padded (rank 32) "
          f"{m['padded_rank32_bytes'] / 2**30:.2f} GiB ({100 * m['saving']:.0f}% less); pool allocated "
          f"{m['pool_allocated_bytes'] / 2**30:.2f} GiB")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
