"""Grouped expert GEMM over block-aligned routed pairs, with the LoRA expand, SiLU-and-multiply
and the routing weight fused into its epilogue (Triton).

Legend: N routed pairs, M input rows (T tokens or N pairs), T tokens, E experts, S slots,
IN reduction dim, OUT output columns, RM LoRA rank bound, BM/BN/BK/BR tile sizes.
"""

import triton
import triton.language as tl

from kernels._tl.lora import lora_delta, row_slots


# num_pairs follows the step's token count (a row mask and the sentinel only): not specialised
# (==1, %16), so a new batch size does not recompile; dims and strides stay specialised
@triton.jit(do_not_specialize=["num_pairs"])
def moe_gemm_kernel(
    x_ptr,  # (M, IN) activations; row of pair p = p // X_ROW_DIV
    w_ptr,  # (E, W_ROWS, IN) expert weights, IN contiguous (K-major)
    out_ptr,  # (N, OUT) indexed by pair id
    rw_ptr,  # (N,) fp32 routing weights (read only if MUL_ROUTED)
    sorted_ids_ptr,  # (L,) int32, sentinel = num_pairs
    block_expert_ptr,  # (L // BM,) int32
    num_blocks_ptr,  # (1,) int32
    slot_ids_ptr,  # (T,) int32 adapter slot per token, -1 = base (LORA_0 or LORA_1)
    scales_ptr,  # (S,) fp32
    u0_ptr,  # (N, >= RM) fp32 shrink output of projection 0 (LORA_0)
    b0_ptr,  # (R, OUT) B^T rows of projection 0
    off0_ptr,  # (S, E) int32
    rk0_ptr,  # (S, E) int32
    u1_ptr,  # projection 1 (LORA_1: the up projection of FUSE_ACT), same row stride as u0
    b1_ptr,
    off1_ptr,
    rk1_ptr,
    num_pairs,
    OUT,
    IN,
    up_offset,  # FUSE_ACT: up rows start at w row up_offset (= I)
    num_experts,
    stride_xm,
    stride_we,
    stride_wn,
    stride_om,
    stride_um,
    stride_b0,
    stride_b1,
    X_ROW_DIV: tl.constexpr,
    TOPK: tl.constexpr,  # pairs per token: the slot of pair p is slot_ids[p // TOPK]
    FUSE_ACT: tl.constexpr,
    MUL_ROUTED: tl.constexpr,
    LORA_0: tl.constexpr,
    LORA_1: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: bf16 dot is broken there
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BR: tl.constexpr,
):
    """Semantics, for every pair p of the block's expert e (s = the pair's slot, (o_q, r_q) of
    (s, e) in projection q's LoRA tables; fp32 accumulation):
        a = x[row(p)] @ W[e, :OUT].T        (+ scale[s] * u0[p, :r_0] @ b0[o_0:o_0+r_0]   if LORA_0)
        FUSE_ACT: g = a, up = x[row(p)] @ W[e, up_offset:up_offset+OUT].T
                                           (+ scale[s] * u1[p, :r_1] @ b1[o_1:o_1+r_1]   if LORA_1)
                  a = silu(g) * up
        a *= rw[p]                                                                  (MUL_ROUTED)
        out[p] = a, rounded to out's dtype
    Pairs without a slot (s = -1) or with rank 0 get no LoRA term. Grid: (L // BM, cdiv(OUT, BN)).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m >= tl.load(num_blocks_ptr):
        return
    e = tl.load(block_expert_ptr + pid_m)
    offs_m = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_ok = pair < num_pairs
    xrow = (pair // X_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < OUT
    offs_k = tl.arange(0, BK)
    x_ptrs = x_ptr + xrow[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
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
    prow = pair.to(tl.int64)
    if LORA_0 or LORA_1:
        slots = row_slots(slot_ids_ptr, pair, row_ok, TOPK)
    if LORA_0:
        acc = lora_delta(acc, u0_ptr, b0_ptr, off0_ptr, rk0_ptr, scales_ptr, slots, e, num_experts, prow, offs_n,
                         n_ok, stride_um, stride_b0, PRECISION, UPCAST, BM, BN, BR)
    if FUSE_ACT:
        if LORA_1:
            acc_up = lora_delta(acc_up, u1_ptr, b1_ptr, off1_ptr, rk1_ptr, scales_ptr, slots, e, num_experts, prow,
                                offs_n, n_ok, stride_um, stride_b1, PRECISION, UPCAST, BM, BN, BR)
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_ROUTED:
        rw = tl.load(rw_ptr + pair, mask=row_ok, other=0.0)
        acc = acc * rw[:, None]
    o_ptrs = out_ptr + prow[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])
