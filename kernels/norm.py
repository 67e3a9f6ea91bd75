"""RMSNorm, alone or fused with the residual add (and with the MoE top-k combine before it).

Legend: T tokens, W row width (hidden size), K top-k.

Semantics, with transformers' rounding points (dt = the model dtype):
    rms_norm(x, w)            = w * dt(x.float() * rsqrt(mean(x.float()^2) + eps))
    add_rms_norm_(x, r, w)    : r <- dt(r + x) in place; returns rms_norm(r, w)
        x may be the (T, K, W) fp32 weighted partials of an MoE layer (fused_moe(combine=False)):
        they are summed over K in fp32 and rounded to dt first, as fused_moe's combine does.
    moe_combine(partials, dt) = dt(sum_k partials[:, k])
One Triton launch each (kernels/_tl/norm.py); the twins are the torch ops the model used before.
"""

from __future__ import annotations

import torch

from kernels._dispatch import check, check_same_device, checked_once, empty, meta, use_triton
from kernels.tiles import row_tiles

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- torch twins


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def moe_combine_torch(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return partials.sum(1).to(dtype)


def add_rms_norm_torch_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    residual.add_(moe_combine_torch(x, residual.dtype) if x.dim() == 3 else x)
    return rms_norm_torch(residual, weight, eps)


# ----------------------------------------------------------------------------- checks


def _check_rows(name: str, t: torch.Tensor, rows: int, width: int, dtype: torch.dtype | None) -> None:
    check(t.dim() == 2 and t.shape == (rows, width), f"{name} must be (T={rows}, W={width}), got {tuple(t.shape)}")
    check(t.stride(1) == 1, f"{name} must have a contiguous last dim")
    if dtype is not None:
        check(t.dtype == dtype, f"{name} dtype {t.dtype} != {dtype}")


def _check_norm(x, residual, weight, out) -> None:
    ref = residual if residual is not None else x
    check(ref.dim() == 2, f"rows must be (T, W), got {tuple(ref.shape)}")
    t, w = ref.shape
    check(ref.dtype in FLOAT_DTYPES, f"unsupported dtype {ref.dtype}")
    if x.dim() == 3:
        check(residual is not None, "MoE partials (T, K, W) need a residual")
        check(x.shape[0] == t and x.shape[2] == w and x.dtype == torch.float32 and x.stride(2) == 1,
              f"partials must be (T={t}, K, W={w}) fp32 with a contiguous last dim, got {tuple(x.shape)} {x.dtype}")
    else:
        _check_rows("x", x, t, w, ref.dtype)
    if residual is not None:
        _check_rows("residual", residual, t, w, None)
    check(weight.shape == (w,) and weight.dtype == ref.dtype and weight.is_contiguous(),
          f"weight must be contiguous ({w},) {ref.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if out is not None:
        _check_rows("out", out, t, w, ref.dtype)
    check_same_device(x=x, residual=residual, weight=weight, out=out)


def _check_combine(partials, dtype) -> None:
    check(partials.dim() == 3 and partials.dtype == torch.float32 and partials.stride(2) == 1,
          f"partials must be (T, K, W) fp32 with a contiguous last dim, got {tuple(partials.shape)} {partials.dtype}")
    check(dtype in FLOAT_DTYPES, f"unsupported dtype {dtype}")


# ----------------------------------------------------------------------------- launcher


def _launch(x, residual, weight, out, eps: float, do_norm: bool) -> torch.Tensor:
    from kernels._tl.norm import add_rms_norm_kernel

    t, w = out.shape
    if t == 0:
        return out
    parts = x.shape[1] if x.dim() == 3 else 0
    tiles = row_tiles(w)
    res = residual if residual is not None else out
    add_rms_norm_kernel[(t,)](
        x, res, weight if weight is not None else out, out, w, float(eps),
        x.stride(0), x.stride(1) if parts else 0, res.stride(0), out.stride(0),
        NUM_PARTS=parts, HAS_RESIDUAL=residual is not None, DO_NORM=do_norm, BLOCK=tiles.BLOCK,
        num_warps=tiles.num_warps,
    )
    return out


# ----------------------------------------------------------------------------- public ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """out (T, W) = weight * dt(x.float() * rsqrt(mean(x.float()^2) + eps)); x (T, W), weight (W,)."""
    checked_once(("rms_norm", meta(x), meta(weight), meta(out)), lambda: _check_norm(x, None, weight, out))
    if not use_triton(x):
        y = rms_norm_torch(x, weight, eps)
        return y if out is None else out.copy_(y)
    out = out if out is not None else empty(*x.shape, dtype=x.dtype, device=x.device)
    return _launch(x, None, weight, out, eps, True)


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """residual (T, W) <- dt(residual + x) in place; returns rms_norm(residual, weight, eps).

    x (T, W) in the model dtype, or (T, K, W) fp32 MoE partials (combined first, see module)."""
    checked_once(("add_rms_norm_", meta(x), meta(residual), meta(weight), meta(out)),
                 lambda: _check_norm(x, residual, weight, out))
    if not use_triton(residual):
        y = add_rms_norm_torch_(x, residual, weight, eps)
        return y if out is None else out.copy_(y)
    out = out if out is not None else empty(*residual.shape, dtype=residual.dtype, device=residual.device)
    return _launch(x, residual, weight, out, eps, True)


def moe_combine(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(T, H) = dt(sum over K of partials (T, K, H) fp32), in one launch."""
    checked_once(("moe_combine", meta(partials), dtype), lambda: _check_combine(partials, dtype))
    if not use_triton(partials):
        return moe_combine_torch(partials, dtype)
    out = empty(partials.shape[0], partials.shape[2], dtype=dtype, device=partials.device)
    return _launch(partials, None, None, out, 0.0, False)
