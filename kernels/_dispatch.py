"""Backend selection: Triton on CUDA (or when forced), plain torch otherwise.

Triton is imported lazily so that `import kernels` works where it is not installed
(macOS, CPU-only wheels). The Triton kernel modules live in `kernels/_tl/` and are
only imported on first Triton dispatch; `TRITON_INTERPRET` is read by `triton.jit`
at decoration time, so tests that want interpreter mode must set it before that.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

FORCE_ENV = "DRLORA_FORCE_TRITON"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def force_triton() -> bool:
    return os.environ.get(FORCE_ENV, "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op should run its Triton kernel for these tensors."""
    if force_triton():
        if not triton_available():
            raise RuntimeError(f"{FORCE_ENV}=1 but triton is not installed")
        return True
    return triton_available() and any(t.is_cuda for t in tensors)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 ("ieee") for fp32, native for bf16/fp16."""
    return "ieee" if dtype == torch.float32 else "tf32"


def empty(*shape: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.empty, or NaN-filled when DRLORA_POISON=1 (tests: catches unwritten outputs)."""
    if os.environ.get("DRLORA_POISON", "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)


def interp_upcast(dtype: torch.dtype) -> bool:
    """The Triton interpreter (numpy) computes bf16 tl.dot wrongly: upcast operands there."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devs}")


def meta(t: torch.Tensor | None) -> tuple | None:
    """What an input check looks at: shape, dtype, strides, device (hashable)."""
    return None if t is None else (t.shape, t.dtype, t.stride(), t.device)


_CHECKED: dict[tuple, None] = {}  # cache of input signatures that passed their checks
_MAX_CHECKED = 4096


def checked_once(key: tuple, run_check) -> None:
    """Run `run_check()` the first time `key` (an op name and the `meta` of its inputs, plus any
    flag the check reads) is seen; later calls with the same key skip it. A check that raises
    is not cached. Pure host code: safe inside CUDA graph capture."""
    if key in _CHECKED:
        return
    run_check()
    if len(_CHECKED) >= _MAX_CHECKED:
        _CHECKED.clear()
    _CHECKED[key] = None
