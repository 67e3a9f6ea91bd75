"""Data parallelism under torchrun (gloo on CPU, nccl on CUDA), done by hand.

Why not `DistributedDataParallel`: the router's requires_grad flips after warm-up and whole
experts may receive no tokens in a step, both awkward for DDP's bucketing. Instead every
process runs its shard of the global batch, the loss is normalised by the *global* count of
labelled tokens, and the trainable grads are summed with one all-reduce per step. That is
exactly the gradient of the global-batch mean loss, so 1 and N processes train the same.
The routing statistics are summed the same way before they enter the EMAs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def init(device: str) -> Dist:
    """Join the process group if launched by torchrun (WORLD_SIZE > 1), else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(d: Dist) -> None:
    if d.on and dist.is_initialized():
        dist.destroy_process_group()


def shard(indices: list[int], d: Dist) -> list[int]:
    """This process's contiguous part of the global batch (sizes differ by at most one)."""
    n = len(indices)
    lo, hi = n * d.rank // d.world, n * (d.rank + 1) // d.world
    return indices[lo:hi]


def sum_(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """In-place sum over processes (a no-op on one process)."""
    if d.on:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def sum_grads(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Sum the grads of all trainable params over processes with one flat all-reduce."""
    if not d.on:
        return
    live = [p for p in params if p.requires_grad]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in live])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    off = 0
    for p in live:
        n = p.numel()
        p.grad.copy_(flat[off:off + n].view_as(p.grad))
        off += n


def broadcast_object(obj, d: Dist):
    if not d.on:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
