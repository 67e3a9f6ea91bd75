"""LoRA on transformers v5's fused experts, allocated at r_max with a per-expert active-rank mask.

Every supported family (OLMoE, Qwen3-MoE, Qwen2-MoE, Mixtral) has the same experts module in
transformers v5 (`mlp.experts`: `gate_up_proj` (E, 2I, H), `down_proj` (E, H, I), `act_fn`,
forward(hidden, top_k_index, top_k_weights)) beside its router `mlp.gate`; dense-MLP layers (Qwen
MoE `mlp_only_layers`) have none and are left alone, and so is Qwen2-MoE's shared expert.
Each wrapped layer keeps the frozen base experts module and adds, per target projection p,
A_p (E, r_max, in) (Kaiming-uniform) and B_p (E, out, r_max) (zero). One boolean mask
(E, r_max) per layer marks the active ranks; all projections of an expert share it. The
active ranks of expert e are always the prefix [0, r_e) (growth appends, trimming pops), so
the mask is equivalent to a rank per expert and packing for the adapter is a slice.

# T tokens, E experts, R rank (r_max), H hidden, I intermediate, K top-k, N = T*K routed
# slots, C slots of the busiest expert
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from drlora.adapter_format import EXPERT_PROJS, key


@dataclass(frozen=True)
class LoraSpec:
    r_max: int = 32
    alpha: float | None = None  # None: 2 * r_max, i.e. scale 2 whatever the active rank
    targets: tuple[str, ...] = ("up", "down")

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else 2.0 * self.r_max) / self.r_max


class MoeLoraExperts(nn.Module):
    """Drop-in replacement of a v5 experts module (same forward signature) with masked LoRA."""

    def __init__(self, base: nn.Module, spec: LoraSpec, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # index in model.model.layers (dense-MLP layers are skipped)
        for p in spec.targets:
            if p not in EXPERT_PROJS:
                raise ValueError(f"unknown expert projection '{p}' (expected {EXPERT_PROJS})")
        self.base = base
        for prm in base.parameters():
            prm.requires_grad_(False)
        self.spec = spec
        self.scaling = spec.scaling
        E, H, I, R = base.num_experts, base.hidden_dim, base.intermediate_dim, spec.r_max
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, I
        dims = {"gate": (H, I), "up": (H, I), "down": (I, H)}
        dev = base.gate_up_proj.device
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for p in spec.targets:
            i, o = dims[p]
            self.lora_A[p] = nn.Parameter(torch.empty(E, R, i, device=dev, dtype=torch.float32))
            self.lora_B[p] = nn.Parameter(torch.zeros(E, o, R, device=dev, dtype=torch.float32))
        self.register_buffer("mask", torch.zeros(E, R, dtype=torch.bool, device=dev))
        # routing statistics of the current step (summed over micro-batches); see saliency.py
        self.register_buffer("route_sum", torch.zeros(E, dtype=torch.float64, device=dev),
                             persistent=False)
        self.register_buffer("route_count", torch.zeros(E, dtype=torch.float64, device=dev),
                             persistent=False)
        self.register_buffer("route_tokens", torch.zeros((), dtype=torch.float64, device=dev),
                             persistent=False)
        self.token_mask: torch.Tensor | None = None  # (T,) valid tokens of the current batch
        self.record = False
        self.impl = "auto"  # auto | loop | padded (see forward)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for p in self.spec.targets:
            A = self.lora_A[p]  # E, R, in
            bound = 1.0 / math.sqrt(A.shape[-1])  # kaiming_uniform_(a=sqrt(5)) on (R, in)
            A.uniform_(-bound, bound, generator=generator)
            self.lora_B[p].zero_()

    def ranks(self) -> torch.Tensor:
        return self.mask.sum(-1)  # E

    @torch.no_grad()
    def set_ranks(self, ranks: torch.Tensor) -> None:
        """Activate the prefix [0, r_e) of every expert. Ranks that become inactive have their
        B columns zeroed (trim); newly active ones start with B = 0 (a no-op)."""
        R = self.spec.r_max
        ranks = ranks.to(self.mask.device)
        new = torch.arange(R, device=self.mask.device)[None, :] < ranks[:, None]  # E, R
        dropped = self.mask & ~new
        for p in self.spec.targets:
            self.lora_B[p].masked_fill_(dropped[:, None, :], 0.0)
        self.mask.copy_(new)

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the grads of inactive ranks (the forward masking already does; this is the
        belt to its braces, e.g. against weight decay or a trimmed rank)."""
        m = self.mask
        for p in self.spec.targets:
            A, B = self.lora_A[p], self.lora_B[p]
            if A.grad is not None:
                A.grad.mul_(m[:, :, None])
            if B.grad is not None:
                B.grad.mul_(m[:, None, :])

    def _delta(self, p: str, e: int, x: torch.Tensor, ab: dict) -> torch.Tensor:
        # x: n, in -> n, out
        A, B = ab[p]
        return (x @ A[e].T.to(x.dtype)) @ B[e].T.to(x.dtype) * self.scaling

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states: T, H; top_k_index, top_k_weights: T, K
        if self.record:
            self._record(top_k_index, top_k_weights)
        counts = torch.bincount(top_k_index.flatten(), minlength=self.num_experts)  # E
        impl = self.impl
        if impl == "auto":  # padding to the busiest expert wastes at most 4x: batch it
            impl = "padded" if int(counts.max()) * self.num_experts <= 4 * top_k_index.numel() else "loop"
        if impl == "padded":
            return self._forward_padded(hidden_states, top_k_index, top_k_weights, counts)
        return self._forward_loop(hidden_states, top_k_index, top_k_weights, counts)

    def _forward_loop(self, hidden_states, top_k_index, top_k_weights, counts) -> torch.Tensor:
        """One expert at a time (like transformers' eager experts)."""
        base, I = self.base, self.intermediate_dim
        # unbind once: indexing [e] per expert would make autograd build one full-size
        # (E, R, in) grad per expert; unbind's backward is a single stack
        ab = {p: ((self.lora_A[p] * self.mask[:, :, None]).unbind(0), self.lora_B[p].unbind(0))
              for p in self.spec.targets}  # E x (R, in), E x (out, R)
        out = torch.zeros_like(hidden_states)
        for e in counts.nonzero().flatten().tolist():
            tok, pos = torch.where(top_k_index == e)  # n
            x = hidden_states[tok]  # n, H
            gate_up = x @ base.gate_up_proj[e].T  # n, 2I
            gate, up = gate_up[:, :I], gate_up[:, I:]
            if "gate" in ab:
                gate = gate + self._delta("gate", e, x, ab)
            if "up" in ab:
                up = up + self._delta("up", e, x, ab)
            h = base.act_fn(gate) * up  # n, I
            y = h @ base.down_proj[e].T  # n, H
            if "down" in ab:
                y = y + self._delta("down", e, h, ab)
            y = y * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def _forward_padded(self, hidden_states, top_k_index, top_k_weights, counts) -> torch.Tensor:
        """All experts in batched matmuls over a (E, C, .) buffer, C the busiest expert's load."""
        base, E, I = self.base, self.num_experts, self.intermediate_dim
        T, K = top_k_index.shape
        flat = top_k_index.flatten()  # N = T*K
        order = torch.argsort(flat, stable=True)  # N
        ex = flat[order]  # N  expert of each sorted slot
        start = torch.cumsum(counts, 0) - counts  # E
        slot = torch.arange(flat.numel(), device=flat.device) - start[ex]  # N  row within expert
        tok = order // K  # N  source token
        C = int(counts.max())
        x = hidden_states.new_zeros(E, C, hidden_states.shape[-1])
        x[ex, slot] = hidden_states[tok]  # E, C, H
        dt = x.dtype

        def delta(p, inp):  # E, C, in -> E, C, out
            A = (self.lora_A[p] * self.mask[:, :, None]).to(dt)  # E, R, in
            return torch.bmm(torch.bmm(inp, A.transpose(1, 2)), self.lora_B[p].to(dt).transpose(1, 2)) * self.scaling

        gate_up = torch.bmm(x, base.gate_up_proj.transpose(1, 2))  # E, C, 2I
        gate, up = gate_up[..., :I], gate_up[..., I:]
        if "gate" in self.spec.targets:
            gate = gate + delta("gate", x)
        if "up" in self.spec.targets:
            up = up + delta("up", x)
        h = base.act_fn(gate) * up  # E, C, I
        y = torch.bmm(h, base.down_proj.transpose(1, 2))  # E, C, H
        if "down" in self.spec.targets:
            y = y + delta("down", h)
        y = y[ex, slot] * top_k_weights.flatten()[order, None]  # N, H
        out = torch.zeros_like(hidden_states)
        out.index_add_(0, tok, y.to(out.dtype))
        return out

    @torch.no_grad()
    def _record(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        # per-expert routing weight summed over valid tokens (0 where not selected), and counts
        w = top_k_weights.detach().double()  # T, K
        valid = torch.ones(w.shape[0], dtype=torch.float64, device=w.device)
        if self.token_mask is not None and self.token_mask.numel() == w.shape[0]:
            valid = self.token_mask.to(w.device, torch.float64)
        E = self.num_experts
        idx = top_k_index.flatten()
        self.route_sum += torch.bincount(idx, weights=(w * valid[:, None]).flatten(), minlength=E)
        self.route_count += torch.bincount(idx, weights=valid[:, None].expand_as(w).flatten(),
                                           minlength=E)
        self.route_tokens += valid.sum()

    def clear_route_stats(self) -> None:
        self.route_sum.zero_()
        self.route_count.zero_()
        self.route_tokens.zero_()


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a plain LoRA of fixed rank (Qwen2-MoE's shared expert):
    y = base(x) + scaling * x @ A.T @ B.T, A (r, in) Kaiming-uniform, B (out, r) zero."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, layer_idx: int, proj: str):
        super().__init__()
        self.base, self.scaling, self.layer_idx, self.proj = base, scaling, layer_idx, proj
        base.weight.requires_grad_(False)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=torch.float32))
        with torch.no_grad():
            bound = 1.0 / math.sqrt(base.in_features)
            self.lora_A.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T.to(x.dtype)) @ self.lora_B.T.to(x.dtype) * self.scaling


