"""Quality benchmark: DR-LoRA vs uniform LoRA vs static allocation at the same rank budget.

Trains `drlora-train` once per (task, method, seed) on the demo tasks (examples/<task>.*.jsonl),
reads exact match on the held-out test set from each adapter's provenance, counts parameters,
measures the tiny base's routing statistics per task, and writes
benchmarks/results/quality.json, docs/img/quality_<task>_ranks.png and docs/RESULTS.md.

    python benchmarks/quality.py --tasks plus,flip,lookup --seeds 0,1,2 --steps 500
    python benchmarks/quality.py --report-only      # rebuild JSON/figures/markdown from finished runs
    python benchmarks/quality.py --tag tight --ranks 1,2,8 --steps 1000 ...
        # another setup: benchmarks/results/quality-tight.json, docs/RESULTS-tight.md, docs/img/quality-tight_*

Each training run is a subprocess pinned to one thread; at most --jobs (2) run at once.
A run whose adapter folder already exists is not repeated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quality.json"
DOC = ROOT / "docs" / "RESULTS.md"
IMG = ROOT / "docs" / "img"
CHILD = ("import sys, torch; torch.set_num_threads(1); from drlora_train.cli import main; "
         "sys.exit(main(sys.argv[1:]))")
METHODS = ("drlora", "lora", "static", "lora_rmax")


@dataclass(frozen=True)
class Setup:
    steps: int
    lr: float
    r_init: int
    r_target: int
    r_max: int
    p_grow: float
    batch_size: int
    eval_examples: int
    model: str = "tiny"


@dataclass(frozen=True)
class RunSpec:
    task: str
    method: str  # drlora | lora | static | lora_rmax (uniform LoRA at r_max: the upper reference)
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}-{self.method}-s{self.seed}"

    def argv(self, s: Setup, out: Path) -> list[str]:
        ranks = (s.r_max, s.r_max, s.r_max) if self.method == "lora_rmax" else (s.r_init, s.r_target, s.r_max)
        return ["--model", s.model, "--data", f"examples/{self.task}.train.jsonl",
                "--eval-data", f"examples/{self.task}.test.jsonl", "--output", str(out),
                "--method", "lora" if self.method == "lora_rmax" else self.method,
                "--r-init", str(ranks[0]), "--r-target", str(ranks[1]), "--r-max", str(ranks[2]),
                "--p-grow", str(s.p_grow), "--max-steps", str(s.steps), "--lr", str(s.lr),
                "--batch-size", str(s.batch_size), "--seed", str(self.seed),
                "--eval-max-examples", str(s.eval_examples), "--eval-max-new-tokens", "8",
                "--no-progress", "--log-every", "100000"]


@dataclass
class RunResult:
    task: str
    method: str
    seed: int
    exact_match: float
    eval_loss: float
    eval_examples: int
    train_seconds: float
    ranks: list[list[int]]
    active_params: int  # parameters stored in the adapter (active ranks only), counted from the file
    allocated_params: int  # parameters allocated during training (every expert at the run's r_max)
    growth_events: list[int] = field(default_factory=list)


def run_one(spec: RunSpec, s: Setup, work: Path) -> str:
    out = work / spec.name
    if (out / "drlora_adapter.json").exists():
        return f"{spec.name}: exists"
    cmd = [sys.executable, "-c", CHILD, *spec.argv(s, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (work / f"{spec.name}.log").write_text(p.stdout + p.stderr)
    status = "ok" if p.returncode == 0 else f"FAILED rc={p.returncode}"
    return f"{spec.name}: {status} in {time.perf_counter() - t0:.0f}s"


def collect(spec: RunSpec, work: Path) -> RunResult | None:
    out = work / spec.name
    meta = out / "drlora_adapter.json"
    if not meta.exists():
        return None
    from safetensors import safe_open

    cfg = json.loads(meta.read_text())
    prov, shape = cfg["provenance"], cfg["base_shape"]
    with safe_open(str(out / "drlora_adapter.safetensors"), "pt") as f:
        active = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    # one rank of one expert: (in + out) of every target projection (gate/up: H -> I, down: I -> H)
    per_rank = len(cfg["ranks"]) * (shape["hidden_size"] + shape["intermediate_size"])
    L, E = shape["num_hidden_layers"], shape["num_experts"]
    done = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if '"done"' in x]
    ranks = next(iter(cfg["ranks"].values()))
    return RunResult(spec.task, spec.method, spec.seed, prov["eval"]["exact_match"], prov["eval"]["eval_loss"],
                     prov["eval"]["exact_match_examples"], done[-1]["train_seconds"] if done else float("nan"),
                     ranks, int(active), L * E * prov["r_max"] * per_rank,
                     prov["growth"]["events"] if spec.method == "drlora" else [])


def routing_stats(task: str, model: str, n: int = 256) -> list[dict]:
    """Per layer: top-k selection distribution of the frozen base over prompt+completion tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drlora.models import resolve_model

    path = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    recs = [json.loads(x) for x in (ROOT / "examples" / f"{task}.train.jsonl").read_text().splitlines()[:n]]
    k, E = m.config.num_experts_per_tok, m.config.num_experts
    counts = torch.zeros(m.config.num_hidden_layers, E)
    with torch.no_grad():
        for r in recs:
            ids = torch.tensor([tok(r["prompt"] + r["completion"])["input_ids"]])
            logits = m(input_ids=ids, output_router_logits=True).router_logits
            for l, lg in enumerate(logits):
                top = lg.reshape(-1, E).topk(k, dim=-1).indices.flatten()
                counts[l] += torch.bincount(top, minlength=E).float()
    out = []
    for l in range(counts.shape[0]):
        p = counts[l] / counts[l].sum()
        ent = float(-(p[p > 0] * p[p > 0].log2()).sum())
        out.append({"layer": l, "entropy_bits": round(ent, 3), "max_entropy_bits": round(math.log2(E), 3),
                    "top4_share": round(float(p.sort(descending=True).values[:4].sum()), 3),
                    "top_experts": [int(i) for i in p.argsort(descending=True)[:4]],
                    "distribution": [round(float(x), 4) for x in p]})
    return out


