"""Grammar token masks applied to the logits in place (Triton).

Legend: Nc constrained rows, V vocab, W32 = ceil(V / 32) mask words.
"""

import triton
import triton.language as tl


@triton.jit
def token_bitmask_kernel(
    logits_ptr,  # (N, V) fp32 / fp16 / bf16, updated in place
    rows_ptr,  # (Nc,) int32 / int64, distinct
    mask_ptr,  # (Nc, W32) int32, contiguous
    V,
    W32,
    stride_l,
    BLOCK: tl.constexpr,
):
    """Semantics:
        logits[rows[i], t] = -inf  unless t < 32 * W32 and bit t % 32 of mask[i, t // 32] is set
    for t < V; nothing else is written.
    Grid: (Nc, cdiv(V, BLOCK)); a program covers BLOCK tokens of one row.
    """
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + i).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = offs < V
    word = tl.load(mask_ptr + i * W32 + offs // 32, mask=in_vocab & (offs < W32 * 32), other=0)
    allowed = ((word >> (offs % 32)) & 1) != 0
    neg_inf = tl.full((BLOCK,), float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * stride_l + offs, neg_inf, mask=in_vocab & ~allowed)
