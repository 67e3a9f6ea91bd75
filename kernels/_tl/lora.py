"""Rank-exact LoRA shrink / expand over (expert, slot)-aligned pairs (Triton).

Legend: N routed pairs, M input rows, S slots, E experts, R pool rank rows,
RM rank bound (buffer width), IN/OUT dims, BM/BR/BK/BN tile sizes.
Every block belongs to one (e, s) group; its rank r and pool offset o come from the
(S, E) tables, and only ceil(r / BR) rank tiles are computed (masked to r).
"""

import triton
import triton.language as tl


@triton.jit
def lora_shrink_kernel(
    x_ptr,  # (M, IN); row of pair p = p // X_ROW_DIV
    a0_ptr,  # (R, IN) pool of A rows of projection 0, IN contiguous
    a1_ptr,  # (R, IN) pool of projection 1 (NUM_P == 2; else = a0_ptr)
    u_ptr,  # (N, NUM_P * RM) fp32: projection q in columns [q * u_pcol, q * u_pcol + r)
    sorted_ids_ptr,
    block_expert_ptr,
    block_slot_ptr,
    num_blocks_ptr,
    off0_ptr,  # (S, E) int32 contiguous, projection 0
    rk0_ptr,  # (S, E) int32 contiguous, projection 0
    off1_ptr,  # projection 1 tables (NUM_P == 2; else = projection 0's)
    rk1_ptr,
    num_pairs,
    num_experts,
    IN,
    u_pcol,
    stride_xm,
    stride_ar,
    stride_um,
    X_ROW_DIV: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: bf16 dot is broken there
    BM: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
):
    """Semantics: u[p, q*u_pcol : q*u_pcol + r] = x[row(p)] @ a_q[o:o+r].T  with (o, r) of the
    block's (s, e) in projection q's tables. Two projections that read the same x (gate and
    up) share one launch. Grid: (L // BM, cdiv(RM, BR), NUM_P); rank tiles >= r exit at once.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    if pid_m >= tl.load(num_blocks_ptr):
        return
    if tl.program_id(2) == 0:
        a_ptr, offsets_ptr, ranks_ptr = a0_ptr, off0_ptr, rk0_ptr
    else:
        a_ptr, offsets_ptr, ranks_ptr = a1_ptr, off1_ptr, rk1_ptr
    u_ptr += tl.program_id(2) * u_pcol
    e = tl.load(block_expert_ptr + pid_m)
    s = tl.load(block_slot_ptr + pid_m)
    r = tl.load(ranks_ptr + s * num_experts + e)
    if pid_r * BR >= r:
        return
    o = tl.load(offsets_ptr + s * num_experts + e).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_ok = pair < num_pairs
    xrow = (pair // X_ROW_DIV).to(tl.int64)
    offs_r = pid_r * BR + tl.arange(0, BR)
    r_ok = offs_r < r
    offs_k = tl.arange(0, BK)
    x_ptrs = x_ptr + xrow[:, None] * stride_xm + offs_k[None, :]
    a_ptrs = a_ptr + (o + offs_r)[None, :] * stride_ar + offs_k[:, None]
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for kk in range(0, tl.cdiv(IN, BK)):
        k_ok = offs_k < IN - kk * BK
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
        x_ptrs += BK
        a_ptrs += BK
    u_ptrs = u_ptr + pair.to(tl.int64)[:, None] * stride_um + offs_r[None, :]
    tl.store(u_ptrs, acc, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def lora_expand_kernel(
    u_ptr,  # (N, NUM_P * RM) fp32; projection q reads columns from q * u_pcol
    b0_ptr,  # (R, OUT) pool of B^T rows of projection 0, contiguous columns
    b1_ptr,  # projection 1's pool (NUM_P == 2; else = b0_ptr)
    y_ptr,  # (N, *) output, updated in place at columns [y_col + q * y_pcol, ... + OUT)
    scales_ptr,  # (S,) fp32
    rw_ptr,  # (N,) fp32 routing weights (read only if MUL_ROUTED)
    sorted_ids_ptr,
    block_expert_ptr,
    block_slot_ptr,
    num_blocks_ptr,
    off0_ptr,
    rk0_ptr,
    off1_ptr,
    rk1_ptr,
    num_pairs,
    num_experts,
    OUT,
    y_col,
    u_pcol,
    y_pcol,
    stride_um,
    stride_br,
    stride_ym,
    MUL_ROUTED: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: bf16 dot is broken there
    BM: tl.constexpr,
    BN: tl.constexpr,
    BR: tl.constexpr,
):
    """Semantics: y[p, c:c+OUT] += scale[s] * u[p, uc:uc+r] @ b_q[o:o+r]  (* rw[p] if MUL_ROUTED)
    with c = y_col + q * y_pcol, uc = q * u_pcol and (o, r) of the block's (s, e) in projection
    q's tables. Grid: (L // BM, cdiv(OUT, BN), NUM_P); the rank loop runs ceil(r / BR) tiles.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m >= tl.load(num_blocks_ptr):
        return
    if tl.program_id(2) == 0:
        b_ptr, offsets_ptr, ranks_ptr = b0_ptr, off0_ptr, rk0_ptr
    else:
        b_ptr, offsets_ptr, ranks_ptr = b1_ptr, off1_ptr, rk1_ptr
    u_ptr += tl.program_id(2) * u_pcol
    y_col += tl.program_id(2) * y_pcol
    e = tl.load(block_expert_ptr + pid_m)
    s = tl.load(block_slot_ptr + pid_m)
    r = tl.load(ranks_ptr + s * num_experts + e)
    if r == 0:
        return
    o = tl.load(offsets_ptr + s * num_experts + e).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_ok = pair < num_pairs
    prow = pair.to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < OUT
    offs_r = tl.arange(0, BR)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for j in range(0, tl.cdiv(r, BR)):
        rr = j * BR + offs_r
        r_ok = rr < r
        u = tl.load(u_ptr + prow[:, None] * stride_um + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_ptr + (o + rr)[:, None] * stride_br + offs_n[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        u = u.to(b.dtype)
        if UPCAST:
            u = u.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(u, b, acc, input_precision=PRECISION)
    scale = tl.load(scales_ptr + s)
    if MUL_ROUTED:
        acc = acc * tl.load(rw_ptr + pair, mask=row_ok, other=0.0)[:, None]
    y_ptrs = y_ptr + prow[:, None] * stride_ym + y_col + offs_n[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc * scale).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def silu_mul_kernel(
    gu_ptr,  # (N, 2I) fp32: gate in [0, I), up in [I, 2I)
    h_ptr,  # (N, I) out, model dtype
    I,
    stride_gm,
    stride_hm,
    BI: tl.constexpr,
):
    """Semantics: h[p] = silu(gu[p, :I]) * gu[p, I:]  (fp32 math, rounded to h's dtype).
    Grid: (N, cdiv(I, BI))."""
    p = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BI + tl.arange(0, BI)
    m = offs < I
    g = tl.load(gu_ptr + p * stride_gm + offs, mask=m, other=0.0)
    u = tl.load(gu_ptr + p * stride_gm + I + offs, mask=m, other=0.0)
    tl.store(h_ptr + p * stride_hm + offs, (g / (1.0 + tl.exp(-g)) * u).to(h_ptr.dtype.element_ty), mask=m)
