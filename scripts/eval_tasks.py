"""Zero-shot check of a base model on the demo tasks, plus its per-family perplexity.

Loads the model with AutoModelForCausalLM / AutoTokenizer (the path a real checkpoint takes),
scores greedy exact match on each examples/<task>.test.jsonl (continuation up to eos,
stripped, against the completion: the trainer's rule, drlora_train.evaluate) and measures
perplexity per corpus family on held-out lines (as scripts/pretrain_tiny.py does).

    python scripts/eval_tasks.py                      # the shipped tiny base
    python scripts/eval_tasks.py --model PATH --json out.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from drlora_train.data import read_jsonl
from drlora_train.evaluate import greedy_completions
from pretrain_tiny import PretrainConfig, family_stats  # same folder

ROOT = Path(__file__).resolve().parent.parent


def corpus_format(task: str, prompt: str) -> str | None:
    """The same question in the pretraining corpus's own format (a control: the base should
    do these), or None where the corpus has no such format."""
    if task == "plus":
        a, b = prompt[:-1].split(" plus ")
        return f"{a} + {b} ="
    if task == "flip":
        return f"reverse {prompt[5:-1]} ->"
    if task == "caps":
        return f"upper {prompt[5:-1]} ->"
    if task == "lookup":
        pairs, query = prompt[:-1].split(". get ")
        return ", ".join(kv.replace(":", "=") for kv in pairs.split()) + f". {query}?"
    return None


@dataclass(frozen=True)
class EvalTasksConfig:
    model: str = "tiny"
    tasks: tuple[str, ...] = ("plus", "flip", "lookup", "calls", "caps")
    max_new_tokens: int = 8
    batch_size: int = 50
    threads: int = 1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=EvalTasksConfig.model)
    ap.add_argument("--tasks", default=",".join(EvalTasksConfig.tasks))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    cfg = EvalTasksConfig(model=args.model, tasks=tuple(args.tasks.split(",")))
    torch.set_num_threads(cfg.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drlora.models import resolve_model

    path = resolve_model(cfg.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    res: dict = {"model": str(path), "tasks": {}}
    for task in cfg.tasks:
        recs = read_jsonl(ROOT / "examples" / f"{task}.test.jsonl")
        with torch.no_grad():
            outs = greedy_completions(model, tok, [r["prompt"] for r in recs], cfg.max_new_tokens,
                                      cfg.batch_size, torch.device("cpu"))
        hits = [o.strip() == r["completion"] for o, r in zip(outs, recs)]
        control = None
        if corpus_format(task, recs[0]["prompt"]) is not None:
            with torch.no_grad():
                outs_c = greedy_completions(model, tok, [corpus_format(task, r["prompt"]) for r in recs],
                                            cfg.max_new_tokens, cfg.batch_size, torch.device("cpu"))
            control = sum(o.strip() == r["completion"] for o, r in zip(outs_c, recs)) / len(recs)
        res["tasks"][task] = {"exact_match": sum(hits) / len(recs), "n": len(recs),
                              "corpus_format_exact_match": control,
                              "samples": [[r["prompt"], r["completion"], o] for o, r in
                                          zip(outs[:3], recs[:3])]}
        print(f"{task}: exact match {sum(hits)}/{len(recs)} (same items in the corpus format: "
              f"{control}); e.g. "
              + "; ".join(f"{p!r} -> {o!r} (want {c!r})" for p, c, o in res["tasks"][task]["samples"][:2]),
              flush=True)
    ppl, _ = family_stats(model, tok, PretrainConfig())
    res["held_out_ppl"] = {f: round(v["ppl"], 3) for f, v in ppl.items()}
    print("held-out perplexity per family:", json.dumps(res["held_out_ppl"]))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