def rank_figure(task: str, results: list[RunResult], r_init: int, r_max: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted((r for r in results if r.task == task and r.method in ("drlora", "static")),
                    key=lambda r: (r.method, r.seed))
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.0, 1.5 * len(panels) + 0.8), squeeze=False)
    fig.subplots_adjust(hspace=0.75, top=0.93, bottom=0.06)
    im = None
    for ax, r in zip(axes[:, 0], panels):
        im = ax.imshow(r.ranks, aspect="auto", cmap="viridis", vmin=r_init, vmax=r_max, interpolation="nearest")
        ax.set_ylabel("layer", fontsize=7)
        ax.set_title(f"{r.method} seed {r.seed}: exact match {r.exact_match:.3f}", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_xticks(range(len(r.ranks[0])))
    axes[-1, 0].set_xlabel("expert", fontsize=7)
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="final rank", shrink=0.8)
    fig.suptitle(f"{task}: final rank per expert (layers x experts)", fontsize=9)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def summarise(results: list[RunResult], tasks: list[str]) -> dict:
    table = {}
    for t in tasks:
        for meth in METHODS:
            rs = [r for r in results if r.task == t and r.method == meth]
            if not rs:
                continue
            m, sd = mean_std([r.exact_match for r in rs])
            table[f"{t}/{meth}"] = {"task": t, "method": meth, "n": len(rs), "exact_match_mean": round(m, 4),
                                    "exact_match_std": round(sd, 4),
                                    "seeds": {r.seed: r.exact_match for r in rs},
                                    "eval_loss_mean": round(mean_std([r.eval_loss for r in rs])[0], 4),
                                    "active_params": rs[0].active_params,
                                    "allocated_params": rs[0].allocated_params,
                                    "train_seconds_mean": round(mean_std([r.train_seconds for r in rs])[0], 1)}
    return table