def attach_shared_lora(model: nn.Module, rank: int, targets: tuple[str, ...], scaling: float) -> list[LoraLinear]:
    """LoRA of `rank` on the shared expert's gate/up/down_proj named in targets, every layer
    that has one (in place). The expert-rank budget does not count these ranks."""
    out = []
    for l, layer in enumerate(model.model.layers):
        sh = getattr(getattr(layer, "mlp", None), "shared_expert", None)
        if sh is None:
            continue
        for p in targets:
            mod = LoraLinear(getattr(sh, f"{p}_proj"), rank, scaling, l, f"shared_{p}")
            setattr(sh, f"{p}_proj", mod)
            out.append(mod)
    if not out:
        raise ValueError(f"{type(model).__name__} has no shared expert (--shared-rank is for Qwen2-MoE)")
    return out


def has_experts(layer: nn.Module) -> bool:
    """The layer has a routed-experts module (a v5 fused one, or one already wrapped)."""
    ex = getattr(getattr(layer, "mlp", None), "experts", None)
    return isinstance(ex, MoeLoraExperts) or (hasattr(ex, "gate_up_proj") and hasattr(ex, "down_proj"))


def attach_lora(model: nn.Module, spec: LoraSpec) -> list[MoeLoraExperts]:
    """Freeze the model and swap the experts of every layer that has experts for a
    MoeLoraExperts (in place); returns them in layer order."""
    for prm in model.parameters():
        prm.requires_grad_(False)
    wrapped = []
    for l, layer in enumerate(model.model.layers):
        if not has_experts(layer):
            continue  # a dense-MLP layer: no experts, no LoRA
        mod = MoeLoraExperts(layer.mlp.experts, spec, l)
        layer.mlp.experts = mod
        wrapped.append(mod)
    if not wrapped:
        raise ValueError(f"{type(model).__name__} has no fused experts module (mlp.experts.gate_up_proj) "
                         "in any layer: not a supported MoE model")
    return wrapped


