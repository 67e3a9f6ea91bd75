"""One MoE layer at OLMoE-1B-7B shapes: torch grouped_mm vs our fused MoE, with rank-exact
and padded multi-adapter LoRA; the routing alignment alone (one launch vs its torch twin);
prefill attention over the paged cache (one varlen launch vs torch SDPA per chunk); and decode
attention (GQA-grouped, split-KV as the heuristic picks vs unsplit vs the ungrouped reads of the
previous per-query-head kernel); the sampler's grammar-mask kernel vs its torch ops.

    python benchmarks/kernel_bench.py --out results.json [--large] [--peak-gbs 3350]

Legend: T tokens, K top-k, E experts, S adapter slots, H hidden, I intermediate.
Needs CUDA (refuses otherwise). Times are medians of triton.testing.do_bench (CUDA events,
warmup + repetitions, L2 flushed between runs). Effective bandwidth counts the bytes of
expert weights touched (experts with >= 1 token) and LoRA rows read (rank-exact: real
ranks; padded: Rmax) once.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, uninstalled

from kernels import MoeLoraLayer, fused_moe, moe_lora_align, pad_moe_lora, paged_decode_attention, paged_prefill_attention  # noqa: E402
from kernels import moe_align as kernels_moe_align  # noqa: E402
from kernels.moe_align import moe_align_torch, moe_lora_align_torch  # noqa: E402
from kernels.paged_attention import decode_split_count, paged_prefill_attention_torch  # noqa: E402
from kernels.token_bitmask import apply_token_bitmask_, apply_token_bitmask_torch_  # noqa: E402

H, I, E, K, S = 2048, 1024, 64, 8, 16
DT = torch.bfloat16
RMIN, RMAX, RPAD = 8, 32, 32


def dr_lora_ranks(gen: torch.Generator) -> torch.Tensor:
    """(S, E) ranks in [8, 32], mean ~16, skewed low: 8 + round(24 * Beta(1, 2))."""
    u = torch.rand(S, E, generator=gen)
    beta12 = 1 - torch.sqrt(1 - u)  # inverse CDF of Beta(1, 2)
    return (RMIN + torch.round((RMAX - RMIN) * beta12)).to(torch.int32)


def build_lora(gen: torch.Generator, dev) -> MoeLoraLayer:
    ranks = dr_lora_ranks(gen)
    offsets = (torch.cumsum(ranks.flatten(), 0) - ranks.flatten()).view(S, E).to(torch.int32)
    rows = int(ranks.sum())
    layer = MoeLoraLayer(scales=torch.full((S,), 2.0), max_rank=int(ranks.max()))
    for p, (din, dout) in {"gate": (H, I), "up": (H, I), "down": (I, H)}.items():
        layer.a[p] = (torch.randn(rows, din, generator=gen) * 0.02).to(DT)
        layer.b[p] = (torch.randn(rows, dout, generator=gen) * 0.02).to(DT)
        layer.offsets[p], layer.ranks[p] = offsets.clone(), ranks.clone()
    return MoeLoraLayer(
        {k: v.to(dev) for k, v in layer.a.items()}, {k: v.to(dev) for k, v in layer.b.items()},
        {k: v.to(dev) for k, v in layer.offsets.items()}, {k: v.to(dev) for k, v in layer.ranks.items()},
        layer.scales.to(dev), layer.max_rank,
    )


def grouped_mm_moe(hidden, w_gu_t, w_dn_t, topk_w, topk_ids):
    """Baseline: sort pairs by expert, torch grouped_mm (K-major weights viewed (E, in, out))."""
    t = hidden.shape[0]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=hidden.device).scatter_add_(0, flat.long(), torch.ones_like(flat))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    x = hidden[order // K]
    gu = F.grouped_mm(x, w_gu_t, offs=offs)
    h = F.silu(gu[:, :I]) * gu[:, I:]
    y = F.grouped_mm(h, w_dn_t, offs=offs)
    out = torch.empty_like(y)
    out[order] = y
    return (out.view(t, K, H).float() * topk_w.unsqueeze(-1)).sum(1).to(hidden.dtype)


def bench(fn) -> float:
    if SMOKE:
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=200, return_mode="median") * 1e3  # us


SMOKE = False


def prefill_attention_rows(gen: torch.Generator, dev) -> list[dict]:
    """OLMoE attention shapes (16 heads x 128, block 16): chunks of a prefill step, fresh or
    behind a cached prefix; one varlen launch vs SDPA per chunk (the torch twin)."""
    qh, d, bs = (4, 32, 16) if SMOKE else (16, 128, 16)
    cases = [(1, 2048, 0), (8, 256, 0), (64, 32, 0), (8, 128, 512)]  # chunks, length, cached prefix
    out = []
    for c, n, prefix in cases:
        if SMOKE:
            c, n, prefix = min(c, 4), min(n, 32), min(prefix, 32)
        per = -(-(prefix + n) // bs)
        nb = c * per
        kc = torch.randn(nb, bs, qh, d, generator=gen).to(DT).to(dev)
        vc = torch.randn(nb, bs, qh, d, generator=gen).to(DT).to(dev)
        tables = torch.randperm(nb, generator=gen).view(c, per).to(torch.int32).to(dev)
        q = torch.randn(c * n, qh, d, generator=gen).to(DT).to(dev)
        cu = torch.arange(0, c * n + 1, n, dtype=torch.int32).to(dev)
        ctx = torch.full((c,), prefix + n, dtype=torch.int32).to(dev)
        o = torch.empty_like(q)
        row = {"label": f"{c} x {n} ({prefix})", "chunks": c, "length": n, "prefix": prefix}
        row["varlen_us"] = bench(lambda: paged_prefill_attention(q, kc, vc, tables, cu, ctx, n, d**-0.5, out=o))
        row["sdpa_loop_us"] = bench(lambda: paged_prefill_attention_torch(q, kc, vc, tables, cu, ctx, n, d**-0.5, o))
        out.append(row)
    return out


def decode_attention_rows(gen: torch.Generator, dev) -> list[dict]:
    """Decode attention over the paged cache (block 16, head dim 128), OLMoE (16 q / 16 kv heads)
    and Qwen3-30B-A3B (32 q / 4 kv heads), batch 1 / 64, context 512 / 4096: the split count the
    heuristic picks (`split_us`), forced unsplit (`unsplit_us`, S = 1) and, for GQA, the previous
    kernel's K/V reads (`ungrouped_us`: caches repeated to one kv head per query head, S = 1;
    for OLMoE `unsplit_us` is the previous kernel)."""
    d, bs = (32, 16) if SMOKE else (128, 16)
    out = []
    for model, qh, kvh in (("olmoe", 16, 16), ("qwen3-30b-a3b", 32, 4)):
        for b, ctx in ((1, 512), (1, 4096), (64, 512), (64, 4096)):
            if SMOKE:
                qh, kvh, b, ctx = min(qh, 4), min(kvh, 2), min(b, 2), min(ctx, 64)
            per = -(-ctx // bs)
            kc = torch.randn(b * per, bs, kvh, d, generator=gen).to(DT).to(dev)
            vc = torch.randn(b * per, bs, kvh, d, generator=gen).to(DT).to(dev)
            tables = torch.randperm(b * per, generator=gen).view(b, per).to(torch.int32).to(dev)
            q = torch.randn(b, qh, d, generator=gen).to(DT).to(dev)
            lens = torch.full((b,), ctx, dtype=torch.int32).to(dev)
            o = torch.empty_like(q)
            row = {"model": model, "batch": b, "context": ctx, "splits": decode_split_count(b, kvh, per, q.device)}
            row["split_us"] = bench(lambda: paged_decode_attention(q, kc, vc, tables, lens, d**-0.5, out=o))
            split = o.clone()
            row["unsplit_us"] = bench(lambda: paged_decode_attention(q, kc, vc, tables, lens, d**-0.5, out=o,
                                                                     num_splits=1))
            row["max_abs_diff_split_vs_unsplit"] = float((split.float() - o.float()).abs().max())
            if qh != kvh:
                kf, vf = kc.repeat_interleave(qh // kvh, 2), vc.repeat_interleave(qh // kvh, 2)
                row["ungrouped_us"] = bench(lambda: paged_decode_attention(q, kf, vf, tables, lens, d**-0.5, out=o,
                                                                           num_splits=1))
                del kf, vf
            out.append(row)
    return out


def token_bitmask_rows(gen: torch.Generator, dev) -> list[dict]:
    """The sampler's grammar masks (structured outputs) on fp32 logits at OLMoE's vocabulary,
    half the rows constrained: one Triton launch vs the torch ops it replaced (byte-table
    gather, pad, index_add_: the twin's path off the CPU)."""
    V = 256 if SMOKE else 50304
    W = -(-V // 32)
    out = []
    for n in ((4,) if SMOKE else (64, 256)):
        nc = n // 2
        logits = torch.randn(n, V, generator=gen).to(dev)
        rows = torch.randperm(n, generator=gen)[:nc].to(dev)
        mask = torch.randint(-2**31, 2**31 - 1, (nc, W), generator=gen, dtype=torch.int32).to(dev)
        row = {"rows": n, "constrained": nc, "vocab": V}
        row["kernel_us"] = bench(lambda: apply_token_bitmask_(logits, rows, mask))
        row["torch_us"] = bench(lambda: apply_token_bitmask_torch_(logits, rows, mask))
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results.json")
    ap.add_argument("--large", action="store_true", help="also 1024 and 4096 tokens")
    ap.add_argument("--peak-gbs", type=float, default=None, help="HBM peak for the %% column (default by GPU name)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (torch twins): checks the script only")
    args = ap.parse_args()
    global SMOKE, H, I, E
    if args.smoke:
        SMOKE, H, I, E = True, 64, 32, 8
    elif not torch.cuda.is_available():
        print("benchmarks/kernel_bench.py: no CUDA device, refusing to run (kernel timings need a GPU).")
        sys.exit(2)
    dev = torch.device("cpu" if SMOKE else "cuda")
    name = "cpu-smoke" if SMOKE else torch.cuda.get_device_name(dev)
    peak = args.peak_gbs or (4800.0 if "H200" in name else 3350.0 if "H100" in name else float("nan"))
    gen = torch.Generator().manual_seed(args.seed)
    w_gu = (torch.randn(E, 2 * I, H, generator=gen) * H**-0.5).to(DT).to(dev)  # (E, 2I, H) K-major
    w_dn = (torch.randn(E, H, I, generator=gen) * I**-0.5).to(DT).to(dev)  # (E, H, I)
    lora = build_lora(gen, dev)
    padded = pad_moe_lora(lora, RPAD)
    has_gmm = hasattr(F, "grouped_mm")
    tokens = [1, 16, 64, 256] + ([1024, 4096] if args.large else [])
    rows = []
    for t in tokens:
        hidden = torch.randn(t, H, generator=gen).to(DT).to(dev)
        tw, ti = torch.softmax(torch.randn(t, E, generator=gen), -1).topk(K, -1)
        tw, ti = tw.to(dev), ti.to(torch.int32).to(dev)
        slots = torch.randint(0, S, (t,), generator=gen, dtype=torch.int32).to(dev)
        used = torch.unique(ti.reshape(-1).cpu())
        w_bytes = used.numel() * (3 * I * H) * 2
        pairs = torch.unique(slots.cpu().long().repeat_interleave(K) * E + ti.reshape(-1).cpu().long())
        r = lora.ranks["gate"].cpu().flatten()[pairs].long()
        lora_bytes = int(r.sum()) * 3 * (H + I) * 2
        pad_bytes = pairs.numel() * RPAD * 3 * (H + I) * 2
        row = {"tokens": t, "experts_used": used.numel(), "weight_bytes": w_bytes,
               "lora_bytes_exact": lora_bytes, "lora_bytes_padded": pad_bytes}
        ours = fused_moe(hidden, w_gu, w_dn, tw, ti)
        if has_gmm:
            try:
                w_gu_t, w_dn_t = w_gu.transpose(1, 2), w_dn.transpose(1, 2)  # views, K-major
                ref = grouped_mm_moe(hidden, w_gu_t, w_dn_t, tw, ti)
                row["max_abs_err_vs_grouped_mm"] = float((ours.float() - ref.float()).abs().max())
                row["grouped_mm_us"] = bench(lambda: grouped_mm_moe(hidden, w_gu_t, w_dn_t, tw, ti))
            except Exception as exc:  # noqa: BLE001
                row["grouped_mm_error"] = f"{type(exc).__name__}: {exc}"[:200]
        row["fused_us"] = bench(lambda: fused_moe(hidden, w_gu, w_dn, tw, ti))
        row["fused_lora_exact_us"] = bench(lambda: fused_moe(hidden, w_gu, w_dn, tw, ti, lora=lora, slot_ids=slots))
        row["fused_lora_padded_us"] = bench(lambda: fused_moe(hidden, w_gu, w_dn, tw, ti, lora=padded, slot_ids=slots))
        base, ex, pd = row["fused_us"], row["fused_lora_exact_us"], row["fused_lora_padded_us"]
        row["weight_gbs"] = w_bytes / base / 1e3
        row["weight_pct_peak"] = 100 * row["weight_gbs"] / peak
        row["lora_exact_gbs"] = lora_bytes / max(ex - base, 1e-3) / 1e3
        row["lora_overhead_pct"] = 100 * (ex - base) / base
        row["padded_overhead_pct"] = 100 * (pd - base) / base
        row["exact_vs_padded_lora_part"] = (pd - base) / max(ex - base, 1e-3)
        row["exact_vs_padded_layer"] = pd / ex
        if "grouped_mm_us" in row:
            row["fused_vs_grouped_mm"] = row["grouped_mm_us"] / base
        row["align_us"] = bench(lambda: (kernels_moe_align(ti, E, 16), moe_lora_align(ti, slots, E, S, 16)))
        row["align_twin_us"] = bench(lambda: (moe_align_torch(ti, E, 16), moe_lora_align_torch(ti, slots, E, S, 16)))
        rows.append(row)
    attn = prefill_attention_rows(gen, dev)
    dec = decode_attention_rows(gen, dev)
    masks = token_bitmask_rows(gen, dev)
    hdr = f"{'T':>5} {'gmm us':>8} {'fused us':>9} {'+exact':>8} {'+padded':>8} {'W GB/s':>7} {'%peak':>6} {'ovh%':>6} {'pad/ex(lora)':>12} {'pad/ex(layer)':>13}"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    print(f"{name}  torch {torch.__version__}  triton {triton_version}  E={E} K={K} H={H} I={I} S={S} {DT}")
    print(hdr)
    for r in rows:
        g = f"{r['grouped_mm_us']:8.1f}" if "grouped_mm_us" in r else f"{'n/a':>8}"
        print(f"{r['tokens']:>5} {g} {r['fused_us']:9.1f} {r['fused_lora_exact_us']:8.1f} {r['fused_lora_padded_us']:8.1f} "
              f"{r['weight_gbs']:7.0f} {r['weight_pct_peak']:6.1f} {r['lora_overhead_pct']:6.1f} "
              f"{r['exact_vs_padded_lora_part']:12.2f} {r['exact_vs_padded_layer']:13.2f}")
    print(f"{'T':>5} {'align us':>9} {'twin us':>8}")
    for r in rows:
        print(f"{r['tokens']:>5} {r['align_us']:9.1f} {r['align_twin_us']:8.1f}")
    print(f"{'chunks x len (prefix)':>22} {'varlen us':>10} {'sdpa loop us':>13}")
    for a in attn:
        print(f"{a['label']:>22} {a['varlen_us']:10.1f} {a['sdpa_loop_us']:13.1f}")
    print(f"{'decode attention':>22} {'B':>3} {'ctx':>5} {'S':>3} {'split us':>9} {'unsplit us':>10} {'ungrouped us':>12}")
    for a in dec:
        ug = f"{a['ungrouped_us']:12.1f}" if "ungrouped_us" in a else f"{'-':>12}"
        print(f"{a['model']:>22} {a['batch']:>3} {a['context']:>5} {a['splits']:>3} {a['split_us']:9.1f} "
              f"{a['unsplit_us']:10.1f} {ug}")
    print(f"{'grammar masks: rows':>22} {'Nc':>4} {'kernel us':>10} {'torch us':>9}")
    for a in masks:
        print(f"{a['rows']:>22} {a['constrained']:>4} {a['kernel_us']:10.1f} {a['torch_us']:9.1f}")
    env = {"gpu": name, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
           "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "peak_gbs": peak, "seed": args.seed, "grouped_mm": has_gmm}
    shapes = {"H": H, "I": I, "E": E, "K": K, "S": S, "dtype": str(DT), "rank_min": RMIN, "rank_max": RMAX,
              "rank_mean": float(lora.ranks["gate"].float().mean()), "padded_rank": RPAD}
    with open(args.out, "w") as f:
        json.dump({"env": env, "shapes": shapes, "rows": rows, "prefill_attention": attn,
                   "decode_attention": dec, "token_bitmask": masks}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
