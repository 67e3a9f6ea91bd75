"""Rank allocation: the growth schedule, one growth event (pure), and the baselines' ranks.

Everything here is a pure function of integers and tensors, tested directly.

# L layers, E experts
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GrowthParams:
    r_init: int = 8
    r_target: int = 16
    r_max: int = 32
    p_grow: float = 0.1

    def check(self) -> None:
        if not (1 <= self.r_init <= self.r_target <= self.r_max):
            raise ValueError(f"need 1 <= r_init <= r_target <= r_max, got "
                             f"{self.r_init}/{self.r_target}/{self.r_max}")
        if not (0.0 < self.p_grow <= 1.0):
            raise ValueError(f"p_grow must be in (0, 1], got {self.p_grow}")

    @property
    def step_cap(self) -> int:
        """Ranks one expert may gain per event: floor((r_max - r_init) * p_grow), at least 1."""
        return max(1, math.floor((self.r_max - self.r_init) * self.p_grow))


@dataclass(frozen=True)
class Schedule:
    t_warmup: int
    t_end: int
    t_grow: int
    events: tuple[int, ...]  # optimizer steps (1-based, after the step) at which growth runs
    notes: list[str] = field(default_factory=list, compare=False)


def plan_schedule(total_steps: int, warmup_steps: int, t_grow: int = 200, t_buffer: int = 200,
                  min_events: int = 4) -> Schedule:
    """Events at t_warmup + k * T_grow, k = 1..n_events, n_events = floor((t_end - t_warmup) / T_grow).

    Short runs: T_buffer shrinks to about 10% of the run (at least 1 step) and T_grow so that at least
    `min_events` events fit (each change is reported in `notes`)."""
    notes = []
    cap = max(1, total_steps // 10) if total_steps >= 2 else 0  # >= 1 step to train the last growth
    if t_buffer > cap:
        notes.append(f"T_buffer {t_buffer} -> {cap} (short run: about 10% of {total_steps} steps)")
        t_buffer = cap
    t_end = total_steps - t_buffer
    t_warmup = min(warmup_steps, max(t_end - 1, 0))
    span = t_end - t_warmup
    if span >= 1 and span // t_grow < min_events:
        new = max(1, span // min_events)
        if new != t_grow:
            notes.append(f"T_grow {t_grow} -> {new} (short run: {span} growth steps, want >= {min_events} events)")
            t_grow = new
    n_events = span // t_grow if span >= 1 else 0
    events = tuple(t_warmup + k * t_grow for k in range(1, n_events + 1))
    if not events and total_steps >= 1:
        events = (max(t_end, 1),)
        notes.append(f"run too short for growth: one event at step {events[0]} reaches the budget")
    return Schedule(t_warmup, t_end, t_grow, events, notes)


def event_quota(n_experts: int, p: GrowthParams, n_events: int) -> int:
    """Q = ceil(N (r_target - r_init) / n_events) new ranks per layer and event."""
    return math.ceil(n_experts * (p.r_target - p.r_init) / max(n_events, 1))


def _order(saliency: torch.Tensor) -> list[int]:
    """Experts by saliency, descending; ties by index (deterministic)."""
    s = saliency.tolist()
    return sorted(range(len(s)), key=lambda e: (-s[e], e))


def grow_layer(ranks: torch.Tensor, saliency: torch.Tensor, p: GrowthParams, quota: int,
               last: bool) -> torch.Tensor:
    """One growth event for one layer: (E,) ranks -> (E,) new ranks.

    Experts in saliency order get n_grow = min(step_cap, r_max - r_i, Q_left) until the quota
    (capped by the budget still free) is spent. On the last event the layer is brought to
    exactly N * r_target: a deficit is filled by further passes in the same order, an excess
    (only possible if the caller's ranks exceed the budget) trimmed from the least salient
    experts, never below r_init."""
    new = ranks.clone().long()
    E = new.numel()
    budget = E * p.r_target
    order = _order(saliency)
    left = min(quota, budget - int(new.sum()))
    for e in order:
        if left <= 0:
            break
        g = min(p.step_cap, p.r_max - int(new[e]), left)
        if g > 0:
            new[e] += g
            left -= g
    if last:
        deficit = budget - int(new.sum())
        while deficit > 0:  # top up: more passes in saliency order
            before = deficit
            for e in order:
                g = min(p.step_cap, p.r_max - int(new[e]), deficit)
                if g > 0:
                    new[e] += g
                    deficit -= g
                if deficit == 0:
                    break
            if deficit == before:
                raise ValueError("budget N * r_target exceeds N * r_max")
        excess = int(new.sum()) - budget
        while excess > 0:  # trim: least salient first
            before = excess
            for e in reversed(order):
                if new[e] > p.r_init and excess > 0:
                    new[e] -= 1
                    excess -= 1
            if excess == before:
                raise ValueError("budget N * r_target is below N * r_init")
    return new


def grow(ranks: torch.Tensor, saliency: torch.Tensor, p: GrowthParams, n_events: int,
         last: bool) -> torch.Tensor:
    """(L, E) ranks and saliency -> (L, E) new ranks; allocation is per layer."""
    q = event_quota(ranks.shape[1], p, n_events)
    return torch.stack([grow_layer(ranks[l], saliency[l], p, q, last) for l in range(ranks.shape[0])])


def proportional_ranks(freq: torch.Tensor, total: int, r_min: int, r_max: int) -> torch.Tensor:
    """(E,) ranks proportional to freq, rounded, clipped to [r_min, r_max], summing to total.

    After rounding and clipping, the sum is fixed one rank at a time: add where the ideal
    share exceeds the rank most, remove where the rank exceeds it most (ties by index)."""
    E = freq.numel()
    if not (E * r_min <= total <= E * r_max):
        raise ValueError(f"total {total} not reachable with {E} experts in [{r_min}, {r_max}]")
    f = freq.double().clamp_min(0)
    f = f / f.sum() if f.sum() > 0 else torch.full_like(f, 1.0 / E)
    ideal = f * total
    r = ideal.round().long().clamp(r_min, r_max)
    while int(r.sum()) != total:
        gap = (ideal - r.double()).tolist()
        if r.sum() < total:
            cand = [e for e in range(E) if r[e] < r_max]
            e = max(cand, key=lambda e: (gap[e], -e))
            r[e] += 1
        else:
            cand = [e for e in range(E) if r[e] > r_min]
            e = min(cand, key=lambda e: (gap[e], e))
            r[e] -= 1
    return r


def static_ranks(freq: torch.Tensor, p: GrowthParams) -> torch.Tensor:
    """(L, E) routing frequency of the frozen base -> (L, E) ranks, per-layer sum N * r_target."""
    E = freq.shape[1]
    return torch.stack([proportional_ranks(freq[l], E * p.r_target, p.r_init, p.r_max)
                        for l in range(freq.shape[0])])


def initial_ranks(method: str, L: int, E: int, p: GrowthParams,
                  freq: torch.Tensor | None = None) -> torch.Tensor:
    if method == "drlora":
        return torch.full((L, E), p.r_init, dtype=torch.long)
    if method == "lora":
        return torch.full((L, E), p.r_target, dtype=torch.long)
    if method == "static":
        if freq is None:
            raise ValueError("static ranks need the base model's routing frequency")
        return static_ranks(freq, p)
    raise ValueError(f"unknown method '{method}' (expected drlora, lora or static)")
