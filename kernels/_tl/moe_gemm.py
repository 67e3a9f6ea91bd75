"""Grouped expert GEMM over block-aligned routed pairs (Triton).

Legend: N routed pairs, M input rows (T tokens or N pairs), E experts,
IN reduction dim, OUT output columns, BM/BN/BK tile sizes.
"""

import triton
import triton.language as tl


@triton.jit
def moe_gemm_kernel(
    x_ptr,  # (M, IN) activations; row of pair p = p // X_ROW_DIV
    w_ptr,  # (E, W_ROWS, IN) expert weights, IN contiguous (K-major)
    out_ptr,  # (N, OUT) indexed by pair id
    rw_ptr,  # (N,) fp32 routing weights (read only if MUL_ROUTED)
    sorted_ids_ptr,  # (L,) int32, sentinel = num_pairs
    block_expert_ptr,  # (L // BM,) int32
    num_blocks_ptr,  # (1,) int32
    num_pairs,
    OUT,
    IN,
    up_offset,  # FUSE_ACT: up rows start at w row up_offset (= I)
    stride_xm,
    stride_we,
    stride_wn,
    stride_om,
    X_ROW_DIV: tl.constexpr,
    FUSE_ACT: tl.constexpr,
    MUL_ROUTED: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: bf16 dot is broken there
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Semantics: out[p] = x[row(p)] @ W[e].T            (plain)
                  out[p] = silu(x@Wg[e].T) * (x@Wu[e].T)  (FUSE_ACT, Wg = W[e, :OUT], Wu = W[e, up_offset:])
                  out[p] *= rw[p]                        (MUL_ROUTED)
    for every pair p of the block's expert e. Grid: (L // BM, cdiv(OUT, BN)).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m >= tl.load(num_blocks_ptr):
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_ok = pair < num_pairs
    xrow = (pair // X_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < OUT
    offs_k = tl.arange(0, BK)
    x_ptrs = x_ptr + xrow[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if FUSE_ACT:
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    for kk in range(0, tl.cdiv(IN, BK)):
        k_ok = offs_k < IN - kk * BK
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if FUSE_ACT:
            wu = tl.load(w_ptrs + up_offset * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                wu = wu.to(tl.float32)
            acc_up = tl.dot(a, wu, acc_up, input_precision=PRECISION)
        x_ptrs += BK
        w_ptrs += BK
    if FUSE_ACT:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_ROUTED:
        rw = tl.load(rw_ptr + pair, mask=row_ok, other=0.0)
        acc = acc * rw[:, None]
    o_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])
