"""Device pool of packed, rank-exact LoRA buffers (one per layer and projection).

Legend: L layers, S adapter slots, E experts, R pool rank rows, H hidden, I intermediate.
For every (layer, expert projection): a (R, in), b (R, out) (rows of B^T), offsets/ranks
(S, E) int32 (a dense-MLP layer, without experts, gets 0 rows); for every (layer, dense
projection: attention q/k/v/o, and a Qwen2-MoE shared expert's gate/up/down): a, b and (S,)
offsets/ranks; scales
(S,) fp32; router (L, S, E, H) for adapters that bring their own router. An adapter in slot s
owns one contiguous extent of rows per (layer, projection), expert e at offsets[s, e].
Tables live on the device and are updated in place (copy_), so captured graphs stay valid.
When an extent does not fit but enough rows are free, the pool is compacted (rows moved
down, offsets rewritten) between steps.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from kernels import DenseLoraLayer, MoeLoraLayer

from drlora.adapter_format import EXPERT_PROJS, Adapter, key as tensor_key
from drlora.models import MoeShape


class RowAllocator:
    """First-fit extents in [0, capacity); owner -> (start, n)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.extents: dict[int, tuple[int, int]] = {}

    @property
    def free_rows(self) -> int:
        return self.capacity - sum(n for _, n in self.extents.values())

    def alloc(self, owner: int, n: int) -> int | None:
        pos = 0
        for start, m in sorted(self.extents.values()):
            if start - pos >= n:
                break
            pos = start + m
        if self.capacity - pos < n:  # after a break the gap before `start` holds n rows
            return None
        self.extents[owner] = (pos, n)
        return pos

    def free(self, owner: int) -> None:
        self.extents.pop(owner, None)

    def compaction_moves(self) -> list[tuple[int, int, int, int]]:
        """(owner, old, new, n) packing every extent down in order; updates the extents."""
        moves, pos = [], 0
        for owner, (start, n) in sorted(self.extents.items(), key=lambda kv: kv[1][0]):
            if start != pos:
                moves.append((owner, start, pos, n))
                self.extents[owner] = (pos, n)
            pos += n
        return moves


