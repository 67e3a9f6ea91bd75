"""Offline compile of every Triton kernel for sm_90 (no GPU needed): catches compiled-mode-only
errors (loop-carried types, constexpr misuse) that the interpreter does not.

What is compiled is what really runs: the public ops (kernels/*) are called on CPU tensors at
OLMoE-1B-7B shapes (H 2048, I 1024, E 64, top-8, 16 heads x 128), decode and prefill sizes, and
for the families the generic kernels serve (Qwen3-MoE's per-head q/k norm with GQA; Mixtral, no
norm), with `JITFunction.run` replaced by a recorder. Each recorded launch is then bound by the
installed Triton's own launch-time binder and `_pack_args` (the code `run` uses before it
compiles), so the constexprs, num_warps and num_stages are the launcher's, and the signature and
specialisation attributes (ints equal to 1, ints and pointers divisible by 16, `do_not_specialize`)
are the ones a real launch of those arguments produces. CPU allocations are aligned like CUDA ones
(>= 16 bytes), so pointer divisibility matches, views included.
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


def _run_ops():
    """Call every public op the way the model runner does (kernels/ on its Triton path)."""
    import torch

    from kernels.attention_input import attention_input
    from kernels.dense_lora import dense_lora_, dense_lora_cols_
    from kernels.fused_moe import fused_moe
    from kernels.norm import add_rms_norm_, moe_combine, rms_norm
    from kernels.paged_attention import paged_decode_attention, paged_prefill_attention, store_kv
    from kernels.router import route_topk

    dev = torch.device("cpu")  # tile heuristics then assume an H100's 132 SMs
    bs, nb, maxb = 16, 1024, 256
    for dt in (torch.bfloat16, torch.float32):
        w13, w2 = torch.empty(E, 2 * I, H, dtype=dt), torch.empty(E, H, I, dtype=dt)
        moe_lora = _moe_lora(dt, dev)
        for t in (64, 4096):  # decode and prefill token counts
            h = torch.empty(t, H, dtype=dt)
            ids = torch.randint(0, E, (t, K), dtype=torch.int32)
            w = torch.rand(t, K)
            slots = torch.randint(-1, SLOTS, (t,), dtype=torch.int32)
            for lora in (None, moe_lora):
                fused_moe(h, w13, w2, w, ids, lora, slots if lora is not None else None, combine=False)
            scales = torch.ones(SLOTS)  # q, k, v of one adapter pool share the slots' scales
            dense_lora_cols_(torch.empty(t, 3 * H, dtype=dt), h, [(_dense_lora(H, H, dt, dev, scales), c)
                                                                 for c in (0, H, 2 * H)], slots)
            dense_lora_(torch.empty(t, H, dtype=dt), h, _dense_lora(H, H, dt, dev), slots)
            res, weight = torch.empty(t, H, dtype=dt), torch.empty(H, dtype=dt)
            rms_norm(h, weight, 1e-6)
            add_rms_norm_(h, res, weight, 1e-6)
            add_rms_norm_(torch.empty(t, K, H), res, weight, 1e-6)  # the MoE's partials
            moe_combine(torch.empty(t, K, H), dt)
            for renorm, rnd in ((False, True), (True, False)):  # OLMoE; Qwen3-MoE / Mixtral
                route_topk(torch.empty(t, E, dtype=dt), K, renorm, rnd)
            pos = torch.randint(0, nb * bs, (t,))
            for qh, kvh, per_head, clip in ((QH, QH, False, None), (QH, QH, False, 8.0), (32, 4, True, None),
                                            (32, 8, None, None)):  # OLMoE (+ clip_qkv), Qwen3-MoE, Mixtral
                kc, vc = torch.empty(nb, bs, kvh, D, dtype=dt), torch.empty(nb, bs, kvh, D, dtype=dt)
                qn = kn = None
                if per_head is not None:
                    qn = torch.empty(D if per_head else qh * D, dtype=dt)
                    kn = torch.empty(D if per_head else kvh * D, dtype=dt)
                cos, sin = torch.empty(8192, D, dtype=dt), torch.empty(8192, D, dtype=dt)
                attention_input(torch.empty(t, (qh + 2 * kvh) * D, dtype=dt), qn, kn, 1e-6, cos, sin, pos % 8192,
                                kc, vc, pos, qh, kvh, D, clip)
            kc, vc = torch.empty(nb, bs, QH, D, dtype=dt), torch.empty(nb, bs, QH, D, dtype=dt)
            q = torch.empty(t, QH, D, dtype=dt)
            store_kv(torch.empty(t, QH, D, dtype=dt), torch.empty(t, QH, D, dtype=dt), kc, vc, pos)
            paged_decode_attention(q, kc, vc, torch.zeros(t, maxb, dtype=torch.int32),
                                   torch.full((t,), 100, dtype=torch.int32), D ** -0.5)
            chunks = 4  # prefill chunks of t // 4 queries over a cached prefix
            paged_prefill_attention(q, kc, vc, torch.zeros(chunks, maxb, dtype=torch.int32),
                                    torch.arange(0, t + 1, t // chunks, dtype=torch.int32),
                                    torch.full((chunks,), t, dtype=torch.int32), t // chunks, D ** -0.5)


def record_launches() -> list:
    """(kernel, args, kwargs) of every launch `_run_ops` makes, nothing executed."""
    from triton.runtime.jit import JITFunction

    launches = []
    run = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
    try:
        _run_ops()
    finally:
        JITFunction.run = run
    return launches


def compile_all() -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    seen, n = set(), 0
    for fn, args, kwargs in record_launches():
        # what JITFunction.run does before it compiles (create_binder / _pack_args), for sm_90
        bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
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


def test_compile_sm90():
    # own process: TRITON_INTERPRET=1 (set by conftest on CPU) changes triton.language globally;
    # DRLORA_FORCE_TRITON=1 sends the CPU tensors down the launchers' Triton path
    env = {**os.environ, "TRITON_INTERPRET": "0", "DRLORA_FORCE_TRITON": "1", "DRLORA_POISON": "0"}
    code = "import sys; sys.path.insert(0, %r); import test_compile; test_compile.compile_all()" % os.path.dirname(__file__)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert res.returncode == 0, res.stderr[-3000:]
    if "SKIP" in res.stdout:
        pytest.skip(res.stdout.strip())
    assert "OK" in res.stdout
    for name in ("moe_gemm_kernel", "lora_shrink_kernel", "lora_expand_kernel", "moe_align_kernel",
                 "add_rms_norm_kernel", "route_topk_kernel", "attention_input_kernel", "store_kv_kernel",
                 "paged_decode_kernel", "paged_prefill_kernel"):
        assert name in res.stdout, f"{name} was never launched: {res.stdout}"
