"""CUDA graphs for decode-only steps, captured at start-up (GPU only; `enforce_eager` turns
them off).

Legend: B decode sequences, BP padded batch size (a capture size), MAXB blocks per sequence,
RB rank bucket (a LoRA rank bound rounded up to RANK_TILE times a power of two).

A graph is keyed by (BP, layout). The layout is what changes the launched work: None when no
token of the step uses an adapter, else (RB, dense) with dense = whether the graph holds the
attention / shared-expert LoRA launches. At start-up (as vLLM does) every capture size gets the
layouts None, (RB(max_lora_rank), False) and, when the model has dense LoRA projections,
(RB(max_lora_rank), True): at most 3 graphs per size, captured largest size first so the smaller
ones reuse the shared memory pool. A step replays the cheapest captured graph that covers it:
BP >= B, RB >= the step's rank bound (rank tiles past a pair's rank do nothing, so a larger
bound is exact, only more empty programs) and dense launches when any dense pool is active (the
inactive pools have all-zero ranks, so extra dense launches add nothing). A step that no graph
covers (a rank above max_lora_rank's bucket cannot happen; only if a start-up capture was
skipped) captures one lazily, counted and warned, at most MAX_GRAPHS graphs in all; otherwise it
runs eagerly. Pool contents and offsets/ranks tables are updated in place by LoraBuffers, so a
replay sees the current adapters. Padding rows write no KV (slot_mapping -1) and use no adapter
(slot -1).

A capture failure is loud: an error log with the traceback, `GraphStats.capture_failures` and
`enabled = False` in the engine stats, and graphs stay off (a failed capture can leave the
stream and the graph pool unusable: the runner is correct eagerly, only slower). With
`strict_cuda_graphs` (or DRLORA_STRICT_CUDA_GRAPHS=1) the failure raises instead, which at
start-up stops the engine (vLLM's behaviour: no silent fallback).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from drlora_serve.context import ForwardContext
from kernels.tiles import RANK_TILE, pow2

log = logging.getLogger(__name__)
MAX_GRAPHS = 64  # no lazy capture once this many graphs exist (start-up: sizes x layouts, all)
# the default capture sizes (vLLM's ladder is similar); max_num_seqs is added when no size covers it
DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MAX_CAPTURE_SIZE = 512  # larger decode batches run eagerly (their graphs' memory is not worth it)
STRICT_ENV = "DRLORA_STRICT_CUDA_GRAPHS"


def capture_sizes(max_batch: int, sizes: list[int] | None = None) -> list[int]:
    """The padded batch sizes to capture, ascending: `sizes` (EngineArgs.cuda_graph_sizes) or the
    default ladder, up to max_batch; with the default ladder max_batch itself is added when no
    size covers it (so every batch the scheduler can form replays), up to MAX_CAPTURE_SIZE."""
    mb = max(max_batch, 1)
    out = sorted({s for s in (sizes or DEFAULT_SIZES) if 1 <= s <= min(mb, MAX_CAPTURE_SIZE)})
    if not sizes and mb <= MAX_CAPTURE_SIZE and (not out or out[-1] < mb):
        out.append(mb)
    return out


def rank_bucket(rank_bound: int) -> int:
    """RANK_TILE x a power of two (16, 32, 64, ...): few distinct layouts, each exact for every
    bound below it."""
    return pow2(max(rank_bound, 1), RANK_TILE)


def strict_from_env(flag: bool) -> bool:
    return flag or os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class GraphStats:
    """Decode-only steps by how they ran, and the captures (exported in EngineStats)."""

    enabled: bool = False  # graphs can be replayed (CUDA, not enforce_eager, no failure)
    replays: int = 0  # decode-only steps replayed from a graph
    eager_decode_steps: int = 0  # decode-only steps run eagerly (any reason)
    captured: int = 0  # graphs held now
    lazy_captures: int = 0  # captured after start-up (a step no start-up graph covered)
    capture_failures: int = 0
    error: str | None = None  # the last capture failure, "Type: message"


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, sizes: list[int] | None = None, max_lora_rank: int = 256,
                 strict: bool = False, stats: GraphStats | None = None):
        self.runner = runner
        self.sizes = capture_sizes(max_batch, sizes)
        self.lora_bucket = rank_bucket(max_lora_rank)
        self.graphs: dict[tuple, tuple[object, dict, torch.Tensor]] = {}
        self.mempool = None
        self.strict = strict_from_env(strict)
        self.stats = stats if stats is not None else GraphStats()
        self.stats.enabled = True
        self._choice: dict[tuple, tuple | None] = {}  # (B, layout) -> graph key, reset on capture

    @property
    def disabled(self) -> bool:
        return not self.stats.enabled

    # ------------------------------------------------------------------ layouts and keys
    @staticmethod
    def layout(lora) -> tuple | None:
        """The step's layout: None (no adapter token) or (RB of the current bound, any dense pool)."""
        if lora is None:
            return None
        return (rank_bucket(lora.rank_bound), lora.any_dense)

    def startup_layouts(self) -> list[tuple | None]:
        lora = self.runner.lora
        out = [None, (self.lora_bucket, False)]
        if lora is not None and lora.dense_keys:
            out.append((self.lora_bucket, True))
        return out

    def select(self, B: int, layout: tuple | None) -> tuple | None:
        """The captured key that covers (B, layout) at the least cost, else None (memoised)."""
        ck = (B, layout)
        if ck in self._choice:
            return self._choice[ck]
        best = None
        for size in self.sizes:
            if size < B:
                continue
            if layout is None:
                cands = [lay for (s, lay) in self.graphs if s == size and lay is None]
                cands += sorted(lay for (s, lay) in self.graphs if s == size and lay is not None)
            else:
                rb, dense = layout
                cands = sorted(lay for (s, lay) in self.graphs
                               if s == size and lay is not None and lay[0] >= rb and (lay[1] or not dense))
            if cands:
                best = (size, cands[0])
                break
        self._choice[ck] = best
        return best

    # ------------------------------------------------------------------ capture
    def capture_all(self) -> None:
        """Start-up captures: every size (largest first) x every start-up layout."""
        t0 = time.perf_counter()
        for size in reversed(self.sizes):
            for lay in self.startup_layouts():
                if not self._capture_key(size, lay):
                    return
        log.info("captured %d CUDA graphs (decode batch sizes %s, LoRA layouts %s) in %.1f s", len(self.graphs),
                 self.sizes, self.startup_layouts(), time.perf_counter() - t0)

    def _capture_key(self, size: int, layout: tuple | None) -> bool:
        if self.disabled:
            return False
        try:
            entry = self._capture(size, layout)
        except Exception as exc:
            self._failed(size, layout, exc)
            return False
        self.graphs[(size, layout)] = entry
        self.stats.captured = len(self.graphs)
        self._choice.clear()
        return True

    def _failed(self, size: int, layout, exc: Exception) -> None:
        st = self.stats
        st.capture_failures += 1
        st.error = f"{type(exc).__name__}: {exc}"
        st.enabled = False
        log.error("CUDA graph capture failed (batch size %d, LoRA layout %s): %s. CUDA graphs are OFF from now on "
                  "and decode steps run eagerly (correct, slower). Set strict_cuda_graphs (%s=1) to fail instead, "
                  "or enforce_eager to skip graphs.", size, layout, st.error, STRICT_ENV, exc_info=exc)
        if self.strict:
            raise RuntimeError(f"CUDA graph capture failed (batch size {size}, LoRA layout {layout})") from exc

    def _capture(self, size: int, layout: tuple | None):
        r = self.runner
        dev = r.device
        with torch.inference_mode():
            st = {"ids": torch.zeros(size, dtype=torch.long, device=dev),
                  "pos": torch.zeros(size, dtype=torch.long, device=dev),
                  "slots": torch.full((size,), -1, dtype=torch.long, device=dev),
                  "adapters": torch.full((size,), -1, dtype=torch.int32, device=dev),
                  "tables": torch.zeros(size, r.max_blocks_per_seq, dtype=torch.int32, device=dev),
                  "lens": torch.ones(size, dtype=torch.int32, device=dev)}
            lora = r.lora if layout is not None else None
            ctx = ForwardContext(positions=st["pos"], slot_mapping=st["slots"], slot_ids=st["adapters"],
                                 num_decode=size, block_tables=st["tables"], context_lens=st["lens"], lora=lora)

            def fwd():
                return r.model.forward(st["ids"], ctx)

            if lora is None:
                graph, out = self._record(fwd)
            else:
                with lora.capture_layout(*layout):  # the layout's launches, whatever is resident now
                    graph, out = self._record(fwd)
        return graph, st, out

    def _record(self, fn):
        """Warm fn up twice on a side stream (Triton compiles, lazy allocations, one-time checks
        that read back to the host), then capture one call. Returns (graph, output). The only
        CUDA-specific part: tests replace it."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            out = fn()
        if self.mempool is None:
            self.mempool = graph.pool()
        torch.cuda.synchronize()
        return graph, out

    # ------------------------------------------------------------------ replay
    def run(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        """The decode step's hidden states from a graph, or None (the caller runs it eagerly)."""
        B = ctx.num_decode
        if self.disabled or B == 0 or B > self.sizes[-1]:
            return None
        layout = self.layout(ctx.lora)
        key = self.select(B, layout)
        if key is None:
            if len(self.graphs) >= MAX_GRAPHS:
                return None
            size = next(s for s in self.sizes if s >= B)
            log.warning("lazy CUDA graph capture (batch size %d, LoRA layout %s): no start-up graph covers it",
                        size, layout)
            if not self._capture_key(size, layout):
                return None
            self.stats.lazy_captures += 1
            key = (size, layout)
        graph, st, out = self.graphs[key]
        mb = ctx.block_tables.shape[1]
        st["ids"][:B].copy_(input_ids)
        st["ids"][B:].zero_()
        st["pos"][:B].copy_(ctx.positions)
        st["pos"][B:].zero_()
        st["slots"][:B].copy_(ctx.slot_mapping)
        st["slots"][B:].fill_(-1)
        st["adapters"][:B].copy_(ctx.slot_ids)
        st["adapters"][B:].fill_(-1)
        st["tables"].zero_()
        st["tables"][:B, :mb].copy_(ctx.block_tables)
        st["lens"][:B].copy_(ctx.context_lens)
        st["lens"][B:].fill_(1)
        graph.replay()
        return out[:B]