def lora_parameters(layers: list[MoeLoraExperts]) -> list[nn.Parameter]:
    return [prm for m in layers for d in (m.lora_A, m.lora_B) for prm in d.values()]


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [layer.mlp.gate.weight for layer in model.model.layers if has_experts(layer)]


def all_ranks(layers: list[MoeLoraExperts]) -> torch.Tensor:
    return torch.stack([m.ranks().cpu() for m in layers])  # L', E  (the layers with experts)


def full_ranks(ranks: torch.Tensor, layers: list[MoeLoraExperts], num_layers: int) -> torch.Tensor:
    """(L', E) ranks of the wrapped layers as (L, E) over every layer, 0 on dense-MLP layers."""
    out = torch.zeros(num_layers, ranks.shape[1], dtype=ranks.dtype)
    out[[m.layer_idx for m in layers]] = ranks
    return out


@torch.no_grad()
def adapter_tensors(layers: list[MoeLoraExperts], model: nn.Module | None = None,
                    train_router: bool = False, shared: list[LoraLinear] = ()) -> dict[str, torch.Tensor]:
    """Pack the active ranks into the adapter format's tensors (see drlora.adapter_format)."""
    out: dict[str, torch.Tensor] = {}
    for m in shared:
        out[key(m.layer_idx, m.proj, "lora_A")], out[key(m.layer_idx, m.proj, "lora_B")] = m.lora_A, m.lora_B
    for m in layers:
        l, r = m.layer_idx, m.ranks().tolist()
        for p in m.spec.targets:
            A, B = m.lora_A[p], m.lora_B[p]
            out[f"layers.{l}.experts.{p}.lora_A"] = torch.cat([A[e, :r[e]] for e in range(len(r))])
            out[f"layers.{l}.experts.{p}.lora_B"] = torch.cat([B[e, :, :r[e]] for e in range(len(r))], 1)
        if train_router and model is not None:
            out[f"layers.{l}.router.weight"] = model.model.layers[l].mlp.gate.weight.detach().float()
    return {k: v.detach().cpu().float().contiguous() for k, v in out.items()}
