"""One training run end to end: load, train with growth, evaluate, write the adapter."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from drlora.families import UnsupportedModelError, get_family
from drlora.models import MoeShape, resolve_model, weights_fingerprint
from drlora_train import checkpoint as ckpt
from drlora_train import distributed as dd
from drlora_train.config import ConfigError, TrainConfig
from drlora_train.data import load_data
from drlora_train.evaluate import EvalConfig, evaluate
from drlora_train.growth import GrowthParams
from drlora_train.lora import LoraSpec, all_ranks, attach_lora, attach_shared_lora
from drlora_train.report import JsonlLog, LOG_NAME, PushError, build_config, push, write_outputs
from drlora_train.saliency import SaliencyState
from drlora_train.trainer import (Run, checkpoint_state, describe, final_tensors, growth_event,
                                  init_ranks, make_optimizer, plan, ranks_table, restore, train_step)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(cfg: TrainConfig, d: dd.Dist) -> torch.device:
    dev = cfg.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and d.on:
        dev = f"cuda:{d.local_rank}"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    dev = torch.device(dev)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {dev}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def base_dtype(cfg: TrainConfig, device: torch.device) -> str:
    return cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")


def load_model(path: Path, cfg: TrainConfig, device: torch.device):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar is the only one
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[base_dtype(cfg, device)]).to(device)
    model.config.use_cache = False
    return model


def say(msg: str, d: dd.Dist) -> None:
    if d.main:
        print(msg, flush=True)


def warn(msg: str, d: dd.Dist) -> None:
    if d.main:
        print(f"drlora-train: warning: {msg}", file=sys.stderr, flush=True)


def prepare_output(out: Path) -> None:
    """Refuse an --output that cannot be a writable folder now, not after training."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        raise ConfigError(f"--output {out}: {exc.strerror or exc}") from None


def read_shape(mpath: Path, name: str) -> tuple[MoeShape, dict]:
    """The base's MoeShape and raw config.json; a malformed one is a one-line ConfigError."""
    try:
        raw = json.loads((mpath / "config.json").read_text())
        return MoeShape.from_config(raw), raw
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"--model {name}: unusable {mpath / 'config.json'} ({type(exc).__name__}: {exc})") from None


