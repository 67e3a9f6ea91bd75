"""Packed multi-adapter LoRA pools as built by the engine.

Legend: S adapter slots, E experts, R pool rank rows, in/out projection dims.

A pool holds the rank rows of every resident adapter back to back:
  a (R, in)   row j = row j of A        (A: (r, in))
  b (R, out)  row j = column j of B     (B: (out, r)), i.e. rows of B^T
For slot s (and expert e) the adapter uses rows [o, o + r) with o = offsets[s(, e)],
r = ranks[s(, e)]; r == 0 means "no LoRA". Delta: scale[s] * (x @ a[o:o+r].T) @ b[o:o+r].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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

    @property
    def num_slots(self) -> int:
        return self.offsets.shape[0]

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
