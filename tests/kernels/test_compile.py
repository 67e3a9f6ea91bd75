"""Offline compile of every Triton kernel for sm_90 (no GPU needed): catches compiled-mode-only
errors (loop-carried types, constexpr misuse) that the interpreter does not.

What is compiled is what really runs: the public ops (kernels/*) are called on CPU tensors at
OLMoE-1B-7B shapes (H 2048, I 1024, E 64, top-8, 16 heads x 128), decode and prefill sizes, and
for the families the generic kernels serve (Qwen3-MoE's per-head q/k norm with GQA; Mixtral, no
norm), and the sampler's grammar-mask kernel, with `JITFunction.run` replaced by a recorder.
Each recorded launch is then bound by the installed Triton's own launch-time binder and
`_pack_args` (the code `run` uses before it compiles), so the constexprs, num_warps and
num_stages are the launcher's, and the signature and specialisation attributes (ints equal to 1,
ints and pointers divisible by 16, `do_not_specialize`) are the ones a real launch of those
arguments produces. CPU allocations are aligned like CUDA ones
(>= 16 bytes), so pointer divisibility matches, views included; the step's metadata are views of
one buffer at the model runner's offsets. The same binding shows that steps of other token counts
specialise every launch alike (no recompile per batch size; `do_not_specialize` in kernels/_tl).
"""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

H, I, E, K, QH, D = 2048, 1024, 64, 8, 16, 128
SLOTS = 4


def _moe_lora(dt, device):
    """A pool of SLOTS adapters with expert LoRA on gate, up and down (ranks 1..8)."""
    import torch

    from kernels.lora_types import MoeLoraLayer

    rows = SLOTS * E * 8
    ranks = torch.randint(1, 9, (SLOTS, E), dtype=torch.int32, device=device)
    offsets = (torch.arange(SLOTS * E, dtype=torch.int32, device=device) * 8).view(SLOTS, E)
    dims = {"gate": (H, I), "up": (H, I), "down": (I, H)}
    return MoeLoraLayer(a={p: torch.empty(rows, i, dtype=dt, device=device) for p, (i, _) in dims.items()},
                        b={p: torch.empty(rows, o, dtype=dt, device=device) for p, (_, o) in dims.items()},
                        offsets={p: offsets for p in dims}, ranks={p: ranks for p in dims},
                        scales=torch.ones(SLOTS, device=device), max_rank=8)


def _dense_lora(in_dim, out_dim, dt, device, scales=None):
    import torch

    from kernels.lora_types import DenseLoraLayer

    scales = scales if scales is not None else torch.ones(SLOTS, device=device)
    return DenseLoraLayer(a=torch.empty(SLOTS * 8, in_dim, dtype=dt, device=device),
                          b=torch.empty(SLOTS * 8, out_dim, dtype=dt, device=device),
                          offsets=torch.arange(SLOTS, dtype=torch.int32, device=device) * 8,
                          ranks=torch.full((SLOTS,), 8, dtype=torch.int32, device=device),
                          scales=scales, max_rank=8)