class LoraBuffers:
    def __init__(self, shape: MoeShape, num_slots: int, moe_rows: int, dense_rows: int,
                 dtype: torch.dtype, device: torch.device):
        self.shape, self.num_slots, self.dtype, self.device = shape, num_slots, dtype, device
        L, S, E = shape.num_hidden_layers, num_slots, shape.num_experts
        self.dense_projs = shape.dense_projs()
        self.keys = [(l, p) for l in range(L) for p in EXPERT_PROJS] + [(l, p) for l in range(L) for p in self.dense_projs]
        self.a, self.b, self.alloc = {}, {}, {}
        self.offsets_host, self.ranks_host, self.offsets, self.ranks = {}, {}, {}, {}
        for key in self.keys:
            moe = key[1] in EXPERT_PROJS
            i, o = shape.proj_dims(key[1])
            rows = (moe_rows if shape.is_sparse(key[0]) else 0) if moe else dense_rows
            self.a[key] = torch.zeros(rows, i, dtype=dtype, device=device)
            self.b[key] = torch.zeros(rows, o, dtype=dtype, device=device)
            self.alloc[key] = RowAllocator(rows)
            tshape = (S, E) if moe else (S,)
            self.offsets_host[key] = torch.zeros(tshape, dtype=torch.int32)
            self.ranks_host[key] = torch.zeros(tshape, dtype=torch.int32)
            self.offsets[key] = torch.zeros(tshape, dtype=torch.int32, device=device)
            self.ranks[key] = torch.zeros(tshape, dtype=torch.int32, device=device)
        self.scales = torch.zeros(S, dtype=torch.float32, device=device)
        self.router = torch.zeros(L, S, E, shape.hidden_size, dtype=dtype, device=device)
        self.has_router = [False] * S
        self.has_dense = {key: False for key in self.keys}
        self.num_compactions = 0
        self.slot_ranks: dict[int, int] = {}  # slot -> largest per-expert/dense rank
        self.rank_bound = 0  # max of slot_ranks: the kernels' rank bound now
        self.any_dense = False  # any dense (attention / shared-expert) pool holds ranks
        self.dense_keys = [key for key in self.keys if key[1] in self.dense_projs]
        self._moe = [MoeLoraLayer(a={p: self.a[(l, p)] for p in EXPERT_PROJS}, b={p: self.b[(l, p)] for p in EXPERT_PROJS},
                                  offsets={p: self.offsets[(l, p)] for p in EXPERT_PROJS},
                                  ranks={p: self.ranks[(l, p)] for p in EXPERT_PROJS}, scales=self.scales, max_rank=0)
                     for l in range(L)]
        self._dense = {key: DenseLoraLayer(self.a[key], self.b[key], self.offsets[key], self.ranks[key], self.scales, max_rank=0)
                       for key in self.keys if key[1] in self.dense_projs}

    # ------------------------------------------------------------------ views for the model
    def moe_layer(self, layer: int) -> MoeLoraLayer:
        return self._moe[layer]

    def dense(self, layer: int, proj: str) -> DenseLoraLayer | None:
        return self._dense[(layer, proj)] if self.has_dense[(layer, proj)] else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.a, self.b) for t in d.values()) + \
            self.router.numel() * self.router.element_size()

    # ------------------------------------------------------------------ rows per key
    @staticmethod
    def adapter_rows(adapter: Adapter) -> dict[tuple[int, str], list[int]]:
        cfg = adapter.config
        out = {}
        for p, per_layer in cfg.ranks.items():
            for l, r in enumerate(per_layer):
                out[(l, p)] = list(r)
        for p, per_layer in cfg.dense_ranks.items():
            for l, r in enumerate(per_layer):
                out[(l, p)] = [r]
        return out

    def capacity_error(self, adapter: Adapter) -> str | None:
        """Why the adapter can never fit this pool (even empty), else None."""
        for key, ranks in self.adapter_rows(adapter).items():
            if sum(ranks) > self.alloc[key].capacity:
                return (f"needs {sum(ranks)} rank rows in layer {key[0]} {key[1]} but the pool holds "
                        f"{self.alloc[key].capacity} (raise lora_pool_rank_rows / lora_dense_rank_rows)")
        return None

    def fits(self, adapter: Adapter) -> bool:
        return all(sum(r) <= self.alloc[k].free_rows for k, r in self.adapter_rows(adapter).items())

    # ------------------------------------------------------------------ load / unload / compact
    def load(self, slot: int, adapter: Adapter) -> bool:
        if not self.fits(adapter):
            return False
        rows = self.adapter_rows(adapter)
        t = adapter.tensors
        for key, ranks in rows.items():
            n = sum(ranks)
            if n == 0:
                continue
            start = self.alloc[key].alloc(slot, n)
            if start is None:  # enough free rows, but fragmented
                self.compact(key)
                self.num_compactions += 1
                start = self.alloc[key].alloc(slot, n)
                assert start is not None
            l, p = key
            A, B = t[tensor_key(l, p, "lora_A")], t[tensor_key(l, p, "lora_B")]
            if p not in EXPERT_PROJS:
                self.has_dense[key] = True
            self.a[key][start:start + n].copy_(A)
            self.b[key][start:start + n].copy_(B.T)
            offs = torch.tensor(ranks, dtype=torch.int32).cumsum(0) - torch.tensor(ranks, dtype=torch.int32) + start
            self.offsets_host[key][slot] = offs if p in EXPERT_PROJS else offs[0]
            self.ranks_host[key][slot] = torch.tensor(ranks, dtype=torch.int32) if p in EXPERT_PROJS else ranks[0]
        for l in range(self.shape.num_hidden_layers):
            w = adapter.router_weight(l)
            if w is not None:
                self.router[l, slot].copy_(w)
                self.has_router[slot] = True
        self.scales[slot] = float(adapter.config.scaling)
        self.slot_ranks[slot] = max((max(r) for r in rows.values() if r), default=0)
        self._sync()
        return True

    def synchronize(self) -> None:
        """Wait for the pool's pending device copies (CUDA copies are asynchronous)."""
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)

    def unload(self, slot: int) -> None:
        for key in self.keys:
            self.alloc[key].free(slot)
            self.offsets_host[key][slot] = 0
            self.ranks_host[key][slot] = 0
        self.scales[slot] = 0.0
        self.has_router[slot] = False
        self.slot_ranks.pop(slot, None)
        self._sync()

    def compact(self, key=None) -> int:
        """Pack extents down (one key or all); returns rows moved."""
        moved = 0
        for k in ([key] if key is not None else self.keys):
            for owner, old, new, n in self.alloc[k].compaction_moves():
                self.a[k][new:new + n] = self.a[k][old:old + n].clone()
                self.b[k][new:new + n] = self.b[k][old:old + n].clone()
                tab = self.offsets_host[k]
                tab[owner] -= old - new
                moved += n
        self._sync()
        return moved

    def fragmented(self, key) -> bool:
        a = self.alloc[key]
        return bool(a.extents) and max(s + n for s, n in a.extents.values()) > a.capacity - a.free_rows

    def _sync(self) -> None:
        for key in self.keys:
            self.offsets[key].copy_(self.offsets_host[key])
            self.ranks[key].copy_(self.ranks_host[key])
            if key[1] in self.dense_projs:
                self.has_dense[key] = bool(self.ranks_host[key].any())
        self.any_dense = any(self.has_dense[k] for k in self.dense_keys)
        self._set_bound(max(self.slot_ranks.values(), default=0))

    def _set_bound(self, bound: int) -> None:
        self.rank_bound = bound
        for m in self._moe:
            m.max_rank = bound
        for d in self._dense.values():
            d.max_rank = bound

    @contextmanager
    def capture_layout(self, rank_bound: int, dense: bool):
        """For a CUDA graph capture: the kernels launched as if the rank bound were `rank_bound`
        and (dense) every dense pool active, whatever is resident; restored afterwards. Only
        the host-side bounds change (tables and pools are the graph's inputs, read at replay)."""
        saved = dict(self.has_dense), self.rank_bound
        if dense:
            for k in self.dense_keys:
                self.has_dense[k] = True
        self._set_bound(rank_bound)
        try:
            yield
        finally:
            self.has_dense.update(saved[0])
            self._set_bound(saved[1])