def train(cfg: TrainConfig) -> dict:
    """Run training; return a summary (final ranks, eval metrics, output path)."""
    cfg.check()
    if cfg.method == "lora" and cfg.r_init > cfg.r_target:  # r_init plays no part in uniform LoRA
        cfg = replace(cfg, r_init=cfg.r_target)
    d = dd.init(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.batch_size < d.world:  # every process needs at least one example per step
        raise ConfigError(f"--batch-size {cfg.batch_size} is smaller than the {d.world} processes")
    device = pick_device(cfg, d)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(cfg.output)
    prepare_output(out)
    mpath = resolve_model(cfg.model)
    shape, raw_config = read_shape(mpath, cfg.model)
    try:
        get_family(shape.model_type)
    except UnsupportedModelError as exc:
        raise ConfigError(f"--model {cfg.model}: {exc}") from None
    if cfg.shared_rank and not shape.shared_expert_intermediate_size:
        raise ConfigError(f"--shared-rank: {cfg.model} ({shape.model_type}) has no shared expert")
    max_pos = raw_config.get("max_position_embeddings")
    if isinstance(max_pos, int) and cfg.max_length > max_pos:
        warn(f"--max-length {cfg.max_length} is more than {cfg.model}'s {max_pos} positions; using {max_pos}", d)
        cfg = replace(cfg, max_length=max_pos)
    tok = load_tokenizer(mpath)
    train_ex, eval_ex = load_data(cfg.data, tok, cfg.max_length, cfg.eval_fraction, cfg.seed, cfg.eval_data)
    # refuse a checkpoint of other settings before the model is loaded (and before restore
    # would fail on other shapes); a fresh run drops any earlier run's checkpoint
    key = (ckpt.resume_key(cfg, mpath, base_dtype(cfg, device))
           if cfg.resume or cfg.checkpoint_every else None)
    state = ckpt.load(out) if cfg.resume else None
    if state is not None:
        diffs = ckpt.resume_mismatch(state, key)
        if diffs:
            raise ConfigError(f"--resume: {ckpt.path_of(out)} was made with other settings: "
                              + "; ".join(diffs) + " (use the checkpoint's settings, or drop --resume)")
    elif d.main:
        ckpt.clear(out)
    model = load_model(mpath, cfg, device)
    torch.manual_seed(cfg.seed)  # the LoRA init: identical on every process
    spec = LoraSpec(cfg.r_max, cfg.alpha, tuple(cfg.targets))
    layers = attach_lora(model, spec)
    shared = attach_shared_lora(model, cfg.shared_rank, tuple(cfg.targets), spec.scaling) if cfg.shared_rank else []
    model.train()
    warm, sched = plan(cfg)
    opt, lr_sched = make_optimizer(cfg, model, layers, cfg.max_steps, warm, shared)
    E, P = shape.num_experts, len(cfg.targets)
    run = Run(model, layers, opt, lr_sched, SaliencyState.zeros(len(layers), P, E, cfg.r_max), shared=shared)
    gp = GrowthParams(cfg.r_init, cfg.r_target, cfg.r_max, cfg.p_grow)
    log = JsonlLog(out / LOG_NAME, d.main)
    if state is None and d.main and (out / LOG_NAME).exists():
        (out / LOG_NAME).unlink()  # a fresh run starts a fresh log; a resumed one appends
    if cfg.resume and state is None:
        say(f"--resume: no checkpoint in {out / ckpt.CKPT_DIR}; starting from step 0", d)
    if state is not None:
        restore(run, state, cfg)
        say(f"resumed from step {run.step}", d)
    else:
        init_ranks(run, cfg, gp, train_ex, tok.pad_token_id, device, d)
        say(describe(cfg, shape), d)
        if cfg.method == "drlora":
            for n in sched.notes:
                say(f"schedule: {n}", d)
            say(f"schedule: warm-up {warm} steps, growth at steps {list(sched.events)}", d)
            log.write({"event": "schedule", "t_warmup": sched.t_warmup, "t_end": sched.t_end,
                       "t_grow": sched.t_grow, "events": list(sched.events), "notes": sched.notes})
    bar = None
    if cfg.progress and d.main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=run.step, desc=cfg.method, dynamic_ncols=True)
    t0 = time.perf_counter()
    while run.step < cfg.max_steps:
        loss = train_step(run, cfg, train_ex, tok.pad_token_id, device, d, warm)
        rec = {"step": run.step, "loss": round(loss, 6), "lr": run.scheduler.get_last_lr()[0],
               "rank_total": int(all_ranks(layers).sum())}
        if cfg.method == "drlora" and run.step in sched.events:
            last = run.step == sched.events[-1]
            ev = growth_event(run, cfg, gp, len(sched.events), last)
            run.history.append(ev)
            rec.update(event="growth", grown=ev["grown"], rank_total=int(all_ranks(layers).sum()))
        log.write(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", ranks=rec["rank_total"])
        if run.step % cfg.log_every == 0 or "event" in rec:
            (bar.write if bar is not None else lambda m: say(m, d))(json.dumps(rec))
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < cfg.max_steps:
            if d.main:
                ckpt.save(out, checkpoint_state(run, cfg, key))
    if bar is not None:
        bar.close()
    secs = time.perf_counter() - t0
    if cfg.method != "drlora" or run.history[-1]["step"] != run.step:
        run.history.append({"step": run.step, "grown": 0, "ranks": ranks_table(run).tolist()})
    try:
        metrics = evaluate(model, tok, eval_ex, EvalConfig(cfg.eval_max_examples, cfg.eval_max_new_tokens),
                           device)
    except Exception as exc:  # a broken eval must not cost the trained adapter: record it, write on
        msg = (str(exc).strip().splitlines() or [""])[0]
        metrics = {"error": f"{type(exc).__name__}: {msg}"}
        warn(f"evaluation failed ({metrics['error']}); the adapter is written without eval metrics", d)
    if metrics.get("eval_loss", 0.0) is None:
        warn("no eval example has a token to score (all truncated by --max-length?): eval_loss is null", d)
    summary = {"output": str(out), "steps": run.step, "train_seconds": round(secs, 2),
               "ranks": ranks_table(run).tolist(), "eval": metrics}
    if d.main:
        prov = {"trainer": "drlora_train", "method": cfg.method, "r_init": cfg.r_init,
                "r_target": cfg.r_target, "r_max": cfg.r_max, "shared_rank": cfg.shared_rank,
                "steps": run.step, "seed": cfg.seed,
                "base_fingerprint": weights_fingerprint(mpath),
                "data": str(Path(cfg.data).resolve()), "eval": metrics, "lr": cfg.lr,
                "batch_size": cfg.batch_size, "world_size": d.world,
                "growth": {"t_grow": sched.t_grow, "p_grow": cfg.p_grow, "gamma": cfg.gamma,
                           "beta": cfg.beta, "events": list(sched.events),
                           "frequency": cfg.frequency, "importance": cfg.importance}}
        base_name = str(mpath) if Path(cfg.model).exists() else cfg.model
        acfg = build_config(base_name, shape, ranks_table(run), tuple(cfg.targets), layers[0].scaling,
                            cfg.train_router, prov, cfg.shared_rank)
        write_outputs(out, acfg, final_tensors(run, cfg), run.history)
        log.write({"event": "done", **summary})
        # the same count as the budget and the log's rank_total: one rank per expert, which
        # every target projection of that expert has
        say(f"wrote {out} ({int(all_ranks(layers).sum())} expert ranks on {','.join(cfg.targets)}, "
            f"{acfg.num_parameters()} params) eval {metrics}", d)
    push_error = None
    if d.main and cfg.push:
        try:
            say(push(cfg.push, out.name, out, cfg.api_key), d)
        except PushError as exc:
            push_error = exc
    dd.shutdown(d)
    if push_error is not None:
        raise push_error
    return summary
