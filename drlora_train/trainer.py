"""The training loop: masked-LoRA steps, DR-LoRA statistics, growth events, checkpoints.

# L layers, E experts, B batch, S sequence
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from drlora.models import MoeShape
from drlora_train import checkpoint as ckpt
from drlora_train import distributed as dd
from drlora_train.config import TrainConfig
from drlora_train.data import IGNORE, collate, global_batch_indices
from drlora_train.growth import GrowthParams, grow, initial_ranks, plan_schedule
from drlora_train.lora import (LoraLinear, MoeLoraExperts, adapter_tensors, all_ranks, full_ranks,
                               lora_parameters, router_parameters)
from drlora_train.saliency import (SaliencyConfig, SaliencyState, reset_importance, saliency,
                                   step_frequency, update_frequency, update_importance)


@dataclass
class Run:
    """Everything the loop mutates, passed explicitly."""

    model: torch.nn.Module
    layers: list[MoeLoraExperts]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stats: SaliencyState
    step: int = 0
    history: list | None = None
    shared: list[LoraLinear] = field(default_factory=list)  # Qwen2-MoE shared-expert LoRA (--shared-rank)


def ranks_table(run: Run) -> torch.Tensor:
    """(L, E) ranks over every layer of the model (0 on dense-MLP layers): what the adapter,
    the history and the summary report; growth works on the (L', E) layers with experts."""
    return full_ranks(all_ranks(run.layers), run.layers, len(run.model.model.layers))


def route_stats(layers: list[MoeLoraExperts], d: dd.Dist) -> tuple[torch.Tensor, ...]:
    """(L, E) summed routing weights, (L, E) counts, (L,) tokens of this step, over processes."""
    s = torch.stack([m.route_sum for m in layers])
    c = torch.stack([m.route_count for m in layers])
    t = torch.stack([m.route_tokens for m in layers])
    flat = dd.sum_(torch.cat([s.flatten(), c.flatten(), t]), d)
    L, E = s.shape
    for m in layers:
        m.clear_route_stats()
    return (flat[:L * E].view(L, E).cpu(), flat[L * E:2 * L * E].view(L, E).cpu(),
            flat[2 * L * E:].cpu())


def set_recording(layers: list[MoeLoraExperts], on: bool, token_mask: torch.Tensor | None) -> None:
    for m in layers:
        m.record, m.token_mask = on, token_mask


@torch.no_grad()
def base_routing_frequency(model, layers, examples, cfg: TrainConfig, pad_id: int, device,
                           d: dd.Dist) -> torch.Tensor:
    """(L, E) routing frequency of the frozen base (LoRA all-inactive) on training data."""
    saved = [m.mask.clone() for m in layers]
    for m in layers:
        m.mask.zero_()
    idx = dd.shard(list(range(min(len(examples), cfg.static_examples))), d)
    for i in range(0, len(idx), cfg.batch_size):
        b = collate([examples[j] for j in idx[i:i + cfg.batch_size]], pad_id)
        set_recording(layers, True, b["attention_mask"].flatten().to(device))
        model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
    set_recording(layers, False, None)
    s, c, t = route_stats(layers, d)
    for m, mk in zip(layers, saved):
        m.mask.copy_(mk)
    return step_frequency(s, c, t, cfg.frequency)


def make_optimizer(cfg: TrainConfig, model, layers, total: int, warmup: int, shared=()):
    params = lora_parameters(layers) + [p for m in shared for p in (m.lora_A, m.lora_B)]
    params += router_parameters(model) if cfg.train_router else []
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_lambda(step: int) -> float:  # linear warm-up, then linear decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def train_step(run: Run, cfg: TrainConfig, examples, pad_id: int, device, d: dd.Dist,
               warmup: int) -> float:
    model, layers = run.model, run.layers
    if cfg.train_router:  # the router trains after warm-up (paper); frozen before
        for w in router_parameters(model):
            w.requires_grad_(run.step >= warmup)
    gidx = global_batch_indices(len(examples), cfg.batch_size, cfg.seed, run.step)
    # normalise by the labelled tokens of the *global* batch: grads then sum across processes
    n_tok = sum(sum(x != IGNORE for x in examples[i].labels[1:]) for i in gidx)
    b = collate([examples[i] for i in dd.shard(gidx, d)], pad_id)
    b = {k: v.to(device) for k, v in b.items()}
    set_recording(layers, True, b["attention_mask"].flatten())
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    set_recording(layers, False, None)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), b["labels"][:, 1:].flatten(),
        ignore_index=IGNORE, reduction="sum") / max(n_tok, 1)
    loss.backward()
    params = [p for g in run.optimizer.param_groups for p in g["params"] if p.requires_grad]
    for p in params:  # same optimizer behaviour on 1 and N processes
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    dd.sum_grads(params, d)
    for m in layers:
        m.mask_grads()
    s, c, t = route_stats(layers, d)
    update_frequency(run.stats, step_frequency(s, c, t, cfg.frequency), cfg.beta)
    if cfg.method == "drlora":
        update_importance(run.stats, layers, SaliencyConfig(cfg.beta, cfg.gamma, cfg.frequency,
                                                            cfg.importance))
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return float(dd.sum_(loss.detach().clone(), d))


