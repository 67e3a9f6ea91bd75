"""The first-light summary: read what `benchmarks/gpu_all.sh` wrote and compute the headline
figures of the GPU issue, with their targets, as one JSON file.

    python benchmarks/gpu_summary.py bench-gpu --out benchmarks/results/gpu-h100.json

Reads DIR/engine.json (benchmarks/engine.py), DIR/kernels.json (kernel_bench.py --large),
DIR/serve.json (serve.py, 64 streaming clients) and DIR/train_overhead.json
(train_overhead.py). A missing file or row gives null for the figures that need it. Computes
nothing that was not measured:

- decode_tok_s {1, 64, 256}: the engine with no adapter, decode-only tok/s at those batches;
- adapters16_ratio_b64: decode tok/s with the resident adapters / with none, batch 64;
- rank_exact_vs_padded {64, 256}: one MoE layer's LoRA time (the layer with LoRA minus the
  base layer) with every expert padded to rank 32 / rank-exact, at 64 and 256 tokens
  (`..._layer` gives the whole layer's ratio);
- fused_moe_vs_grouped_mm_min: the smallest torch grouped_mm time / fused MoE time over the
  token counts measured;
- http_vs_offline_b64: HTTP output tok/s with 64 streaming clients / the offline engine's
  output tok/s at batch 64 with the resident adapters (both with adapters; both count
  prefill);
- train_drlora_vs_lora {time, memory}: DR-LoRA / uniform LoRA training step at OLMoE shapes,
  median time and peak memory;
- structured_half_vs_none_device0 (the structured-outputs issue's cost target, from the `host`
  stage, DIR/host_constrained_*_r*.json): the stub-model host step with half of batch 64
  schema-constrained / with none, no device time, ratio of the rounds' medians; `_inline` is
  the same with the masks filled in the calling thread (DRLORA_GRAMMAR_THREADS=1).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

TARGETS = {  # (figure, comparison, bound) as the issue states them
    "decode_tok_s.1": (">=", 250), "decode_tok_s.64": (">=", 8000), "decode_tok_s.256": (">=", 20000),
    "adapters16_ratio_b64": (">=", 0.9), "rank_exact_vs_padded.64": (">=", 1.8),
    "rank_exact_vs_padded.256": (">=", 1.8), "fused_moe_vs_grouped_mm_min": (">=", 1.0),
    "http_vs_offline_b64": (">=", 0.8), "train_drlora_vs_lora.time": ("<=", 1.1),
    "train_drlora_vs_lora.memory": ("<=", 1.1),
    "structured_half_vs_none_device0": ("<=", 1.5),  # the structured-outputs issue's
}


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def _at(rows: list[dict], key: str, value: int) -> dict | None:
    return next((r for r in rows if r.get(key) == value), None)


def engine_figures(engine: dict | None) -> dict:
    out = {"decode_tok_s": {"1": None, "64": None, "256": None}, "adapters16_ratio_b64": None,
           "num_adapters": None, "offline_b64_adapters_out_tok_s": None}
    if not engine:
        return out
    series = engine.get("engine", {})
    base = series.get("no_adapter", [])
    for b in (1, 64, 256):
        r = _at(base, "batch", b)
        out["decode_tok_s"][str(b)] = r.get("decode_tok_s") if r else None
    ad_key = next((k for k in series if k.startswith("adapters_")), None)
    if ad_key is not None:
        out["num_adapters"] = int(ad_key.split("_", 1)[1])
        r0, r1 = _at(base, "batch", 64), _at(series[ad_key], "batch", 64)
        if r0 and r1:
            out["adapters16_ratio_b64"] = _ratio(r1.get("decode_tok_s"), r0.get("decode_tok_s"))
            out["offline_b64_adapters_out_tok_s"] = r1.get("output_tok_s")
    return out


def kernel_figures(kernels: dict | None) -> dict:
    out = {"rank_exact_vs_padded": {"64": None, "256": None},
           "rank_exact_vs_padded_layer": {"64": None, "256": None},
           "fused_moe_vs_grouped_mm_min": None, "fused_moe_vs_grouped_mm_worst_at": None,
           "fused_moe_vs_grouped_mm_tokens": None}
    if not kernels:
        return out
    rows = kernels.get("rows", [])
    for t in (64, 256):
        r = _at(rows, "tokens", t)
        if r:
            out["rank_exact_vs_padded"][str(t)] = r.get("exact_vs_padded_lora_part")
            out["rank_exact_vs_padded_layer"][str(t)] = r.get("exact_vs_padded_layer")
    vs = [(r["fused_vs_grouped_mm"], r["tokens"]) for r in rows if r.get("fused_vs_grouped_mm") is not None]
    if vs:
        out["fused_moe_vs_grouped_mm_min"], worst = min(vs)
        out["fused_moe_vs_grouped_mm_tokens"] = [t for _, t in sorted(vs, key=lambda x: x[1])]
        out["fused_moe_vs_grouped_mm_worst_at"] = worst
    return out


def train_figures(train: dict | None) -> dict:
    out = {"train_drlora_vs_lora": {"time": None, "memory": None}, "train_model": None}
    rows = (train or {}).get("rows", [])
    row = next((r for r in rows if str(r.get("model", "")).startswith("OLMoE")), None)
    if row is None:
        return out
    lo, dr = row.get("lora", {}), row.get("drlora", {})
    out["train_model"] = row["model"]
    out["train_drlora_vs_lora"] = {"time": _ratio(dr.get("median_ms"), lo.get("median_ms")),
                                   "memory": _ratio(dr.get("peak_mib"), lo.get("peak_mib"))}
    return out


def host_figures(folder: Path) -> dict:
    def median_step(kind: str) -> float | None:
        v = sorted(r["host_ms_per_step"] for p in sorted(folder.glob(f"host_constrained_{kind}_r*.json"))
                   for r in (_load(p) or {}).get("offline", []) if r.get("device_ms") == 0)
        return v[len(v) // 2] if v else None

    none = median_step("0")
    return {"structured_half_vs_none_device0": _ratio(median_step("0.5"), none),
            "structured_half_vs_none_device0_inline": _ratio(median_step("inline"), none)}


def figure(figures: dict, name: str):
    """A figure by its dotted name ("decode_tok_s.64"), None when absent."""
    v = figures
    for part in name.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def check(figures: dict) -> dict:
    """{figure: true/false/null}: each target met, missed, or not measured."""
    res = {}
    for name, (op, bound) in TARGETS.items():
        v = figure(figures, name)
        res[name] = None if v is None else (v >= bound if op == ">=" else v <= bound)
    return res


def summarize(folder: Path) -> dict:
    engine, kernels = _load(folder / "engine.json"), _load(folder / "kernels.json")
    serve, train = _load(folder / "serve.json"), _load(folder / "train_overhead.json")
    fig = engine_figures(engine) | kernel_figures(kernels) | train_figures(train) | host_figures(folder)
    http = ((serve or {}).get("results") or {}).get("output_tok_s")
    clients = ((serve or {}).get("config") or {}).get("concurrency")
    fig["http_vs_offline_b64"] = _ratio(http, fig.pop("offline_b64_adapters_out_tok_s")) if clients == 64 else None
    fig["http_clients"] = clients
    meta = (engine or {}).get("meta", {})
    env = (kernels or {}).get("env", {})
    return {
        "device": meta.get("device") or env.get("gpu"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": meta.get("torch") or env.get("torch"), "triton": env.get("triton"),
                     "cuda": env.get("cuda"), "transformers": meta.get("transformers"),
                     "python": meta.get("python") or env.get("python")},
        "command": "bash benchmarks/gpu_all.sh; python benchmarks/gpu_summary.py " + str(folder),
        **fig,
        "targets": {k: f"{op} {b}" for k, (op, b) in TARGETS.items()},
        "met": check(fig),
        "sources": {n: (folder / f"{n}.json").exists() for n in ("engine", "kernels", "serve", "train_overhead")},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="gpu_all.sh's output folder (OUT, default bench-gpu)")
    ap.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = ap.parse_args(argv)
    if not args.folder.is_dir():
        print(f"gpu_summary.py: {args.folder} is not a folder", file=sys.stderr)
        return 2
    s = summarize(args.folder)
    print(f"{s['device']}  {s['versions']}")
    for name, target in s["targets"].items():
        v = figure(s, name)
        met = s["met"][name]
        shown = "not measured" if v is None else f"{v:,.3f}" if v < 100 else f"{v:,.0f}"
        print(f"  {name:<30} {shown:>14}   target {target:<9} {'' if met is None else 'met' if met else 'MISSED'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(s, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
