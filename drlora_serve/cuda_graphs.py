"""CUDA graphs for decode-only steps (GPU only; `enforce_eager` turns them off).

Legend: B decode sequences, BP padded batch size, MAXB blocks per sequence.
A graph is captured lazily per (padded batch size, LoRA layout) where the layout is what
changes the launched work: whether any adapter token is present, the rank bound and which
attention-LoRA pools are active. Pool contents and offsets/ranks tables are updated in place
by LoraBuffers, so a replay sees the current adapters. Padding rows write no KV
(slot_mapping -1) and use no adapter (slot -1). Any capture failure disables graphs and the
runner stays eager (correct, only slower).
"""

from __future__ import annotations

import logging

import torch

from drlora_serve.context import ForwardContext

log = logging.getLogger(__name__)
MAX_GRAPHS = 64


class DecodeGraphs:
    def __init__(self, runner, max_batch: int):
        self.runner = runner
        self.sizes = [s for s in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if s <= max(max_batch, 1)]
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}
        self.mempool = None
        self.disabled = False

    def _layout(self, lora) -> tuple | None:
        if lora is None:
            return None
        dense = tuple(k for k in lora.keys if k in lora._dense and lora.has_dense[k])
        return (max(lora.slot_ranks.values(), default=0), dense)

    def run(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        B = ctx.num_decode
        size = next((s for s in self.sizes if s >= B), None)
        if self.disabled or size is None or B == 0:
            return None
        key = (size, self._layout(ctx.lora))
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= MAX_GRAPHS:
                self.graphs.pop(next(iter(self.graphs)))
            try:
                entry = self._capture(size, ctx.lora)
            except Exception as exc:  # pragma: no cover - GPU only
                log.warning("CUDA graph capture failed (%s); running eagerly", exc)
                self.disabled = True
                return None
            self.graphs[key] = entry
        graph, st, out = entry
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

    def _capture(self, size: int, lora):
        r = self.runner
        dev = r.device
        st = {"ids": torch.zeros(size, dtype=torch.long, device=dev),
              "pos": torch.zeros(size, dtype=torch.long, device=dev),
              "slots": torch.full((size,), -1, dtype=torch.long, device=dev),
              "adapters": torch.full((size,), -1, dtype=torch.int32, device=dev),
              "tables": torch.zeros(size, r.max_blocks_per_seq, dtype=torch.int32, device=dev),
              "lens": torch.ones(size, dtype=torch.int32, device=dev)}
        ctx = ForwardContext(positions=st["pos"], slot_mapping=st["slots"], slot_ids=st["adapters"], num_decode=size,
                             block_tables=st["tables"], context_lens=st["lens"], lora=lora)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (Triton autotune / compile) outside the capture
                r.model.forward(st["ids"], ctx)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            out = r.model.forward(st["ids"], ctx)
        if self.mempool is None:
            self.mempool = graph.pool()
        torch.cuda.synchronize()
        return graph, st, out