def growth_event(run: Run, cfg: TrainConfig, gp: GrowthParams, n_events: int, last: bool) -> dict:
    ranks = all_ranks(run.layers)  # L, E
    S = saliency(run.stats, ranks, cfg.gamma)
    new = grow(ranks, S, gp, n_events, last)
    for m, r in zip(run.layers, new):
        m.set_ranks(r)
    reset_importance(run.stats, new > ranks)
    return {"step": run.step, "grown": int((new - ranks).clamp_min(0).sum()),
            "ranks": ranks_table(run).tolist()}


def checkpoint_state(run: Run, cfg: TrainConfig, key: dict | None = None) -> dict:
    """key: checkpoint.resume_key of the run, which --resume checks the new flags against."""
    trainable = {f"layers.{l}.{k}": v for l, m in enumerate(run.layers) for k, v in m.state_dict().items()
                 if k.startswith("lora_") or k == "mask"}
    if cfg.train_router:
        trainable.update({f"router.{l}": w.detach() for l, w in enumerate(router_parameters(run.model))})
    for m in run.shared:
        trainable.update({f"shared.{m.layer_idx}.{m.proj}.lora_A": m.lora_A, f"shared.{m.layer_idx}.{m.proj}.lora_B": m.lora_B})
    return {"step": run.step, "lora": {k: v.detach().cpu().clone() for k, v in trainable.items()},
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "stats": run.stats.state_dict(), "rng": ckpt.rng_state(), "history": run.history,
            "data_order": {"seed": cfg.seed, "batch_size": cfg.batch_size},
            "config": asdict(cfg), "resume_key": key}


def restore(run: Run, state: dict, cfg: TrainConfig) -> None:
    with torch.no_grad():
        for l, m in enumerate(run.layers):
            own = {k[len(f"layers.{l}."):]: v for k, v in state["lora"].items() if k.startswith(f"layers.{l}.")}
            m.load_state_dict(own, strict=False)
        if cfg.train_router:
            for l, w in enumerate(router_parameters(run.model)):
                w.copy_(state["lora"][f"router.{l}"])
        for m in run.shared:
            m.lora_A.copy_(state["lora"][f"shared.{m.layer_idx}.{m.proj}.lora_A"])
            m.lora_B.copy_(state["lora"][f"shared.{m.layer_idx}.{m.proj}.lora_B"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.stats.load_state_dict(state["stats"])
    ckpt.set_rng_state(state["rng"])
    run.step, run.history = state["step"], state["history"]


def warmup_steps(cfg: TrainConfig) -> int:
    return math.ceil(cfg.warmup_ratio * cfg.max_steps)


def describe(cfg: TrainConfig, shape: MoeShape) -> str:
    return (f"{cfg.method} on {cfg.model}: {shape.num_hidden_layers} layers x {shape.num_experts} experts, "
            f"r {cfg.r_init}/{cfg.r_target}/{cfg.r_max}, targets {','.join(cfg.targets)}, "
            f"{cfg.max_steps} steps x batch {cfg.batch_size}, lr {cfg.lr}")


def init_ranks(run: Run, cfg: TrainConfig, gp: GrowthParams, examples, pad_id, device, d) -> None:
    L, E = len(run.layers), run.layers[0].num_experts
    freq = None
    if cfg.method == "static":
        freq = base_routing_frequency(run.model, run.layers, examples, cfg, pad_id, device, d)
    for m, r in zip(run.layers, initial_ranks(cfg.method, L, E, gp, freq)):
        m.set_ranks(r)
    run.history = [{"step": 0, "grown": 0, "ranks": ranks_table(run).tolist()}]


def final_tensors(run: Run, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    return adapter_tensors(run.layers, run.model, cfg.train_router, run.shared)


def plan(cfg: TrainConfig):
    """Warm-up steps and growth schedule. A shrunk (short-run) schedule gets enough events
    that one event's quota covers at most half the experts at the per-event cap; with fewer,
    every expert grows alike and the result is uniform LoRA (e.g. 8/16/32 in 4 events)."""
    warm = warmup_steps(cfg)
    cap = GrowthParams(cfg.r_init, cfg.r_target, cfg.r_max, cfg.p_grow).step_cap
    min_events = max(4, math.ceil(2 * (cfg.r_target - cfg.r_init) / cap))
    return warm, plan_schedule(cfg.max_steps, warm, cfg.t_grow, cfg.t_buffer, min_events)


def now() -> float:
    return time.perf_counter()


def output_path(cfg: TrainConfig) -> Path:
    return Path(cfg.output)
