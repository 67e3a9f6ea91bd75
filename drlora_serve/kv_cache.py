"""Paged KV cache tensors: one (NB, BS, KVH, D) key and value tensor per layer.

The number of blocks comes from `num_kv_blocks` when given (CPU default 1024), else from
`gpu_memory_utilization` of the device memory left after the weights and adapter pool
(minus an activation reserve measured by a dry run)."""

from __future__ import annotations

import torch

CPU_DEFAULT_BLOCKS = 1024


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def num_blocks_for_memory(device: torch.device, utilization: float, per_block: int, reserve_bytes: int) -> int:
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free  # weights, pool, this process's cache allocator and other processes
    budget = int(total * utilization) - used_by_others - reserve_bytes
    if budget < per_block:
        raise RuntimeError(
            f"no memory left for the KV cache: {total / 2**30:.1f} GiB total, {free / 2**30:.1f} GiB free, "
            f"gpu_memory_utilization={utilization}; raise it or lower max_loras / lora_pool_rank_rows")
    return budget // per_block


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.layers = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)
