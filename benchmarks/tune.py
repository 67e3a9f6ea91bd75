"""Tile tuner: sweeps the tile configs of the fused MoE GEMM and the MoE LoRA shrink / expand per
token count on this device, and writes the table that kernels/tiles.py reads.

    python benchmarks/tune.py                                   # OLMoE shapes, bf16, on CUDA
    python benchmarks/tune.py --shape olmoe qwen3-moe --tokens 1 16 256 4096
    python benchmarks/tune.py --tiny --out /tmp/cpu_table.json  # CPU: interpreter, tiny shapes and sweep

Legend: T tokens, K top-k, N = T*K routed pairs, E experts, H hidden, I intermediate, S adapter
slots, RM rank bound, M a table bucket (routed pairs).

Per shape preset (drlora.models.PRESETS) and token count T, each kernel is launched the way
kernels/fused_moe.py launches it, with the alignment's BM (moe_block_m: the GEMMs and the LoRA
kernels share one alignment, so BM is not swept) and every config of the sweep:
  moe_gemm     gate/up (SiLU*up epilogue) keyed (E, I, H) and down (routing weight) keyed (E, H, I):
               BN, BK, num_warps, num_stages;
  lora_shrink  gate+up in one launch keyed (E, 16, H), down keyed (E, 16, I): BK, num_warps, num_stages;
  lora_expand  gate keyed (E, I, 16), down keyed (E, H, 16): BN, num_warps, num_stages.
LoRA inputs: S adapters with DR-LoRA-like ranks (8..32), a quarter of the tokens on the base
model. A config is kept only if its output matches the heuristic's (a launch that fails or
differs is skipped and counted); the fastest one per (kernel, shape, T) is written at bucket
M = T*K with its time and the heuristic's. Times: medians of triton.testing.do_bench on CUDA; one
timed call in the interpreter (--tiny: those only check the script and the table's plumbing).

The table goes to kernels/configs/<device name>.json (merged with what is there; --out elsewhere):
{"device": torch.cuda.get_device_name(), "entries": [{"kernel", "E", "N", "K", "dtype", "buckets":
{M: config}}], ...}. kernels/tiles.py reads every kernels/configs/*.json once and uses the bucket
nearest a launch's routed pairs; **commit the file** for other machines to use it. Without a
matching entry the heuristics apply unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, uninstalled

import torch  # noqa: E402

DEFAULT_TOKENS = [1, 4, 16, 64, 256, 1024, 4096]
TINY = {"E": 8, "H": 64, "I": 32, "K": 2, "S": 2}  # interpreter-sized
TINY_TOKENS = [1, 8]


def sweep(kind: str, tiny: bool) -> list[dict]:
    """The configs tried per kernel kind (a tiny sweep for the interpreter)."""
    if tiny:
        return {"moe_gemm": [dict(BN=16, BK=16, num_warps=4, num_stages=2), dict(BN=32, BK=32, num_warps=4, num_stages=2)],
                "lora_shrink": [dict(BK=16, num_warps=4, num_stages=2), dict(BK=32, num_warps=2, num_stages=2)],
                "lora_expand": [dict(BN=16, num_warps=4, num_stages=2), dict(BN=32, num_warps=2, num_stages=2)]}[kind]
    warps, stages = (4, 8), (2, 3)  # each config compiles per BM and variant: the sweep's main cost
    if kind == "moe_gemm":
        return [dict(BN=bn, BK=bk, num_warps=w, num_stages=s)
                for bn, bk, w, s in itertools.product((32, 64, 128), (64, 128), warps, (3, 4))]
    if kind == "lora_shrink":
        return [dict(BK=bk, num_warps=w, num_stages=s) for bk, w, s in itertools.product((64, 128, 256), warps, stages)]
    return [dict(BN=bn, num_warps=w, num_stages=s) for bn, w, s in itertools.product((32, 64, 128, 256), warps, stages)]


def fits(kind: str, cfg: dict, n_dim: int, k_dim: int, dtype: torch.dtype) -> bool:
    from kernels.tiles import pow2

    if "BN" in cfg and cfg["BN"] > pow2(n_dim, 16):
        return False
    if "BK" in cfg and cfg["BK"] > pow2(k_dim, 16):
        return False
    return dtype != torch.float32 or cfg.get("BK", 0) <= 64  # fp32 tiles: shared memory


def timer(dev: torch.device):
    if dev.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3  # us

    def once(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6

    return once


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


class Case:
    """One (kernel, shape key, T). launch(cfg) launches with cfg (None: the heuristic's tiles)
    into preallocated buffers and returns the output; reset() clears an accumulated output."""

    def __init__(self, kernel: str, key: tuple[int, int, int], tokens: int, pairs: int, block_m: int, launch,
                 n_dim: int, k_dim: int, reset=None):
        self.kernel, self.key, self.tokens, self.pairs, self.launch = kernel, key, tokens, pairs, launch
        self.block_m = block_m
        self.n_dim, self.k_dim, self.reset = n_dim, k_dim, reset or (lambda: None)

    def output(self, cfg: dict | None) -> torch.Tensor:
        self.reset()
        return self.launch(cfg).float().clone()


def build_cases(E: int, H: int, I: int, K: int, S: int, tokens: list[int], dtype: torch.dtype,
                dev: torch.device, gen: torch.Generator) -> list[Case]:
    from kernels.fused_moe import moe_gemm_triton
    from kernels.moe_align import moe_align
    from kernels.moe_lora import moe_lora_expand_triton, moe_lora_shrink_triton
    from kernels.tiles import (RANK_TILE, GemmTiles, LoraTiles, lora_expand_bn, lora_shrink_bk, moe_block_m,
                               moe_gemm_heuristic)

    ranks = torch.randint(8, 33, (S, E), generator=gen, dtype=torch.int32)
    offsets = (ranks.flatten().cumsum(0) - ranks.flatten()).view(S, E).to(torch.int32).to(dev)
    R, rb = int(ranks.sum()), int(ranks.max())
    ranks = ranks.to(dev)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(dev)

    w_gu, w_dn = rnd(E, 2 * I, H, scale=H**-0.5), rnd(E, H, I, scale=I**-0.5)
    a = {"gate": rnd(R, H, scale=0.05), "up": rnd(R, H, scale=0.05), "down": rnd(R, I, scale=0.05)}
    b = {"gate": rnd(R, I, scale=0.05), "down": rnd(R, H, scale=0.05)}
    scales = torch.full((S,), 2.0, device=dev)
    cases = []
    for t in tokens:
        n = t * K
        x, h = rnd(t, H), rnd(n, I)
        ti = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(t)]).to(torch.int32).to(dev)
        routed = torch.rand(n, generator=gen).to(dev)
        slots = torch.randint(0, S, (t,), generator=gen, dtype=torch.int32)
        slots[torch.rand(t, generator=gen) < 0.25] = -1  # a quarter of the tokens on the base model
        slots = slots.to(dev)
        bm = moe_block_m(n, E)
        align, align_l = moe_align(ti, E, bm), moe_align(ti, E, bm, slots, S)  # the fused path's alignments
        u = (torch.randn(n, rb, generator=gen) * 0.1).to(dev)
        # NaN-filled, not empty: an entry a launch leaves unwritten fails the comparison every time, not by chance
        nan = float("nan")
        o_gu, o_dn = torch.full((n, I), nan, dtype=dtype, device=dev), torch.full((n, H), nan, device=dev)
        u_gu, u_dn = torch.full((n, 2 * rb), nan, device=dev), torch.full((n, rb), nan, device=dev)
        y_g, y_d = torch.zeros(n, I, dtype=dtype, device=dev), torch.zeros(n, H, dtype=dtype, device=dev)

        def gemm(cfg, fuse, n=n, x=x, h=h, align=align, o_gu=o_gu, o_dn=o_dn, routed=routed):
            od, idim = (I, H) if fuse else (H, I)
            tiles = GemmTiles(moe_block_m(n, E), **cfg) if cfg else moe_gemm_heuristic(n, E, od, idim, dtype, dev)
            if fuse:
                return moe_gemm_triton(x, w_gu, align, o_gu, tiles, K, K, fuse_act=True)
            return moe_gemm_triton(h, w_dn, align, o_dn, tiles, 1, K, routed=routed)

        def shrink(cfg, gu, x=x, h=h, slots=slots, align_l=align_l, u_gu=u_gu, u_dn=u_dn):
            idim = H if gu else I
            tiles = LoraTiles(cfg["BK"], cfg["num_warps"], cfg["num_stages"]) if cfg else \
                LoraTiles(lora_shrink_bk(idim, dtype))
            if gu:
                return moe_lora_shrink_triton(x, [(a[p], offsets, ranks) for p in ("gate", "up")], align_l, slots, K, K,
                                              rb, out=u_gu, tiles=tiles)
            return moe_lora_shrink_triton(h, [(a["down"], offsets, ranks)], align_l, slots, 1, K, rb, out=u_dn,
                                          tiles=tiles)

        def expand(cfg, proj, y, slots=slots, align_l=align_l, u=u):
            tiles = LoraTiles(cfg["BN"], cfg["num_warps"], cfg["num_stages"]) if cfg else \
                LoraTiles(lora_expand_bn(y.shape[1], dtype))
            return moe_lora_expand_triton(y, u, [(b[proj], offsets, ranks, 0)], scales, align_l, slots, K, tiles=tiles)

        cases += [Case("moe_gemm", (E, I, H), t, n, bm, lambda c, f=gemm: f(c, True), I, H),
                  Case("moe_gemm", (E, H, I), t, n, bm, lambda c, f=gemm: f(c, False), H, I),
                  # the shrink leaves base rows and columns past a rank unwritten (nothing reads them):
                  # cleared before each compared launch, else leftover NaNs fail every config
                  Case("lora_shrink", (E, RANK_TILE, H), t, n, bm, lambda c, f=shrink: f(c, True), RANK_TILE, H,
                       reset=u_gu.zero_),
                  Case("lora_shrink", (E, RANK_TILE, I), t, n, bm, lambda c, f=shrink: f(c, False), RANK_TILE, I,
                       reset=u_dn.zero_),
                  Case("lora_expand", (E, I, RANK_TILE), t, n, bm, lambda c, f=expand, y=y_g: f(c, "gate", y), I, RANK_TILE,
                       reset=y_g.zero_),
                  Case("lora_expand", (E, H, RANK_TILE), t, n, bm, lambda c, f=expand, y=y_d: f(c, "down", y), H, RANK_TILE,
                       reset=y_d.zero_)]
    return cases


def tune_case(case: Case, configs: list[dict], dtype: torch.dtype, bench) -> dict | None:
    """The fastest config whose output matches the heuristic's, with both times; None if none."""
    ref = case.output(None)
    heur_us = bench(lambda: case.launch(None))  # (an expand accumulates while timed: same work)
    best, tried, skipped = None, 0, 0
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for cfg in configs:
        if not fits(case.kernel, cfg, case.n_dim, case.k_dim, dtype):
            continue
        try:
            out = case.output(cfg)
            torch.testing.assert_close(out, ref, rtol=tol, atol=tol * max(1.0, float(ref.abs().max())))
        except Exception as exc:  # noqa: BLE001  (a config that does not compile, launch or agree)
            skipped += 1
            print(f"  skipped {case.kernel} {case.key} T={case.tokens} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        tried += 1
        us = bench(lambda: case.launch(cfg))
        if best is None or us < best["us"]:
            best = dict(cfg, us=us)
    if best is None:
        return None
    best.update(BM=case.block_m, heuristic_us=heur_us, tried=tried, skipped=skipped)
    return best


def merge(path: Path, device: str, results: list[tuple[Case, dict]], meta: dict, dtype: torch.dtype) -> dict:
    doc = json.loads(path.read_text()) if path.exists() else {}
    if doc and doc.get("device") != device:
        raise SystemExit(f"{path} holds {doc.get('device')!r}'s table, not {device!r}'s: pass --out")
    entries = {(e["kernel"], e["E"], e["N"], e["K"], e["dtype"]): e for e in doc.get("entries", [])}
    dt = str(dtype).removeprefix("torch.")
    for case, best in results:
        key = (case.kernel, *case.key, dt)
        e = entries.setdefault(key, {"kernel": case.kernel, "E": case.key[0], "N": case.key[1], "K": case.key[2],
                                     "dtype": dt, "buckets": {}})
        e["buckets"][str(case.pairs)] = best
    out = {"device": device, **meta,
           "entries": sorted(entries.values(), key=lambda e: (e["kernel"], e["E"], e["N"], e["K"], e["dtype"]))}
    for e in out["entries"]:
        e["buckets"] = dict(sorted(e["buckets"].items(), key=lambda kv: int(kv[0])))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["olmoe"], help="preset shapes (drlora.models.PRESETS)")
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help=f"token counts (default {DEFAULT_TOKENS})")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--slots", type=int, default=16, help="adapter slots of the LoRA inputs")
    ap.add_argument("--kernels", nargs="+", default=["moe_gemm", "lora_shrink", "lora_expand"])
    ap.add_argument("--out", default=None, help="table file (default kernels/configs/<device>.json)")
    ap.add_argument("--tiny", action="store_true", help="CPU, Triton interpreter, tiny shapes and sweep (checks the "
                    "script and the table; needs --out)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop starting new cases after this long and write what was tuned (token counts run "
                    "smallest first: decode shapes before prefill ones)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.tiny:
        if args.out is None:
            ap.error("--tiny needs --out (a CPU table in kernels/configs would change the interpreter's tiles)")
        # before the first Triton launch imports kernels/_tl (triton.jit reads it at decoration)
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["DRLORA_FORCE_TRITON"] = "1"
        dev, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            print("benchmarks/tune.py needs a CUDA GPU (none found); nothing run (--tiny checks the script on CPU).")
            return 2
        dev, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    from kernels.tiles import CONFIG_DIR, device_name

    name = device_name(dev)
    out = Path(args.out) if args.out else CONFIG_DIR / f"{device_slug(name)}.json"
    tokens = args.tokens or (TINY_TOKENS if args.tiny else DEFAULT_TOKENS)
    gen = torch.Generator().manual_seed(args.seed)
    bench = timer(dev)
    shapes = []
    if args.tiny:
        shapes.append(("tiny", TINY))
    else:
        from drlora.models import PRESETS, MoeShape

        for s in args.shape:
            ms = MoeShape.from_config(PRESETS[s])
            shapes.append((s, {"E": ms.num_experts, "H": ms.hidden_size, "I": ms.intermediate_size,
                               "K": PRESETS[s].get("num_experts_per_tok", 8), "S": args.slots}))
    results = []
    t_start = time.perf_counter()
    print(f"{name}  {str(dtype).removeprefix('torch.')}  tokens {tokens}")
    print(f"{'kernel':<12}{'shape (E, N, K)':<20}{'T':>6}  {'best config':<46}{'us':>9}{'heur us':>9}{'x':>6}")
    cases = [c for _, sh in shapes for c in build_cases(sh["E"], sh["H"], sh["I"], sh["K"], sh["S"], sorted(tokens),
                                                        dtype, dev, gen) if c.kernel in args.kernels]
    cases.sort(key=lambda c: c.tokens)  # stable: shapes and kernels in order within a token count
    left = 0
    for i, case in enumerate(cases):
        if args.max_seconds is not None and time.perf_counter() - t_start > args.max_seconds:
            left = len(cases) - i
            print(f"--max-seconds {args.max_seconds:g} reached: {left} cases left untuned (from T={case.tokens})")
            break
        best = tune_case(case, sweep(case.kernel, args.tiny), dtype, bench)
        if best is None:
            print(f"{case.kernel:<12}{str(case.key):<20}{case.tokens:>6}  no config passed")
            continue
        results.append((case, best))
        cfg = {k: v for k, v in best.items() if k not in ("BM", "us", "heuristic_us", "tried", "skipped")}
        print(f"{case.kernel:<12}{str(case.key):<20}{case.tokens:>6}  {json.dumps(cfg):<46}{best['us']:>9.1f}"
              f"{best['heuristic_us']:>9.1f}{best['heuristic_us'] / max(best['us'], 1e-9):>6.2f}")
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    meta = {"torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "shapes": [s for s, _ in shapes],
            "tokens": tokens, "tune_seconds": round(time.perf_counter() - t_start, 1), "cases_left": left}
    doc = merge(out, name, results, meta, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out} ({len(results)} tuned points, {meta['tune_seconds']} s)"
          + ("" if args.out else "; commit it so that other machines use it"))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
