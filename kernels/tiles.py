"""Tile configurations of every Triton launch, chosen in one place and cached per shape.

Legend: N routed pairs, E experts, IN/OUT GEMM dims, W row width, T tokens, D head dim,
M a table's routed-pair bucket, B decode sequences, KVH kv heads, MAXB blocks per sequence.

Each function is a heuristic keyed on what the launch's shape depends on (sizes, dtype, device)
and memoised, so a launcher pays a dict lookup, not the heuristic, per call. The MoE GEMM and
the MoE LoRA shrink / expand first look up a tuning table (`benchmarks/tune.py` writes them:
JSON in kernels/configs/, and in the folders of DRLORA_TILE_CONFIGS, os.pathsep-separated), keyed
by kernel, shape (E, N, K), dtype and device name (`torch.cuda.get_device_name()`, "cpu" for
the interpreter) with buckets of routed pairs; the bucket nearest N wins (vLLM's rule). No match:
the heuristic. Only buckets tuned at the launch's BM (the alignment's) qualify. Tables are read once (the first miss), never per launch; `reload_tables()` forgets
them and every memoised choice. Everything here is host code and graph-capture safe.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

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


# ----------------------------------------------------------------------------- tuning tables
CONFIG_DIR = Path(__file__).with_name("configs")
CONFIG_ENV = "DRLORA_TILE_CONFIGS"
# the table's shape key per kernel: moe_gemm (E, OUT, IN); lora_shrink (E, RANK_TILE, IN): one
# program computes a (BM, BR) tile over IN; lora_expand (E, OUT, RANK_TILE): a (BM, BN) tile
# over rank tiles
TABLE_KERNELS = ("moe_gemm", "lora_shrink", "lora_expand")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())


def config_dirs() -> list[Path]:
    extra = [Path(d) for d in os.environ.get(CONFIG_ENV, "").split(os.pathsep) if d]
    return [CONFIG_DIR, *extra]  # later folders win on the same key


@functools.cache
def _tables() -> dict[tuple, list[tuple[int, dict]]]:
    """(kernel, E, N, K, dtype, device name) -> [(M, config)] sorted by M, from every table file."""
    out: dict[tuple, list[tuple[int, dict]]] = {}
    for d in config_dirs():
        for f in sorted(d.glob("*.json")) if d.is_dir() else []:
            doc = json.loads(f.read_text())
            for e in doc.get("entries", []):
                key = (e["kernel"], e["E"], e["N"], e["K"], e["dtype"], doc["device"])
                out[key] = sorted((int(m), c) for m, c in e["buckets"].items())
    return out


def table_config(kernel: str, num_experts: int, n: int, k: int, dtype: torch.dtype, device: torch.device,
                 num_pairs: int, block_m: int) -> dict | None:
    """The tuned config of the bucket nearest num_pairs (ties: the smaller) among those tuned
    at this launch's BM (a config's shared memory and occupancy were measured with it), or None."""
    rows = _tables().get((kernel, num_experts, n, k, dtype_name(dtype), device_name(device)))
    rows = [mc for mc in rows or () if mc[1].get("BM", block_m) == block_m]
    if not rows:
        return None
    return min(rows, key=lambda mc: (abs(mc[0] - num_pairs), mc[0]))[1]


def reload_tables() -> None:
    """Forget the tables and every memoised tile choice (after a tuner wrote a table)."""
    _tables.cache_clear()
    for f in (moe_gemm_tiles, lora_shrink_tiles, lora_expand_tiles):
        f.cache_clear()


# ----------------------------------------------------------------------------- MoE GEMM and LoRA
def moe_gemm_heuristic(num_pairs: int, num_experts: int, out_dim: int, in_dim: int, dtype: torch.dtype,
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


@functools.lru_cache(maxsize=4096)
def moe_gemm_tiles(num_pairs: int, num_experts: int, out_dim: int, in_dim: int, dtype: torch.dtype,
                   device: torch.device) -> GemmTiles:
    """The tuned BN/BK/warps/stages of the table, else the heuristic's. BM is always the
    alignment's (moe_block_m): the gate/up GEMM, the down GEMM and the LoRA kernels share one
    alignment, so BM is not a per-GEMM choice."""
    h = moe_gemm_heuristic(num_pairs, num_experts, out_dim, in_dim, dtype, device)
    t = table_config("moe_gemm", num_experts, out_dim, in_dim, dtype, device, num_pairs, h.BM)
    if t is None:
        return h
    return GemmTiles(h.BM, t["BN"], t["BK"], t["num_warps"], t["num_stages"])


@functools.lru_cache(maxsize=1024)
def lora_shrink_bk(in_dim: int, dtype: torch.dtype) -> int:
    return pow2(in_dim, 16, 128 if dtype != torch.float32 else 64)


@functools.lru_cache(maxsize=1024)
def lora_expand_bn(out_dim: int, dtype: torch.dtype) -> int:
    return pow2(out_dim, 16, 128 if dtype != torch.float32 else 64)


@dataclass(frozen=True)
class LoraTiles:
    """The MoE LoRA shrink's BK or the expand's BN (BM is the alignment's, BR = RANK_TILE)."""

    BLOCK: int
    num_warps: int = 4
    num_stages: int | None = None  # None: Triton's default (the launch passes nothing)

    def launch_kwargs(self) -> dict:
        return {"num_warps": self.num_warps} | ({"num_stages": self.num_stages} if self.num_stages else {})


@functools.lru_cache(maxsize=4096)
def lora_shrink_tiles(num_pairs: int, num_experts: int, in_dim: int, block_m: int, dtype: torch.dtype,
                      device: torch.device) -> LoraTiles:
    """block_m: the launch's alignment BM (moe_block_m in the fused MoE, lora_block_m alone)."""
    t = table_config("lora_shrink", num_experts, RANK_TILE, in_dim, dtype, device, num_pairs, block_m)
    if t is None:
        return LoraTiles(lora_shrink_bk(in_dim, dtype))
    return LoraTiles(t["BK"], t["num_warps"], t["num_stages"])


@functools.lru_cache(maxsize=4096)
def lora_expand_tiles(num_pairs: int, num_experts: int, out_dim: int, block_m: int, dtype: torch.dtype,
                      device: torch.device) -> LoraTiles:
    t = table_config("lora_expand", num_experts, out_dim, RANK_TILE, dtype, device, num_pairs, block_m)
    if t is None:
        return LoraTiles(lora_expand_bn(out_dim, dtype))
    return LoraTiles(t["BN"], t["num_warps"], t["num_stages"])


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


# ----------------------------------------------------------------------------- decode attention
DECODE_MAX_SPLITS = 16  # split-KV: at most this many programs per (sequence, kv head)
DECODE_MIN_SPLIT_BLOCKS = 4  # and at least this many cache blocks per split (of MAXB)


@functools.lru_cache(maxsize=4096)
def decode_splits(batch: int, kv_heads: int, max_blocks: int, device: torch.device) -> int:
    """Split-KV count S of paged decode attention (flash-decoding): the programs per (sequence,
    kv head). B x KVH programs that already give about two per SM -> 1 (no split, no reduce
    launch); else enough splits for ~2 programs per SM, at most DECODE_MAX_SPLITS and at most
    MAXB // DECODE_MIN_SPLIT_BLOCKS (short tables do not split). A function of static values only
    (padded batch, head count, block-table width, SM count), never of the step's context
    lengths: a CUDA graph captured at one batch size replays with the launches it recorded."""
    programs = max(batch, 1) * max(kv_heads, 1)
    target = 2 * num_sms(device)
    if programs >= target:
        return 1
    return max(1, min(DECODE_MAX_SPLITS, -(-target // programs), max_blocks // DECODE_MIN_SPLIT_BLOCKS))
