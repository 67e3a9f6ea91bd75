"""`drlora-train`: train a DR-LoRA adapter, or convert adapters to / from PEFT.

    drlora-train --model tiny --data examples/arith.jsonl --output adapters/arith [...]
    drlora-train train ...                      (same, explicit)
    drlora-train export --format peft ADAPTER OUT
    drlora-train import-peft PEFT_DIR OUT [--model tiny]

Bad input ends with one line `drlora-train: error: ...` and exit code 2; a failed --push
(after the adapter is written) with one such line and exit code 1.
"""

from __future__ import annotations

import argparse
import sys

from drlora.cli_help import DefaultsHelpFormatter
from drlora_train.config import ConfigError, TrainConfig

PROG = "drlora-train"
SUBCOMMANDS = ("train", "export", "import-peft")


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(message)


EPILOG = f"""other commands:
  {PROG} export --format peft ADAPTER OUT       a drlora adapter as a PEFT folder
  {PROG} import-peft PEFT_DIR OUT [--model M]   a PEFT adapter as a drlora folder
  ({PROG} train ... is this command, named explicitly; each has its own --help)

flags, data formats and the method: docs/training.md"""

# help of the flags that the loops below add (shown with their defaults)
FLAG_HELP = {
    "r_init": "initial rank of every expert",
    "r_target": "average final rank per expert: the budget",
    "r_max": "rank cap of one expert",
    "t_grow": "steps between growth events (shrunk for short runs)",
    "p_grow": "per-event growth of one expert: floor((r_max - r_init) * p_grow) ranks",
    "gamma": "rank penalty in the saliency",
    "beta": "EMA factor of routing frequency and rank importance",
    "t_buffer": "no growth in the last T_BUFFER steps (shrunk for short runs)",
    "max_steps": "optimizer steps",
    "batch_size": "global batch (split over the processes under torchrun)",
    "lr": "AdamW peak learning rate (the paper's, for OLMoE; the tiny model wants about 1e-3 to 3e-3)",
    "warmup_ratio": "linear warm-up fraction of the steps",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping (0: off)",
    "max_length": "tokens per example (longer ones are truncated)",
    "seed": "LoRA init, data order, eval split",
}


def train_parser() -> Parser:
    d = TrainConfig(data="", output="")
    p = Parser(prog=PROG, description="Train a DR-LoRA (or uniform / static) MoE expert LoRA adapter.",
               epilog=EPILOG, formatter_class=DefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default=d.model, help="tiny, tiny-qwen3-moe, tiny-qwen2-moe, tiny-mixtral, an alias (olmoe, "
      "qwen3-moe, qwen2-moe, mixtral), a local HF folder or a hub id")
    a("--data", required=True, help="JSONL: prompt+completion, messages or text records")
    a("--output", required=True, help="adapter folder to write")
    a("--method", default=d.method, choices=["drlora", "lora", "static"],
      help="drlora: dynamic ranks; lora: uniform r-target; static: ranks from the base's routing, fixed")
    g = p.add_argument_group("ranks and growth")
    for name, typ in (("r_init", int), ("r_target", int), ("r_max", int), ("t_grow", int),
                      ("p_grow", float), ("gamma", float), ("beta", float), ("t_buffer", int)):
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=getattr(d, name), help=FLAG_HELP[name])
    g.add_argument("--frequency", default=d.frequency, choices=["weight", "count"],
                   help="routing frequency: mean routing weight (paper) or top-k counts (public code)")
    g.add_argument("--importance", default=d.importance, choices=["product", "sum"],
                   help="rank importance: product of the A and B terms (paper) or their sum (public code)")
    g.add_argument("--targets", default=",".join(d.targets), help="comma list of gate,up,down")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 * r-max: scale 2)")
    g.add_argument("--train-router", action="store_true", help="train the router after warm-up (paper default; off here)")
    g.add_argument("--shared-rank", type=int, default=d.shared_rank,
                   help="Qwen2-MoE: uniform LoRA of this rank on the shared expert's --targets (default 0: none)")
    o = p.add_argument_group("optimisation")
    for name, typ in (("max_steps", int), ("batch_size", int), ("lr", float), ("warmup_ratio", float),
                      ("weight_decay", float), ("max_grad_norm", float), ("max_length", int), ("seed", int)):
        o.add_argument("--" + name.replace("_", "-"), type=typ, default=getattr(d, name), help=FLAG_HELP[name])
    e = p.add_argument_group("data and eval")
    e.add_argument("--eval-fraction", type=float, default=d.eval_fraction, help="held-out share of --data")
    e.add_argument("--eval-data", default=None, help="held-out JSONL (instead of --eval-fraction)")
    e.add_argument("--eval-max-examples", type=int, default=d.eval_max_examples, help="eval examples used")
    e.add_argument("--eval-max-new-tokens", type=int, default=d.eval_max_new_tokens,
                   help="greedy tokens generated for exact match")
    e.add_argument("--static-examples", type=int, default=d.static_examples,
                   help="training examples the static method routes through the base")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    r.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="base weights (auto: bfloat16 on CUDA, float32 on CPU; LoRA is fp32)")
    r.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="write OUTPUT/checkpoint/state.pt every N steps (0: never)")
    r.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    r.add_argument("--log-every", type=int, default=d.log_every, help="steps between console JSON lines")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    r.add_argument("--push", default=None, metavar="URL", help="after training, load the adapter into a running server")
    r.add_argument("--api-key", default=None, help="bearer token for --push")
    return p


def to_config(ns: argparse.Namespace) -> TrainConfig:
    v = vars(ns).copy()
    v["targets"] = tuple(t.strip() for t in v["targets"].split(",") if t.strip())
    v["progress"] = not v.pop("no_progress")
    return TrainConfig(**v)


def export_parser() -> Parser:
    p = Parser(prog=f"{PROG} export", description="Convert a drlora adapter to another format.")
    p.add_argument("--format", required=True, choices=["peft"])
    p.add_argument("adapter")
    p.add_argument("out")
    return p


def import_parser() -> Parser:
    p = Parser(prog=f"{PROG} import-peft", description="Convert a PEFT expert/attention LoRA folder to drlora.")
    p.add_argument("peft_dir")
    p.add_argument("out")
    p.add_argument("--model", default=None, help="base model (default: the PEFT config's base)")
    return p


def _train(argv: list[str]) -> int:
    cfg = to_config(train_parser().parse_args(argv))
    cfg.check()
    from drlora_train.run import train

    train(cfg)
    return 0


def _export(argv: list[str]) -> int:
    ns = export_parser().parse_args(argv)
    from drlora.peft import export_peft

    out = export_peft(ns.adapter, ns.out)
    print(f"wrote PEFT adapter {out}")
    return 0


def _import(argv: list[str]) -> int:
    ns = import_parser().parse_args(argv)
    from drlora.peft import import_peft

    out = import_peft(ns.peft_dir, ns.out, ns.model)
    print(f"wrote drlora adapter {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd, rest = ("train", argv)
    if argv and argv[0] in SUBCOMMANDS:
        cmd, rest = argv[0], argv[1:]
    run = {"train": _train, "export": _export, "import-peft": _import}[cmd]
    from drlora.adapter_format import AdapterFormatError
    from drlora.models import ModelNotFoundError
    from drlora_train.data import DataError
    from drlora_train.report import PushError

    try:
        return run(rest)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (UsageError, ConfigError, DataError, AdapterFormatError, ModelNotFoundError, PushError,
            OSError) as exc:  # OSError: an unwritable or misplaced output path, ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 1 if isinstance(exc, PushError) else 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
