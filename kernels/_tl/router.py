"""Router: softmax, top-k, optional renormalisation and the cast to the model dtype (Triton).

Legend: T tokens, E experts (EP padded), K top-k (KP padded), BT tokens per program.
"""

import triton
import triton.language as tl


# T (tokens) varies per step, a row mask only: not specialised, no recompile per batch size
@triton.jit(do_not_specialize=["T"])
def route_topk_kernel(
    logits_ptr,  # (T, E) model dtype (the router GEMM's output)
    w_ptr,  # (T, K) fp32 out: routing weights, rounded to the model dtype
    ids_ptr,  # (T, K) int32 out: experts, by descending probability
    T,
    E,
    stride_lt,
    K: tl.constexpr,
    KP: tl.constexpr,
    RENORM: tl.constexpr,
    ROUND: tl.constexpr,
    BT: tl.constexpr,
    EP: tl.constexpr,
):
    """Semantics: p = softmax(fp32(logits[t])); (w, ids) = top-k of p, descending (on exact ties
    the lower expert index first); w = w / sum(w) if RENORM; w = fp32(dt(w)) if ROUND, dt = the
    logits' dtype (transformers rounds OLMoE's and Qwen-MoE's routing weights to the model dtype).
    Grid: (cdiv(T, BT),).
    """
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    r_ok = rows < T
    cols = tl.arange(0, EP)
    m = r_ok[:, None] & (cols[None, :] < E)
    x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_lt + cols[None, :], mask=m,
                other=-float("inf")).to(tl.float32)
    x = tl.where(r_ok[:, None], x, 0.0)  # rows past T: no -inf - -inf
    x = x - tl.max(x, axis=1)[:, None]
    num = tl.exp(x)
    p = num / tl.sum(num, axis=1)[:, None]
    p = tl.where(m, p, -1.0)  # probabilities are >= 0: -1 marks padding and taken experts
    kcols = tl.arange(0, KP)[None, :]
    top_w = tl.zeros((BT, KP), tl.float32)
    top_i = tl.zeros((BT, KP), tl.int32)
    for k in tl.static_range(K):
        best = tl.max(p, axis=1)
        idx = tl.min(tl.where(p == best[:, None], cols[None, :], EP), axis=1)
        top_w = tl.where(kcols == k, best[:, None], top_w)
        top_i = tl.where(kcols == k, idx[:, None], top_i)
        p = tl.where(cols[None, :] == idx[:, None], -1.0, p)
    if RENORM:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    if ROUND:
        top_w = top_w.to(logits_ptr.dtype.element_ty).to(tl.float32)
    out = rows.to(tl.int64)[:, None] * K + kcols
    om = r_ok[:, None] & (kcols < K)
    tl.store(w_ptr + out, top_w, mask=om)
    tl.store(ids_ptr + out, top_i, mask=om)
