"""The per-step forward context, built by the model runner and passed down explicitly.

Legend: T tokens, B decode sequences, C prefill chunks, S adapter slots, MAXB blocks per sequence.
Token order in a step: the decode tokens first (one per decoding sequence), then the
prefill chunks back to back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillBatch:
    """The step's prefill chunks, varlen style: chunk c's queries are rows [cu_q[c], cu_q[c+1])."""

    cu_q: torch.Tensor  # (C+1,) int32, cu_q[0] = num_decode
    context_lens: torch.Tensor  # (C,) int32: cached prefix + chunk (the keys the chunk attends to)
    block_tables: torch.Tensor  # (C, MAXB) int32
    max_q_len: int


@dataclass
class ForwardContext:
    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64: cache slot of each token's KV
    slot_ids: torch.Tensor  # (T,) int32: adapter slot of each token, -1 = base model
    num_decode: int = 0  # rows [0, num_decode) are decode tokens
    block_tables: torch.Tensor | None = None  # (B, MAXB) int32 for the decode rows
    context_lens: torch.Tensor | None = None  # (B,) int32 for the decode rows
    prefill: PrefillBatch | None = None
    lora: object | None = None  # lora_buffers.LoraBuffers when any token uses an adapter
    router_groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (slot, rows)
    # Set by the model inside its forward, not by the runner: the tokens' alignment by adapter slot
    # (kernels.dense_lora_plan) that every attention-LoRA launch of the step shares. The model
    # resets it when a forward starts (a CUDA graph capture runs several forwards on one context).
    dense_lora_align: object | None = None