def _step_metadata(t: int, maxb: int):
    """A step's metadata as drlora_serve/model_runner.py lays it out: views of one int64 and one
    int32 buffer at token-count-dependent offsets (so their pointers' alignment varies by step).
    All t tokens decode (context lens, block tables (t, maxb)); the same tokens also form c
    prefill chunks (cu_q, context lens, block tables (c, maxb))."""
    import torch

    c = 1 if t < 4 else 4
    i64 = torch.zeros(3 * t, dtype=torch.int64)  # ids | positions | slot mapping
    i32 = torch.zeros(t + t + t * maxb + c + 1 + c + c * maxb, dtype=torch.int32)
    i64[t:] = torch.randint(0, 8192, (2 * t,))
    i32[:t] = torch.arange(t) % (SLOTS + 1) - 1  # adapter slots, -1 = base
    o = 2 * t + t * maxb
    i32[o:o + c + 1] = torch.arange(c + 1, dtype=torch.int32) * (t // c)
    i32[t:2 * t] = i32[o + c + 1:o + 2 * c + 1] = t  # every context holds t keys
    return dict(pos=i64[t:2 * t], slot_mapping=i64[2 * t:], slot_ids=i32[:t],
                context_lens=i32[t:2 * t], block_tables=i32[2 * t:o].view(t, maxb), cu_q=i32[o:o + c + 1],
                chunk_lens=i32[o + c + 1:o + 2 * c + 1], chunk_tables=i32[o + 2 * c + 1:].view(c, maxb),
                max_q_len=t // c)


def _run_ops(steps=((64, 256), (4096, 256), (1, 256)), dtypes=("bfloat16", "float32")):
    """Call every public op the way the model runner does (kernels/ on its Triton path), per
    dtype, for each step (token count, block-table width): decode and prefill sizes, and batch 1
    over a 4096-token table (decode attention splits there: split kernel + reduce)."""
    import torch

    from kernels.attention_input import attention_input
    from kernels.dense_lora import dense_lora_, dense_lora_cols_
    from kernels.fused_moe import fused_moe
    from kernels.norm import add_rms_norm_, moe_combine, rms_norm
    from kernels.paged_attention import paged_decode_attention, paged_prefill_attention, store_kv
    from kernels.router import route_topk
    from kernels.token_bitmask import apply_token_bitmask_

    dev = torch.device("cpu")  # tile heuristics then assume an H100's 132 SMs
    bs, nb = 16, 1024
    for dt in map(lambda name: getattr(torch, name), dtypes):
        w13, w2 = torch.empty(E, 2 * I, H, dtype=dt), torch.empty(E, H, I, dtype=dt)
        moe_lora = _moe_lora(dt, dev)
        scales = torch.ones(SLOTS)  # q, k, v of one adapter pool share the slots' scales
        qkv_lora = [(_dense_lora(H, H, dt, dev, scales), c) for c in (0, H, 2 * H)]
        o_lora = _dense_lora(H, H, dt, dev)
        for t, maxb in steps:
            m = _step_metadata(t, maxb)
            h = torch.empty(t, H, dtype=dt)
            ids = torch.randint(0, E, (t, K), dtype=torch.int32)
            w = torch.rand(t, K)
            for lora in (None, moe_lora):
                fused_moe(h, w13, w2, w, ids, lora, m["slot_ids"] if lora is not None else None, combine=False)
            dense_lora_cols_(torch.empty(t, 3 * H, dtype=dt), h, qkv_lora, m["slot_ids"])
            dense_lora_(torch.empty(t, H, dtype=dt), h, o_lora, m["slot_ids"])
            res, weight = torch.empty(t, H, dtype=dt), torch.empty(H, dtype=dt)
            rms_norm(h, weight, 1e-6)
            add_rms_norm_(h, res, weight, 1e-6)
            add_rms_norm_(torch.empty(t, K, H), res, weight, 1e-6)  # the MoE's partials
            moe_combine(torch.empty(t, K, H), dt)
            for renorm, rnd in ((False, True), (True, False)):  # OLMoE; Qwen3-MoE / Mixtral
                route_topk(torch.empty(t, E, dtype=dt), K, renorm, rnd)
            cos, sin = torch.empty(8192, D, dtype=dt), torch.empty(8192, D, dtype=dt)
            for qh, kvh, per_head, clip in ((QH, QH, False, None), (QH, QH, False, 8.0), (32, 4, True, None),
                                            (32, 8, None, None)):  # OLMoE (+ clip_qkv), Qwen3-MoE, Mixtral
                kc, vc = torch.empty(nb, bs, kvh, D, dtype=dt), torch.empty(nb, bs, kvh, D, dtype=dt)
                qn = kn = None
                if per_head is not None:
                    qn = torch.empty(D if per_head else qh * D, dtype=dt)
                    kn = torch.empty(D if per_head else kvh * D, dtype=dt)
                attention_input(torch.empty(t, (qh + 2 * kvh) * D, dtype=dt), qn, kn, 1e-6, cos, sin, m["pos"],
                                kc, vc, m["slot_mapping"], qh, kvh, D, clip)
            kc, vc = torch.empty(nb, bs, QH, D, dtype=dt), torch.empty(nb, bs, QH, D, dtype=dt)
            q = torch.empty(t, QH, D, dtype=dt)
            store_kv(torch.empty(t, QH, D, dtype=dt), torch.empty(t, QH, D, dtype=dt), kc, vc, m["slot_mapping"])
            paged_decode_attention(q, kc, vc, m["block_tables"], m["context_lens"], D ** -0.5)
            # GQA decode (Qwen3-MoE: 32 q heads over 4 kv heads, G = 8 per program)
            gq, gkv = torch.empty(t, 32, D, dtype=dt), torch.empty(nb, bs, 4, D, dtype=dt)
            paged_decode_attention(gq, gkv, gkv, m["block_tables"], m["context_lens"], D ** -0.5)
            paged_prefill_attention(q, kc, vc, m["chunk_tables"], m["cu_q"], m["chunk_lens"], m["max_q_len"],
                                    D ** -0.5)
    for t, _ in steps:  # the sampler's grammar masks: fp32 logits at OLMoE's vocab, half the rows
        nc = max(1, t // 2)
        apply_token_bitmask_(torch.empty(t, 50304), torch.arange(nc), torch.empty(nc, 1572, dtype=torch.int32))


def record_launches(**run_ops) -> list:
    """(kernel, args, kwargs) of every launch `_run_ops(**run_ops)` makes, nothing executed."""
    from triton.runtime.jit import JITFunction

    launches = []
    run = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
    try:
        _run_ops(**run_ops)
    finally:
        JITFunction.run = run
    return launches


def _target():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", 90, 32)
    return target, make_backend(target)


def _bind(fn, args, kwargs, backend):
    """What JITFunction.run does before it compiles (create_binder, _pack_args): the launch's
    specialisation (one (type, attribute) per parameter) and (options, signature, constexprs, attrs)."""
    from triton.runtime.jit import create_function_from_signature

    bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    return spec, fn._pack_args(backend, kwargs, bound, spec, opts)


def compile_all() -> None:
    from triton.compiler import ASTSource

    target, backend = _target()
    seen, n = set(), 0
    for fn, args, kwargs in record_launches():
        _, (options, signature, constexprs, attrs) = _bind(fn, args, kwargs, backend)
        key = (fn.__name__, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
               repr(sorted(options.__dict__.items())))
        if key in seen:  # the same specialisation again (e.g. both token counts): one compile
            continue
        seen.add(key)
        try:
            triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        except Exception as exc:  # noqa: BLE001
            if "ptxas" in str(exc).lower() or "no such file" in str(exc).lower():
                print("SKIP offline CUDA toolchain unavailable")
                return
            raise AssertionError(f"{fn.__name__} {constexprs} {attrs} failed to compile: {exc}") from exc
        n += 1
    names = {k[0] for k in seen}
    print(f"OK {n} {sorted(names)}")


def check_no_respecialization(steps=((1, 1), (16, 16), (17, 5), (64, 256))) -> None:
    """Steps of 1, 16, 17 and 64 tokens (block tables 1, 16, 5, 256 wide, metadata at the model
    runner's offsets) specialise every launch's runtime arguments alike: a new batch size
    recompiles nothing (the launchers' tile constexprs aside, which are the heuristics' choice).
    The decode split count is pinned by DRLORA_DECODE_SPLITS (the caller's), so every step
    launches the same kernels."""
    _, backend = _target()
    per_step = []
    for step in steps:
        per_step.append((step, [(fn.__name__, [(p.name, sp) for p, sp in zip(fn.params, _bind(fn, a, kw, backend)[0])
                                                if not p.is_constexpr])
                                for fn, a, kw in record_launches(steps=(step,), dtypes=("bfloat16",))]))
    (step0, ref), bad = per_step[0], []
    for step, launches in per_step[1:]:
        assert [n for n, _ in launches] == [n for n, _ in ref], f"launch sequences differ: {step0} vs {step}"
        for (name, spec), (_, spec0) in zip(launches, ref):
            bad += [f"{name}.{a}: {s0} at {step0}, {s} at {step}" for (a, s), (_, s0) in zip(spec, spec0) if s != s0]
    print("RESPECIALIZED " + "; ".join(sorted(set(bad))) if bad else f"STABLE {len(ref)}")


def _subprocess(call: str, **extra_env: str) -> str:
    # own process: TRITON_INTERPRET=1 (set by conftest on CPU) changes triton.language globally;
    # DRLORA_FORCE_TRITON=1 sends the CPU tensors down the launchers' Triton path
    env = {**os.environ, "TRITON_INTERPRET": "0", "DRLORA_FORCE_TRITON": "1", "DRLORA_POISON": "0", **extra_env}
    here = os.path.dirname(__file__)
    code = "import sys; sys.path.insert(0, %r); import test_compile; test_compile.%s" % (here, call)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_no_respecialization_per_step():
    out = _subprocess("check_no_respecialization()", DRLORA_DECODE_SPLITS="1")
    assert "STABLE" in out, out


def test_no_respecialization_per_step_split():
    """The same with decode split in 4 (block tables >= 4 wide): split kernel and reduce too."""
    out = _subprocess("check_no_respecialization(((4, 4), (16, 16), (17, 5), (64, 256)))", DRLORA_DECODE_SPLITS="4")
    assert "STABLE" in out, out


def test_compile_sm90():
    out = _subprocess("compile_all()")
    if "SKIP" in out:
        pytest.skip(out.strip())
    assert "OK" in out
    for name in ("moe_gemm_kernel", "lora_shrink_kernel", "lora_expand_kernel", "moe_align_kernel",
                 "add_rms_norm_kernel", "route_topk_kernel", "attention_input_kernel", "store_kv_kernel",
                 "paged_decode_kernel", "paged_decode_reduce_kernel", "paged_prefill_kernel", "token_bitmask_kernel"):
        assert name in out, f"{name} was never launched: {out}"
