"""The per-step forward context, built by the model runner and passed down explicitly.

Legend: T tokens, B sequences, S adapter slots, MAXB blocks per sequence.
Token order in a step: the decode tokens first (one per decoding sequence), then the
prefill chunks back to back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillChunk:
    start: int  # first row of the chunk in the flattened batch
    length: int  # query tokens in this chunk
    context_len: int  # cached prefix + chunk (keys the chunk attends to)
    block_table: torch.Tensor  # (nblocks,) int64, on device


@dataclass
class ForwardContext:
    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64: cache slot of each token's KV
    slot_ids: torch.Tensor  # (T,) int32: adapter slot of each token, -1 = base model
    num_decode: int = 0  # rows [0, num_decode) are decode tokens
    block_tables: torch.Tensor | None = None  # (B, MAXB) int32 for the decode rows
    context_lens: torch.Tensor | None = None  # (B,) int32 for the decode rows
    prefills: list[PrefillChunk] = field(default_factory=list)
    lora: object | None = None  # lora_buffers.LoraBuffers when any token uses an adapter
    router_groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (slot, rows)
