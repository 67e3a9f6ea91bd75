"""Tile configurations of every Triton launch, chosen in one place and cached per shape.

Legend: N routed pairs, E experts, IN/OUT GEMM dims, W row width, T tokens, D head dim.

Each function is a heuristic keyed on what the launch's shape depends on (sizes, dtype, device)
and memoised, so a launcher pays a dict lookup, not the heuristic, per call. A tuning table (per
token count, keyed by shape, dtype and device name) plugs in here: look the key up first and
fall back to the heuristic. Everything here is host code and graph-capture safe.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

RANK_TILE = 16  # BR: rank rows per tl.dot in the LoRA shrink / expand (and the fused epilogues)


def pow2(n: int, lo: int = 1, hi: int = 1 << 30) -> int:
    """Smallest power of two >= n, clamped to [lo, hi]."""
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # an H100's count: the interpreter's grids then look like the GPU's
    return torch.cuda.get_device_properties(device.index or 0).multi_processor_count


@dataclass(frozen=True)
class GemmTiles:
    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int

    def kwargs(self) -> dict:
        return dict(BM=self.BM, BN=self.BN, BK=self.BK, num_warps=self.num_warps, num_stages=self.num_stages)


def moe_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block of the routing alignment, by routed pairs per expert. The same BM serves
    the gate/up GEMM, the down GEMM and the LoRA kernels (one alignment for all of them)."""
    per_expert = num_pairs / max(num_experts, 1)
    return 16 if per_expert <= 16 else (32 if per_expert <= 48 else 64)


@functools.lru_cache(maxsize=4096)
def moe_gemm_tiles(num_pairs: int, num_experts: int, out_dim: int, in_dim: int, dtype: torch.dtype,
                   device: torch.device) -> GemmTiles:
    """Grouped expert GEMM: BM by tokens per expert, BN shrunk until every SM gets work."""
    bm = moe_block_m(num_pairs, num_experts)
    bk = 128 if bm <= 32 else 64
    if dtype == torch.float32:
        bk = min(bk, 32)
    bk = min(bk, pow2(in_dim, 16))
    blocks = min(num_pairs, num_experts) + num_pairs // bm
    bn = 128 if bm == 64 else 64
    while bn > 32 and blocks * -(-out_dim // bn) < 2 * num_sms(device):
        bn //= 2
    bn = min(bn, pow2(out_dim, 16))
    warps = 8 if bm * bn >= 64 * 128 else 4
    return GemmTiles(bm, bn, bk, warps, 3 if bm == 64 else 4)


@functools.lru_cache(maxsize=1024)
def lora_shrink_bk(in_dim: int, dtype: torch.dtype) -> int:
    return pow2(in_dim, 16, 128 if dtype != torch.float32 else 64)


@functools.lru_cache(maxsize=1024)
def lora_expand_bn(out_dim: int, dtype: torch.dtype) -> int:
    return pow2(out_dim, 16, 128 if dtype != torch.float32 else 64)


def lora_block_m(num_pairs: int) -> int:
    """Rows per block of the dense (attention) LoRA alignment."""
    return 16 if num_pairs <= 2048 else (32 if num_pairs <= 16384 else 64)


@dataclass(frozen=True)
class RowTiles:
    BLOCK: int
    num_warps: int


@functools.lru_cache(maxsize=1024)
def row_tiles(width: int) -> RowTiles:
    """One program per row over a whole row of `width` elements (RMSNorm, the MoE combine)."""
    block = pow2(width, 16)
    return RowTiles(block, 4 if block <= 2048 else (8 if block <= 8192 else 16))


@dataclass(frozen=True)
class AttnInputTiles:
    QHP: int  # query heads, padded to a power of two
    KVHP: int
    HALF: int  # D // 2 padded
    num_warps: int


@functools.lru_cache(maxsize=1024)
def attn_input_tiles(num_heads: int, num_kv_heads: int, head_dim: int) -> AttnInputTiles:
    qhp, kvhp, half = pow2(num_heads), pow2(num_kv_heads), pow2(head_dim // 2)
    elems = (qhp + 2 * kvhp) * 2 * half
    return AttnInputTiles(qhp, kvhp, half, 4 if elems <= 4096 else (8 if elems <= 16384 else 16))


@dataclass(frozen=True)
class RouterTiles:
    BT: int  # tokens per program
    BLOCK: int  # experts, padded
    num_warps: int


@functools.lru_cache(maxsize=1024)
def router_tiles(num_experts: int) -> RouterTiles:
    block = pow2(num_experts, 16)
    bt = max(1, min(16, 2048 // block))
    return RouterTiles(bt, block, 4 if bt * block >= 1024 else 1)


@dataclass(frozen=True)
class PrefillTiles:
    BM: int
    BN: int
    num_warps: int


@functools.lru_cache(maxsize=1024)
def prefill_attention_tiles(max_q_len: int, head_dim: int) -> PrefillTiles:
    bm = 16 if max_q_len <= 16 else (32 if max_q_len <= 32 else 64)
    return PrefillTiles(bm, 32 if head_dim > 128 else 64, 4)
