"""RMSNorm with the residual add and the MoE top-k combine fused in (Triton).

Legend: T tokens (rows), W row width (hidden size), K top-k partials per row.
"""

import triton
import triton.language as tl


@triton.jit
def add_rms_norm_kernel(
    x_ptr,  # (T, W) model dtype, or (T, K, W) fp32 partials when NUM_PARTS = K > 0
    res_ptr,  # (T, W) residual stream, model dtype, updated in place (HAS_RESIDUAL)
    w_ptr,  # (W,) norm weight, model dtype (read if DO_NORM)
    out_ptr,  # (T, W) model dtype
    W,
    eps,
    stride_xt,
    stride_xk,
    stride_rt,
    stride_ot,
    NUM_PARTS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    DO_NORM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Semantics (dt = out's dtype, every rounding point of the torch twin kept):
        v = x[t]                                  (NUM_PARTS == 0)
        v = dt(sum_k x[t, k])  (fp32 sum, k = 0..K-1 in order: the MoE combine)
        if HAS_RESIDUAL: v = dt(res[t] + v); res[t] = v
        out[t] = dt(w * dt(v * rsqrt(mean(v^2) + eps)))   (DO_NORM; fp32 statistics)
        out[t] = v                                (not DO_NORM)
    Grid: (T,); one program holds a whole row (BLOCK >= W).
    """
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < W
    dt = out_ptr.dtype.element_ty
    if NUM_PARTS == 0:
        v = tl.load(x_ptr + t * stride_xt + offs, mask=m, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK,), tl.float32)
        for k in tl.static_range(NUM_PARTS):
            acc += tl.load(x_ptr + t * stride_xt + k * stride_xk + offs, mask=m, other=0.0)
        v = acc.to(dt).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + t * stride_rt + offs, mask=m, other=0.0).to(tl.float32)
        v = (r + v).to(dt).to(tl.float32)
        tl.store(res_ptr + t * stride_rt + offs, v.to(dt), mask=m)
    if DO_NORM:
        var = tl.sum(v * v, axis=0) / W
        n = (v * tl.rsqrt(var + eps)).to(dt).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        v = w * n
    tl.store(out_ptr + t * stride_ot + offs, v.to(dt), mask=m)