def corr(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx, sy = math.sqrt(sum((a - mx) ** 2 for a in x)), math.sqrt(sum((b - my) ** 2 for b in y))
    return sxy / (sx * sy) if sx > 0 and sy > 0 else float("nan")


def rank_vs_routing(results: list[RunResult], routing: dict[str, list[dict]]) -> dict:
    """How far each method's final ranks follow the base's routing: per-layer Pearson r of rank vs usage,
    and the share of the layer's ranks held by the layer's 4 most used experts (uniform: 0.25)."""
    out: dict[str, dict] = {}
    for t, layers in routing.items():
        for meth in ("drlora", "static"):
            rs = [r for r in results if r.task == t and r.method == meth]
            if not rs:
                continue
            cs, shares = [], []
            for r in rs:
                for lay in layers:
                    ranks = r.ranks[lay["layer"]]
                    cs.append(corr([float(x) for x in ranks], lay["distribution"]))
                    shares.append(sum(ranks[e] for e in lay["top_experts"]) / sum(ranks))
            out[f"{t}/{meth}"] = {"mean_corr_rank_usage": round(sum(cs) / len(cs), 3),
                                  "top4_rank_share": round(sum(shares) / len(shares), 3)}
    return out


def versions(model: str, sha: str | None = None) -> dict:
    import hashlib

    import torch
    import transformers

    from drlora.models import resolve_model

    weights = resolve_model(model) / "model.safetensors"
    if sha is None:
        sha = hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.exists() else "n/a"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "base weights sha256[:16]": sha}


MARK = "<!-- discussion: hand-written, kept when the script rewrites this file -->"


def markdown(rep: dict, tasks: list[str], doc: Path = DOC, stem: str = "quality") -> str:
    """The measured part of the report; the text after MARK in an existing file is kept."""
    s = rep["setup"]
    lines = ["# Quality benchmark: DR-LoRA vs uniform LoRA vs static allocation", "",
             f"Generated by `{rep['command']}` on {rep['date']}.", "",
             f"Machine: {rep['machine']}. Versions: " + ", ".join(f"{k} {v}" for k, v in rep["versions"].items())
             + ".", "",
             f"Setup: base `{s['model']}` (drlora/assets/tiny: 4 layers, 16 experts, top-2), LoRA on expert "
             f"up/down, r_init/r_target/r_max = {s['r_init']}/{s['r_target']}/{s['r_max']}, p_grow {s['p_grow']}, "
             f"{s['steps']} steps x batch {s['batch_size']}, lr {s['lr']} (linear warm-up 3%, decay to 0), "
             f"router frozen, other flags at the trainer's defaults (the trainer shrinks T_grow/T_buffer for "
             f"short runs). Score: exact match (greedy) on the first {s['eval_examples']} records of "
             f"`examples/<task>.test.jsonl`, computed by the trainer at the end of each run. "
             f"`lora_rmax` = uniform LoRA at rank r_max = {s['r_max']} ({s['r_max'] / s['r_target']:g}x the budget): upper reference.", "",
             "## Accuracy and parameters", "",
             "| task | method | exact match (mean +- std) | per seed | eval loss | active params | "
             "allocated in training | train s |", "|---|---|---|---|---|---|---|---|"]
    for row in rep["summary"].values():
        seeds = ", ".join(f"{v:.3f}" for _, v in sorted(row["seeds"].items()))
        lines.append(f"| {row['task']} | {row['method']} | {row['exact_match_mean']:.3f} +- "
                     f"{row['exact_match_std']:.3f} (n={row['n']}) | {seeds} | {row['eval_loss_mean']:.3f} | "
                     f"{row['active_params']:,} | {row['allocated_params']:,} | {row['train_seconds_mean']} |")
    lines += ["", "Active params: numbers stored in the adapter (active ranks only), counted from its "
              "safetensors. Allocated: the trainer allocates every expert's A and B at r_max for every "
              "method (L x E x r_max x (in+out) per projection); only active ranks receive gradients.", "",
              "## Final ranks (DR-LoRA and static)", ""]
    for t in tasks:
        lines += [f"![{t} ranks](img/{stem}_{t}_ranks.png)", ""]
    if not rep["routing"]:
        lines += ["## Routing statistics", "", "Not measured in this report (see the discussion).", ""]
    else:
        lines += routing_lines(rep)
    lines += ["", MARK, ""]
    old = doc.read_text() if doc.exists() else ""
    tail = old.split(MARK, 1)[1].lstrip("\n") if MARK in old else "## Discussion\n\n(to be written)\n"
    return "\n".join(lines) + tail


