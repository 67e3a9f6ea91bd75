"""DR-LoRA vs uniform LoRA: training step time at the same r_max (target overhead <= 15%).

Both methods run the same masked r_max-wide LoRA; DR-LoRA adds the per-step rank-importance
and routing-frequency EMAs and the growth events (included in its timing).

    python benchmarks/train_overhead.py                    # CPU: the tiny model
    python benchmarks/train_overhead.py --device cuda      # + OLMoE-1B-7B shapes, random weights,
                                                           #   a --layers slice (default 2 of 16)

Prints a table and writes JSON (device, date, versions, timings) to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from drlora_train import distributed as dd
from drlora_train.config import TrainConfig
from drlora_train.data import Example
from drlora_train.growth import GrowthParams, plan_schedule
from drlora_train.lora import LoraSpec, attach_lora
from drlora_train.saliency import SaliencyState
from drlora_train.trainer import Run, growth_event, init_ranks, make_optimizer, train_step


def tiny_model(device):
    from transformers import AutoModelForCausalLM
    from drlora.models import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model("tiny"), dtype=torch.float32).to(device)


def olmoe_slice(layers: int, device, dtype):
    """OLMoE-1B-7B shapes (H 2048, I 1024, 64 experts, top-8), random weights, `layers` layers."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                      norm_topk_prob=False, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = OlmoeForCausalLM(cfg).to(dtype)
    return model


def random_examples(n: int, seq: int, vocab: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=g).tolist()
        out.append(Example(ids, ids))
    return out


def time_method(method: str, make_model, args, device) -> dict:
    model = make_model()
    model.config.use_cache = False
    E = model.config.num_experts
    cfg = TrainConfig(data="", output="", method=method, r_init=args.r_init, r_target=args.r_target,
                      r_max=args.r_max, batch_size=args.batch_size, lr=1e-4, max_steps=args.steps,
                      warmup_ratio=0.0, t_grow=args.t_grow, t_buffer=0)
    torch.manual_seed(0)
    layers = attach_lora(model, LoraSpec(cfg.r_max))
    model.train()
    opt, sched = make_optimizer(cfg, model, layers, cfg.max_steps + args.warmup, 0)
    run = Run(model, layers, opt, sched, SaliencyState.zeros(len(layers), 2, E, cfg.r_max))
    gp = GrowthParams(cfg.r_init, cfg.r_target, cfg.r_max, cfg.p_grow)
    examples = random_examples(64, args.seq, model.config.vocab_size)
    init_ranks(run, cfg, gp, examples, 0, device, dd.Dist())
    events = set(plan_schedule(args.steps, 0, args.t_grow, 0).events)
    times = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(args.warmup + args.steps):
        sync()
        t = time.perf_counter()
        train_step(run, cfg, examples, 0, device, dd.Dist(), 0)
        if method == "drlora" and i >= args.warmup and (i - args.warmup + 1) in events:
            growth_event(run, cfg, gp, len(events), last=False)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"median_ms": 1e3 * statistics.median(times), "mean_ms": 1e3 * statistics.fmean(times),
            "steps": len(times), "peak_mib": peak}


def bench(name: str, make_model, args, device) -> dict:
    res = {}
    for rep in range(args.repeats):  # alternate methods so load drift hits both alike
        for method in ("lora", "drlora"):
            r = time_method(method, make_model, args, device)
            res.setdefault(method, []).append(r)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    row = {"model": name}
    for m, rs in res.items():
        row[m] = {"median_ms": min(r["median_ms"] for r in rs), "peak_mib": rs[-1]["peak_mib"]}
    row["overhead_pct"] = 100 * (row["drlora"]["median_ms"] / row["lora"]["median_ms"] - 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="best-of over runs (noisy shared machines)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--r-init", type=int, default=8)
    ap.add_argument("--r-target", type=int, default=16)
    ap.add_argument("--r-max", type=int, default=32)
    ap.add_argument("--t-grow", type=int, default=10, help="growth every N timed steps (DR-LoRA)")
    ap.add_argument("--layers", type=int, default=2, help="OLMoE slice depth on CUDA")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    ap.add_argument("--out", default="benchmarks/train_overhead.json")
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [bench("tiny (4L, 16 experts, H=I=128, fp32)", lambda: tiny_model(device), args, device)]
    if device.type == "cuda":
        rows.append(bench(f"OLMoE-1B-7B shapes, {args.layers} of 16 layers, random, bf16",
                          lambda: olmoe_slice(args.layers, device, torch.bfloat16), args, device))
    print(f"{'model':48} {'LoRA ms/step':>13} {'DR-LoRA ms/step':>16} {'overhead':>9}")
    for r in rows:
        print(f"{r['model']:48} {r['lora']['median_ms']:13.1f} {r['drlora']['median_ms']:16.1f} "
              f"{r['overhead_pct']:8.1f}%")
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "python": platform.python_version(),
            "args": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
