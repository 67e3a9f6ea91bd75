"""Packed multi-adapter LoRA pools as built by the engine.

Legend: S adapter slots, E experts, R pool rank rows, in/out projection dims.

A pool holds the rank rows of every resident adapter back to back:
  a (R, in)   row j = row j of A        (A: (r, in))
  b (R, out)  row j = column j of B     (B: (out, r)), i.e. rows of B^T
For slot s (and expert e) the adapter uses rows [o, o + r) with o = offsets[s(, e)],
r = ranks[s(, e)]; r == 0 means "no LoRA". Delta: scale[s] * (x @ a[o:o+r].T) @ b[o:o+r].
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from kernels._dispatch import meta


class _Sig:
    """A signature tuple with its hash computed once (it goes into every per-call cache key)."""

    __slots__ = ("value", "hash")

    def __init__(self, value: tuple):
        self.value, self.hash = value, hash(value)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other) -> bool:
        return isinstance(other, _Sig) and (self is other or self.value == other.value)


def _signature(cache: list, tensors: list[torch.Tensor | None], build) -> _Sig:
    """build() (the pools' shapes, strides, dtypes, devices), recomputed only when a tensor of the
    layer was replaced: cache[0] holds weak references to the tensors it was built from, so a new
    tensor at a dead one's address is not mistaken for it. (Pools are never resized in place.)"""
    if cache and len(cache[0]) == len(tensors) and all(
            (r is None and t is None) or (r is not None and r() is t) for r, t in zip(cache[0], tensors)):
        return cache[1]
    sig = _Sig(build())
    cache[:] = [[weakref.ref(t) if t is not None else None for t in tensors], sig]
    return sig

MOE_PROJECTIONS = ("gate", "up", "down")


@dataclass
class DenseLoraLayer:
    """LoRA pool of one dense projection (e.g. attention q/k/v/o)."""

    a: torch.Tensor  # (R, in)
    b: torch.Tensor  # (R, out)
    offsets: torch.Tensor  # (S,) int32
    ranks: torch.Tensor  # (S,) int32
    scales: torch.Tensor  # (S,) float32
    max_rank: int | None = None  # upper bound of ranks; None -> computed once (host sync)
    _sig: list = field(default_factory=list, repr=False, compare=False)

    @property
    def num_slots(self) -> int:
        return self.offsets.shape[0]

    def signature(self) -> _Sig:
        """What input checks read of the pools (hashable), cached while the tensors stay the same."""
        ts = [self.a, self.b, self.offsets, self.ranks, self.scales]
        return _signature(self._sig, ts, lambda: tuple(map(meta, ts)))

    def rank_bound(self) -> int:
        if self.max_rank is None:
            self.max_rank = int(self.ranks.max().item()) if self.ranks.numel() else 0
        return self.max_rank


@dataclass
class MoeLoraLayer:
    """LoRA pools of one MoE layer, per projection in {"gate", "up", "down"}.

    gate/up: a (R, H), b (R, I); down: a (R, I), b (R, H).
    offsets[p], ranks[p]: (S, E) int32; scales: (S,) float32 (shared by projections).
    Projections absent from the dicts have no LoRA.
    """

    a: dict[str, torch.Tensor] = field(default_factory=dict)
    b: dict[str, torch.Tensor] = field(default_factory=dict)
    offsets: dict[str, torch.Tensor] = field(default_factory=dict)
    ranks: dict[str, torch.Tensor] = field(default_factory=dict)
    scales: torch.Tensor | None = None
    max_rank: int | None = None  # bound over all projections; None -> computed once (host sync)
    _sig: list = field(default_factory=list, repr=False, compare=False)

    def signature(self) -> _Sig:
        """What input checks read of the pools (hashable), cached while the tensors stay the same."""
        ps = self.projections
        ts = [self.scales] + [d[p] for p in ps for d in (self.a, self.b, self.offsets, self.ranks)]
        return _signature(self._sig, ts, lambda: (tuple(ps), tuple(map(meta, ts))))

    @property
    def projections(self) -> list[str]:
        return [p for p in MOE_PROJECTIONS if p in self.a]

    @property
    def num_slots(self) -> int:
        assert self.scales is not None
        return self.scales.shape[0]

    def rank_bound(self) -> int:
        if self.max_rank is None:
            rs = [self.ranks[p].max() for p in self.projections if self.ranks[p].numel()]
            self.max_rank = int(torch.stack(rs).max().item()) if rs else 0
        return self.max_rank
