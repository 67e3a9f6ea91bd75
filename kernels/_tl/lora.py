"""Rank-exact LoRA shrink / expand over aligned routed pairs (Triton).

Legend: N routed pairs, M input rows, T tokens, K top-k, S slots, E experts, R pool rank rows,
RM rank bound (buffer width), IN/OUT dims, BM/BR/BK/BN tile sizes, NP projections per launch.

A row's adapter slot is slot_ids[pair // TOPK] (-1: base model, no LoRA). A block holds one
expert's rows; they may belong to several slots (the slot-sorted by-expert alignment) or to one
(the (expert, slot) alignment): the kernels walk the block's distinct slots in ascending order,
and for slot s use (o, r) = (offsets, ranks)[s, e], touching only ceil(r / BR) rank tiles
(masked to r): the cost follows the real ranks. `lora_delta` is also the epilogue of the
grouped expert GEMM (kernels/_tl/moe_gemm.py), where the expand is fused.
"""

import triton
import triton.language as tl

NO_SLOT = tl.constexpr(1 << 30)


@triton.jit
def row_slots(slot_ids_ptr, pair, row_ok, TOPK: tl.constexpr):
    """(BM,) slot of each row; NO_SLOT for padding rows and base-model rows."""
    s = tl.load(slot_ids_ptr + pair // TOPK, mask=row_ok, other=-1)
    return tl.where(s >= 0, s, NO_SLOT)


@triton.jit
def next_slot(slots, cur):
    """Smallest slot of the block above cur (NO_SLOT when none is left)."""
    return tl.min(tl.where(slots > cur, slots, NO_SLOT), axis=0)


@triton.jit
def lora_delta(acc, u_ptr, b_ptr, offsets_ptr, ranks_ptr, scales_ptr, slots, e, num_experts, prow, offs_n, n_ok,
               stride_um, stride_br, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, BR: tl.constexpr):
    """acc (BM, BN) + sum over the block's slots s of scale[s] * u[rows of s, :r] @ b[o:o+r, offs_n]
    with (o, r) of (s, e); u (fp32) is rounded to b's dtype before the product. Rows of other
    slots read zeros from u, so each slot's product only adds to its own rows."""
    offs_r = tl.arange(0, BR)
    s = tl.min(slots, axis=0)
    while s < NO_SLOT:
        r = tl.load(ranks_ptr + s * num_experts + e)
        if r > 0:
            o = tl.load(offsets_ptr + s * num_experts + e).to(tl.int64)
            rows = slots == s
            delta = tl.zeros((BM, BN), dtype=tl.float32)
            for j in range(0, tl.cdiv(r, BR)):
                rr = j * BR + offs_r
                r_ok = rr < r
                u = tl.load(u_ptr + prow[:, None] * stride_um + rr[None, :], mask=rows[:, None] & r_ok[None, :],
                            other=0.0)
                b = tl.load(b_ptr + (o + rr)[:, None] * stride_br + offs_n[None, :], mask=r_ok[:, None] & n_ok[None, :],
                            other=0.0)
                u = u.to(b.dtype)
                if UPCAST:
                    u = u.to(tl.float32)
                    b = b.to(tl.float32)
                delta = tl.dot(u, b, delta, input_precision=PRECISION)
            acc += delta * tl.load(scales_ptr + s)
        s = next_slot(slots, s)
    return acc


# num_pairs follows the step's token count (a row mask only): not specialised, no recompile per batch
@triton.jit(do_not_specialize=["num_pairs"])
def lora_shrink_kernel(
    x_ptr,  # (M, IN); row of pair p = p // X_ROW_DIV
    a0_ptr,  # (R, IN) pool of A rows of projection 0, IN contiguous
    a1_ptr,  # projection 1's pool (NP >= 2; else any)
    a2_ptr,  # projection 2's pool (NP == 3; else any)
    u_ptr,  # (N, NP * u_pcol) fp32: projection q in columns [q * u_pcol, q * u_pcol + r)
    sorted_ids_ptr,
    block_expert_ptr,
    num_blocks_ptr,
    slot_ids_ptr,  # (T,) int32, -1 = base model
    off0_ptr,  # (S, E) int32 contiguous tables of projection 0
    rk0_ptr,
    off1_ptr,
    rk1_ptr,
    off2_ptr,
    rk2_ptr,
    num_pairs,
    num_experts,
    IN,
    u_pcol,
    stride_xm,
    stride_a0,
    stride_a1,
    stride_a2,
    stride_um,
    X_ROW_DIV: tl.constexpr,
    TOPK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: bf16 dot is broken there
    BM: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
):
    """Semantics: u[p, q*u_pcol : q*u_pcol + r] = x[row(p)] @ a_q[o:o+r].T for every pair p with
    a slot s >= 0, (o, r) of (s, e) in projection q's tables; other entries are not written.
    Projections reading the same x (gate and up; q, k and v) share one launch.
    Grid: (L // BM, cdiv(RM, BR), NP); rank tiles >= r do nothing.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    q = tl.program_id(2)
    if pid_m >= tl.load(num_blocks_ptr):
        return
    if q == 0:
        a_ptr, offsets_ptr, ranks_ptr, stride_ar = a0_ptr, off0_ptr, rk0_ptr, stride_a0
    elif q == 1:
        a_ptr, offsets_ptr, ranks_ptr, stride_ar = a1_ptr, off1_ptr, rk1_ptr, stride_a1
    else:
        a_ptr, offsets_ptr, ranks_ptr, stride_ar = a2_ptr, off2_ptr, rk2_ptr, stride_a2
    u_ptr += q * u_pcol
    e = tl.load(block_expert_ptr + pid_m)
    offs_m = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_ok = pair < num_pairs
    slots = row_slots(slot_ids_ptr, pair, row_ok, TOPK)
    xrow = (pair // X_ROW_DIV).to(tl.int64)
    offs_r = pid_r * BR + tl.arange(0, BR)
    offs_k = tl.arange(0, BK)
    s = tl.min(slots, axis=0)
    while s < NO_SLOT:
        r = tl.load(ranks_ptr + s * num_experts + e)
        if pid_r * BR < r:
            o = tl.load(offsets_ptr + s * num_experts + e).to(tl.int64)
            rows = slots == s
            r_ok = offs_r < r
            x_ptrs = x_ptr + xrow[:, None] * stride_xm + offs_k[None, :]
            a_ptrs = a_ptr + (o + offs_r)[None, :] * stride_ar + offs_k[:, None]
            acc = tl.zeros((BM, BR), dtype=tl.float32)
            for kk in range(0, tl.cdiv(IN, BK)):
                k_ok = offs_k < IN - kk * BK
                x = tl.load(x_ptrs, mask=rows[:, None] & k_ok[None, :], other=0.0)
                a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                if UPCAST:
                    x = x.to(tl.float32)
                    a = a.to(tl.float32)
                acc = tl.dot(x, a, acc, input_precision=PRECISION)
                x_ptrs += BK
                a_ptrs += BK
            u_ptrs = u_ptr + pair.to(tl.int64)[:, None] * stride_um + offs_r[None, :]
            tl.store(u_ptrs, acc, mask=rows[:, None] & r_ok[None, :])
        s = next_slot(slots, s)


@triton.jit(do_not_specialize=["num_pairs"])  # as lora_shrink_kernel
def lora_expand_kernel(
    u_ptr,  # (N, NP * u_pcol) fp32; projection q reads columns from q * u_pcol
    b0_ptr,  # (R, OUT0) pool of B^T rows of projection 0, contiguous columns
    b1_ptr,
    b2_ptr,
    y_ptr,  # (N, *) output, updated in place: projection q at columns [y_col_q, y_col_q + OUT_q)
    scales_ptr,  # (S,) fp32
    sorted_ids_ptr,
    block_expert_ptr,
    num_blocks_ptr,
    slot_ids_ptr,  # (T,) int32, -1 = base model
    off0_ptr,
    rk0_ptr,
    off1_ptr,
    rk1_ptr,
    off2_ptr,
    rk2_ptr,
    num_pairs,
    num_experts,
    out0,
    out1,
    out2,
    y_col0,
    y_col1,
    y_col2,
    u_pcol,
    stride_um,
    stride_b0,
    stride_b1,
    stride_b2,
    stride_ym,
    TOPK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: bf16 dot is broken there
    BM: tl.constexpr,
    BN: tl.constexpr,
    BR: tl.constexpr,
):
    """Semantics: y[p, c:c+OUT_q] += scale[s] * u[p, uc:uc+r] @ b_q[o:o+r] for every pair p with a
    slot s >= 0, c = y_col_q, uc = q * u_pcol, (o, r) of (s, e) in projection q's tables (fp32
    sum, rounded to y's dtype). Grid: (L // BM, cdiv(max OUT_q, BN), NP).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    q = tl.program_id(2)
    if pid_m >= tl.load(num_blocks_ptr):
        return
    if q == 0:
        b_ptr, offsets_ptr, ranks_ptr, stride_br, out_dim, y_col = b0_ptr, off0_ptr, rk0_ptr, stride_b0, out0, y_col0
    elif q == 1:
        b_ptr, offsets_ptr, ranks_ptr, stride_br, out_dim, y_col = b1_ptr, off1_ptr, rk1_ptr, stride_b1, out1, y_col1
    else:
        b_ptr, offsets_ptr, ranks_ptr, stride_br, out_dim, y_col = b2_ptr, off2_ptr, rk2_ptr, stride_b2, out2, y_col2
    if pid_n * BN >= out_dim:
        return
    u_ptr += q * u_pcol
    e = tl.load(block_expert_ptr + pid_m)
    offs_m = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_ok = pair < num_pairs
    slots = row_slots(slot_ids_ptr, pair, row_ok, TOPK)
    prow = pair.to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < out_dim
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = lora_delta(acc, u_ptr, b_ptr, offsets_ptr, ranks_ptr, scales_ptr, slots, e, num_experts, prow, offs_n,
                     n_ok, stride_um, stride_br, PRECISION, UPCAST, BM, BN, BR)
    y_ptrs = y_ptr + prow[:, None] * stride_ym + y_col + offs_n[None, :]
    mask = (slots < NO_SLOT)[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)
