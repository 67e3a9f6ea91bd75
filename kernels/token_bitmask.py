"""Grammar token masks applied to the logits in place (structured outputs).

Legend: N rows of logits, V vocab, Nc constrained rows, W32 = ceil(V / 32) mask words.

Semantics (llguidance's / xgrammar's bitmask layout, int32 words, little-endian):
    for i < Nc, t < V:
        logits[rows[i], t] = -inf   unless t < 32 * W32 and bit t % 32 of bitmask[i, t // 32] is set
    rows are distinct; the other rows, and the allowed entries, are left as they are.
One Triton launch on CUDA (kernels/_tl/token_bitmask.py). The CPU twin works on NumPy views of
the same memory: at sampling sizes NumPy's byte-table `take` and one add cost about half of
torch's CPU index ops (~40 vs ~70-80 us for 32 of 64 rows of 849, in a loop on the 2-core CI
machine), and this runs on the engine's host path when the model runs on the CPU (the host
benchmarks' stub model).
"""

from __future__ import annotations

import numpy as np
import torch

from kernels._dispatch import check, check_same_device, checked_once, meta, use_triton

LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024  # tokens per program (32 mask words)

# entry [b, i]: 0 if bit i of byte b is set, else -inf; each mask byte picks its 8 additive values
_BITS = (np.arange(256)[:, None] >> np.arange(8)) & 1
_NP_TABLES = {dt: np.where(_BITS == 1, 0.0, -np.inf).astype(dt) for dt in (np.float32, np.float16)}
_TORCH_TABLES: dict[torch.device, torch.Tensor] = {}


def _torch_table(device: torch.device) -> torch.Tensor:
    t = _TORCH_TABLES.get(device)
    if t is None:
        t = _TORCH_TABLES[device] = torch.from_numpy(_NP_TABLES[np.float32]).to(device)
    return t


# ----------------------------------------------------------------------------- twin


def apply_token_bitmask_torch_(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The twin: one table lookup per mask byte and one add into the constrained rows (NumPy
    views on the CPU for fp32 / fp16, torch ops otherwise)."""
    n, V = bitmask.shape[0], logits.shape[1]
    if n == 0:
        return logits
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float16):
        a, r = logits.numpy(), rows.numpy()
        sub = a.take(r, axis=0)  # (Nc, V) copy (`take`: cheaper than fancy indexing here)
        mask_rows_np(sub, bitmask.numpy())
        a[r] = sub
        return logits
    covered = min(V, 32 * bitmask.shape[1])  # tokens the mask speaks for; the rest are forbidden
    add = _torch_table(logits.device).index_select(0, bitmask.view(torch.uint8).reshape(-1).long()).view(n, -1)
    if covered < V:
        add = torch.nn.functional.pad(add, (0, V - covered), value=float("-inf"))
    logits.index_add_(0, rows, add[:, :V].to(logits.dtype))  # rows are distinct: one add per element
    return logits


def mask_rows_np(a: np.ndarray, bitmask: np.ndarray) -> None:
    """a (n, V) fp32 / fp16 NumPy rows, masked in place by bitmask (n, W32) int32 (semantics above)."""
    n, V = a.shape
    covered = min(V, 32 * bitmask.shape[1])
    add = _NP_TABLES[a.dtype.type].take(bitmask.view(np.uint8), axis=0).reshape(n, -1)  # (n, 32 W32)
    a[:, :covered] += add[:, :covered]
    if covered < V:
        a[:, covered:] = -np.inf


# ----------------------------------------------------------------------------- checks


def _check(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    check(logits.dim() == 2 and logits.stride(1) == 1,
          f"logits must be (N, V) with a contiguous last dim, got {tuple(logits.shape)}")
    check(logits.dtype in LOGITS_DTYPES, f"unsupported logits dtype {logits.dtype}")
    check(bitmask.dim() == 2 and bitmask.dtype == torch.int32 and bitmask.is_contiguous(),
          f"bitmask must be a contiguous (Nc, W32) int32 tensor, got {tuple(bitmask.shape)} {bitmask.dtype}")
    check(rows.dim() == 1 and rows.dtype in (torch.int32, torch.int64) and rows.is_contiguous(),
          f"rows must be a contiguous (Nc,) int32/int64 tensor, got {tuple(rows.shape)} {rows.dtype}")
    check(rows.shape[0] == bitmask.shape[0], f"{rows.shape[0]} rows for {bitmask.shape[0]} masks")
    check_same_device(logits=logits, rows=rows, bitmask=bitmask)


# ----------------------------------------------------------------------------- public op


def apply_token_bitmask_(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf in logits (N, V) wherever bitmask (Nc, W32) int32 forbids a token of rows (Nc,)
    (module docstring); in place, returns logits."""
    checked_once(("apply_token_bitmask_", meta(logits), meta(rows), meta(bitmask)),
                 lambda: _check(logits, rows, bitmask))
    if not use_triton(logits):
        return apply_token_bitmask_torch_(logits, rows, bitmask)
    n, V = bitmask.shape[0], logits.shape[1]
    if n == 0 or V == 0:
        return logits
    from kernels._tl.token_bitmask import token_bitmask_kernel

    token_bitmask_kernel[(n, -(-V // BLOCK))](logits, rows, bitmask, V, bitmask.shape[1], logits.stride(0),
                                              BLOCK=BLOCK, num_warps=4)
    return logits
