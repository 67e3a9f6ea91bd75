"""DR-LoRA expert statistics: routing-frequency EMA, rank-importance EMA and saliency.

All state lives in a `SaliencyState` passed explicitly; every update is a small function.
Under torchrun the per-step routing sums are all-reduced (distributed.py) before
`update_frequency`, and the importance is computed from already all-reduced grads, so every
process holds identical statistics and grows the same experts.

# L layers, E experts, P target projections, R rank (r_max)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drlora_train.lora import MoeLoraExperts


@dataclass(frozen=True)
class SaliencyConfig:
    beta: float = 0.9
    gamma: float = 1.2
    frequency: str = "weight"  # "weight" (paper) or "count" (public code: top-k selections)
    importance: str = "product"  # "product" (paper) or "sum" (public code)


@dataclass
class SaliencyState:
    freq: torch.Tensor  # L, E  routing-frequency EMA
    imp: torch.Tensor  # L, P, E, R  rank-importance EMA (0 on inactive ranks)

    @classmethod
    def zeros(cls, L: int, P: int, E: int, R: int) -> SaliencyState:
        return cls(torch.zeros(L, E, dtype=torch.float64), torch.zeros(L, P, E, R, dtype=torch.float64))

    def state_dict(self) -> dict:
        return {"freq": self.freq.clone(), "imp": self.imp.clone()}

    def load_state_dict(self, d: dict) -> None:
        self.freq.copy_(d["freq"])
        self.imp.copy_(d["imp"])


def step_frequency(route_sum: torch.Tensor, route_count: torch.Tensor, route_tokens: torch.Tensor,
                   kind: str) -> torch.Tensor:
    """(L, E) routing frequency of one step from summed stats: mean routing weight per token
    (0 where not selected), or the fraction of tokens that selected the expert."""
    num = route_sum if kind == "weight" else route_count
    return num / route_tokens.clamp_min(1.0)[:, None]


def update_frequency(state: SaliencyState, w_t: torch.Tensor, beta: float) -> None:
    state.freq.mul_(beta).add_((1.0 - beta) * w_t.to(state.freq))


@torch.no_grad()
def rank_importance(layer: MoeLoraExperts, kind: str) -> torch.Tensor:
    """(P, E, R) s_j = ||dL/da_j * a_j||_1 (op) ||dL/db_j * b_j||_1 over active ranks."""
    out = []
    for p in layer.spec.targets:
        A, B = layer.lora_A[p], layer.lora_B[p]  # E, R, in ; E, out, R
        if A.grad is None or B.grad is None:
            out.append(torch.zeros_like(layer.mask, dtype=torch.float64))
            continue
        sa = (A.grad * A).abs().sum(-1).double()  # E, R
        sb = (B.grad * B).abs().sum(-2).double()  # E, R
        s = sa * sb if kind == "product" else sa + sb
        out.append(s * layer.mask)
    return torch.stack(out)


def update_importance(state: SaliencyState, layers: list[MoeLoraExperts], cfg: SaliencyConfig) -> None:
    for l, layer in enumerate(layers):
        s = rank_importance(layer, cfg.importance).to(state.imp)  # P, E, R
        m = layer.mask.to(state.imp.device)[None]  # 1, E, R
        g = state.imp[l]
        # EMA on active ranks only; inactive ranks stay at 0
        g.copy_(torch.where(m, cfg.beta * g + (1.0 - cfg.beta) * s, torch.zeros_like(g)))


def expert_importance(state: SaliencyState, ranks: torch.Tensor) -> torch.Tensor:
    """(L, E) mean of g_j over active ranks and projections."""
    L, P, E, R = state.imp.shape
    active = torch.arange(R)[None, None, :] < ranks[:, :, None]  # L, E, R
    tot = (state.imp * active[:, None]).sum(dim=(1, 3))  # L, E
    return tot / (ranks.clamp_min(1) * P).to(tot)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Sum to 1 within each layer (row); a row of zeros becomes uniform."""
    s = x.sum(-1, keepdim=True)
    uniform = torch.full_like(x, 1.0 / x.shape[-1])
    return torch.where(s > 0, x / s.clamp_min(1e-300), uniform)


def saliency(state: SaliencyState, ranks: torch.Tensor, gamma: float) -> torch.Tensor:
    """(L, E) S = f_norm * g_norm / (r + 1) ** gamma."""
    f = _normalise(state.freq)
    g = _normalise(expert_importance(state, ranks))
    return f * g / (ranks.to(f) + 1.0) ** gamma


def reset_importance(state: SaliencyState, grown: torch.Tensor) -> None:
    """Zero the importance EMA of grown experts ((L, E) bool); keep the frequency."""
    state.imp.masked_fill_(grown[:, None, :, None].to(state.imp.device), 0.0)
