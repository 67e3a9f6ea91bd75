"""Paged KV block bookkeeping: allocate, free, reference counts, prefix caching. No tensors.

A block holds `block_size` consecutive tokens of one sequence. Full blocks whose KV has been
computed are registered under a chain hash of (parent hash, adapter identity, token ids):
the KV depends on every earlier token and on the adapter (its q/k/v LoRA and the residual
stream its experts produced), so two requests share a block only if both agree. Freed blocks
keep their hash and stay matchable until reused (evicted oldest first).

The chain hash is SHA-256 (as vLLM's default since its CVE-2025-25183), not Python's `hash()`:
a block's identity rests on its parent's hash alone, so a collision anywhere in a chain would
hand one request another's KV, and Python's 64-bit integer and tuple hashes are neither
randomised nor hard to collide. Hashing costs ~1 us a block, once, when the block fills.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from drlora_serve.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None  # chain hash of a full block whose KV is (being) written


_ROOT = hashlib.sha256(b"drlora prefix cache").digest()  # the parent of a sequence's first block


def chain_hash(parent: bytes | None, adapter_uid: int | None, tokens: list[int]) -> bytes:
    """SHA-256 of (parent hash, adapter identity, token ids), each field of fixed width so
    that no two inputs encode alike."""
    adapter = b"\0" * 9 if adapter_uid is None else b"\1" + adapter_uid.to_bytes(8, "little", signed=True)
    return hashlib.sha256((parent or _ROOT) + adapter + array("q", tokens).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # chain hash -> block id
        self.num_cache_hits = 0  # tokens

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / max(self.num_blocks, 1)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        return max(0, self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def _hash(self, seq: Sequence, i: int, parent: bytes | None) -> bytes:
        bs = self.block_size
        return chain_hash(parent, seq.adapter_key, seq.token_ids[i * bs:(i + 1) * bs])

    def find_cached(self, seq: Sequence) -> list[int]:
        """Leading full blocks of seq already in the cache (at most num_tokens - 1 tokens, so
        that at least one token is computed and yields logits). No side effects. Every token of
        a sequence being admitted is known (none in flight)."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return []
        hits, parent = [], None
        for i in range((seq.num_tokens - 1) // self.block_size):
            h = self._hash(seq, i, parent)
            bid = self.cached.get(h)
            if bid is None:
                break
            hits.append(bid)
            parent = h
        return hits

    # ------------------------------------------------------------------ updates
    def admit(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> bool:
        """Attach cached blocks and allocate the rest for num_new_tokens beyond them.
        All or nothing: False (and no change) if the free blocks do not suffice."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        reuse_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        need = self.blocks_for(len(cached) * self.block_size + num_new_tokens) - len(cached)
        if need + reuse_free > len(self.free):
            return False
        for b in cached:
            blk = self.blocks[b]
            if blk.ref_count == 0:
                del self.free[b]
            blk.ref_count += 1
        seq.block_table = list(cached)
        seq.num_computed_tokens = len(cached) * self.block_size
        seq.num_hashed_blocks = len(cached)
        self.num_cache_hits += seq.num_computed_tokens
        self._grow(seq, need)
        return True

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= len(self.free)

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        need = self.num_new_blocks(seq, num_new_tokens)
        assert need <= len(self.free), "caller must check can_append"
        self._grow(seq, need)

    def _grow(self, seq: Sequence, n: int) -> None:
        for _ in range(n):
            bid, _ = self.free.popitem(last=False)  # oldest freed first: recent prefixes live longer
            blk = self.blocks[bid]
            if blk.hash is not None:
                if self.cached.get(blk.hash) == bid:
                    del self.cached[blk.hash]
                blk.hash = None
            blk.ref_count = 1
            seq.block_table.append(bid)

    def free_seq(self, seq: Sequence) -> None:
        for bid in reversed(seq.block_table):  # tail blocks are evicted before shared heads
            blk = self.blocks[bid]
            blk.ref_count -= 1
            assert blk.ref_count >= 0
            if blk.ref_count == 0:
                self.free[bid] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def commit(self, seq: Sequence) -> None:
        """Register the full blocks of seq whose KV is written (or being written by a launched
        step: whoever matches them is scheduled later, so the device orders the two) and whose
        tokens the host knows (tokens still in flight are not hashable yet)."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        if full <= seq.num_hashed_blocks:
            return
        parent = self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash if seq.num_hashed_blocks else None
        for i in range(seq.num_hashed_blocks, full):
            blk = self.blocks[seq.block_table[i]]
            h = self._hash(seq, i, parent)
            if blk.hash is None:
                blk.hash = h
                self.cached.setdefault(h, blk.block_id)
            parent = blk.hash
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)