def routing_lines(rep: dict) -> list[str]:
    lines = ["## Routing statistics of the frozen tiny base on each task", "",
              "Top-2 selections over prompt+completion tokens of the first 256 training records; entropy of "
              "the expert-usage distribution (uniform over 16 experts: 4 bits) and the share of the 4 most "
              "used experts (uniform: 0.25).", "",
              "| task | " + " | ".join(f"L{l} entropy / top-4" for l in range(len(next(iter(rep['routing'].values())))))
              + " |", "|---" * (1 + len(next(iter(rep["routing"].values())))) + "|"]
    for t, layers in rep["routing"].items():
        lines.append(f"| {t} | " + " | ".join(f"{x['entropy_bits']:.2f} / {x['top4_share']:.2f}" for x in layers)
                     + " |")
    lines += ["", "Final ranks vs the base's routing (mean over seeds and layers): Pearson r between an "
              "expert's final rank and its usage share, and the share of the layer's ranks held by its 4 most "
              "used experts (uniform LoRA: 0.25).", "", "| task/method | r(rank, usage) | top-4 experts' rank share |",
              "|---|---|---|"]
    for k, v in rep["rank_vs_routing"].items():
        lines.append(f"| {k} | {v['mean_corr_rank_usage']:.2f} | {v['top4_rank_share']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="plus,flip,lookup")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--ranks", default="4,8,16", help="r_init,r_target,r_max")
    ap.add_argument("--p-grow", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-examples", type=int, default=200)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/drlora_quality")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--tag", default="", help="name another setup's outputs: quality-TAG.json, RESULTS-TAG.md")
    ap.add_argument("--json", default=None, help="results file (default benchmarks/results/quality[-TAG].json)")
    ap.add_argument("--no-doc", action="store_true", help="write only the JSON (no figures, no docs/RESULTS.md)")
    ap.add_argument("--skip-routing", action="store_true",
                    help="no routing statistics (use when the base the runs used is no longer on disk)")
    ap.add_argument("--base-sha", default=None,
                    help="record this base-weights sha256 prefix instead of hashing the current base")
    ns = ap.parse_args(argv)
    r_init, r_target, r_max = (int(x) for x in ns.ranks.split(","))
    s = Setup(ns.steps, ns.lr, r_init, r_target, r_max, ns.p_grow, ns.batch_size, ns.eval_examples, ns.model)
    tasks, seeds = ns.tasks.split(","), [int(x) for x in ns.seeds.split(",")]
    methods = ns.methods.split(",")
    work = Path(ns.workdir) / f"steps{s.steps}-r{r_init}-{r_target}-{r_max}"
    work.mkdir(parents=True, exist_ok=True)
    specs = [RunSpec(t, m, sd) for t in tasks for sd in seeds for m in methods]
    t0 = time.perf_counter()
    if not ns.report_only:
        with ThreadPoolExecutor(ns.jobs) as pool:
            for msg in pool.map(lambda sp: run_one(sp, s, work), specs):
                print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)
    results = [r for r in (collect(sp, work) for sp in specs) if r is not None]
    done_tasks = [t for t in tasks if any(r.task == t for r in results)]
    import torch

    torch.set_num_threads(1)
    routing = {} if ns.skip_routing else {t: routing_stats(t, s.model) for t in done_tasks}
    stem = f"quality-{ns.tag}" if ns.tag else "quality"
    doc = DOC.with_name(f"RESULTS-{ns.tag}.md") if ns.tag else DOC
    IMG.mkdir(parents=True, exist_ok=True)
    for t in done_tasks if not ns.no_doc else []:
        rank_figure(t, results, r_init, r_max, IMG / f"{stem}_{t}_ranks.png")
    args = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    cmd = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in args)
    report = {"command": cmd, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} CPU, 2 shared cores, 1 torch thread per run, "
                         f"{ns.jobs} runs at once", "versions": versions(s.model, ns.base_sha), "setup": asdict(s),
              "summary": summarise(results, done_tasks), "routing": routing,
              "rank_vs_routing": rank_vs_routing(results, routing), "runs": [asdict(r) for r in results]}
    out = Path(ns.json) if ns.json else RESULTS.with_name(f"{stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if not ns.no_doc:
        doc.write_text(markdown(report, done_tasks, doc, stem))
    print(f"wrote {out} ({len(results)} runs)" + ("" if ns.no_doc else f" and {doc}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
