"""Offline compile of every Triton kernel for sm_90 (no GPU needed): catches compiled-mode-only
errors (loop-carried types, constexpr misuse) that the interpreter does not. Each kernel is
compiled with the constexprs, num_warps and num_stages its launcher picks (kernels/tiles.py) at
OLMoE-1B-7B shapes (H 2048, I 1024, E 64, top-8, 16 heads x 128), decode and prefill sizes, and
for the families the generic kernels serve (Qwen3-MoE's per-head q/k norm with GQA; no norm)."""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

IDX = ["sorted_ids_ptr", "block_expert_ptr", "block_slot_ptr", "num_blocks_ptr", "slot_ids_ptr", "offsets_ptr",
       "ranks_ptr", "off0_ptr", "rk0_ptr", "off1_ptr", "rk1_ptr", "off2_ptr", "rk2_ptr"]
H, I, E, K = 2048, 1024, 64, 8
OPTS = ("num_warps", "num_stages")


def _cases():
    """(kernel, pointer/float types by name, constexprs and options)."""
    import torch

    from kernels._tl import align, attention, attn_input, lora, moe_gemm, norm, router
    from kernels.tiles import (RANK_TILE, attn_input_tiles, lora_block_m, lora_expand_bn, lora_shrink_bk,
                               moe_gemm_tiles, pow2, prefill_attention_tiles, router_tiles, row_tiles)

    idx = {n: "*i32" for n in IDX}
    cuda = torch.device("cpu")  # tile heuristics then assume an H100's 132 SMs
    for torch_dt, dt, prec in ((torch.bfloat16, "bf16", "tf32"), (torch.float32, "fp32", "ieee")):
        for n in (64 * K, 4096 * K):  # decode and prefill token counts
            gu = moe_gemm_tiles(n, E, I, H, torch_dt, cuda).kwargs()
            dn = moe_gemm_tiles(n, E, H, I, torch_dt, cuda).kwargs()
            ptrs = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "rw_ptr": "*fp32", "scales_ptr": "*fp32", "u0_ptr": "*fp32",
                    "u1_ptr": "*fp32", "b0_ptr": f"*{dt}", "b1_ptr": f"*{dt}", **idx}
            for lora_on in (False, True):
                base = dict(TOPK=K, PRECISION=prec, UPCAST=False, BR=RANK_TILE, LORA_0=lora_on)
                yield moe_gemm.moe_gemm_kernel, {**ptrs, "out_ptr": f"*{dt}"}, dict(
                    base, X_ROW_DIV=K, FUSE_ACT=True, MUL_ROUTED=False, LORA_1=lora_on, **gu)
                yield moe_gemm.moe_gemm_kernel, {**ptrs, "out_ptr": "*fp32"}, dict(
                    base, X_ROW_DIV=1, FUSE_ACT=False, MUL_ROUTED=True, LORA_1=False, **dn)
            bm = gu["BM"]
            yield lora.lora_shrink_kernel, {"x_ptr": f"*{dt}", "a0_ptr": f"*{dt}", "a1_ptr": f"*{dt}",
                                            "a2_ptr": f"*{dt}", "u_ptr": "*fp32", **idx}, dict(
                X_ROW_DIV=K, TOPK=K, PRECISION=prec, UPCAST=False, BM=bm, BR=RANK_TILE,
                BK=lora_shrink_bk(H, torch_dt), num_warps=4)
        tokens = 64  # dense (attention) LoRA: the standalone shrink over tokens, then the expand
        yield lora.lora_expand_kernel, {"u_ptr": "*fp32", "b0_ptr": f"*{dt}", "b1_ptr": f"*{dt}", "b2_ptr": f"*{dt}",
                                        "y_ptr": f"*{dt}", "scales_ptr": "*fp32", **idx}, dict(
            TOPK=1, PRECISION=prec, UPCAST=False, BM=lora_block_m(tokens), BN=lora_expand_bn(H, torch_dt),
            BR=RANK_TILE, num_warps=4)
        rows = row_tiles(H)
        for parts, residual, do_norm in ((0, False, True), (0, True, True), (K, True, True), (K, False, False)):
            yield norm.add_rms_norm_kernel, {"x_ptr": "*fp32" if parts else f"*{dt}", "res_ptr": f"*{dt}",
                                             "w_ptr": f"*{dt}", "out_ptr": f"*{dt}", "eps": "fp32"}, dict(
                NUM_PARTS=parts, HAS_RESIDUAL=residual, DO_NORM=do_norm, BLOCK=rows.BLOCK, num_warps=rows.num_warps)
        for qh, kvh, d, mode, clip in ((16, 16, 128, 1, False), (16, 16, 128, 1, True), (32, 4, 128, 2, False),
                                       (32, 8, 128, 0, False)):  # OLMoE (+ clip_qkv), Qwen3-MoE, Mixtral
            t = attn_input_tiles(qh, kvh, d)
            yield attn_input.attention_input_kernel, {
                **{n: f"*{dt}" for n in ("qkv_ptr", "qn_ptr", "kn_ptr", "cos_ptr", "sin_ptr", "q_ptr", "kc_ptr",
                                         "vc_ptr")},
                "pos_ptr": "*i64", "slot_ptr": "*i64", "eps": "fp32", "clip": "fp32"}, dict(
                Q_NORM=mode, K_NORM=mode, CLIP=clip, QHP=t.QHP, KVHP=t.KVHP, HALFP=t.HALF, num_warps=t.num_warps)
        rt = router_tiles(E)
        for renorm, rnd in ((False, True), (True, False)):
            yield router.route_topk_kernel, {"logits_ptr": f"*{dt}", "w_ptr": "*fp32", "ids_ptr": "*i32"}, dict(
                K=K, KP=K, RENORM=renorm, ROUND=rnd, BT=rt.BT, EP=rt.BLOCK, num_warps=rt.num_warps)
        pre = {n: f"*{dt}" for n in ("q_ptr", "kc_ptr", "vc_ptr", "out_ptr")}
        for max_q in (16, 2048):
            pt = prefill_attention_tiles(max_q, 128)
            yield attention.paged_prefill_kernel, {**pre, "block_tables_ptr": "*i32", "cu_q_ptr": "*i32",
                                                   "context_lens_ptr": "*i32", "scale": "fp32"}, dict(
                G=1, BS=16, DP=128, PRECISION=prec, UPCAST=False, BM=pt.BM, BN=pt.BN, num_warps=pt.num_warps)
    i32 = {n: "*i32" for n in ("topk_ids_ptr", "counts_ptr", "pos_ptr", *IDX)}
    for mode, s in ((0, 1), (1, 16), (2, 17)):  # by expert; by (expert, slot); slot-sorted (16 slots + base)
        yield align.moe_align_kernel, i32, dict(K=K, S=s, MODE=mode, BM=16, BLOCK=1024, EB=max(1, 1024 // pow2(s)),
                                                SP=pow2(s), num_warps=8)
    kv = {n: "*bf16" for n in ("q_ptr", "kc_ptr", "vc_ptr", "out_ptr", "k_ptr", "v_ptr")}
    yield attention.paged_decode_kernel, {**kv, "block_tables_ptr": "*i32", "context_lens_ptr": "*i32",
                                          "scale": "fp32"}, dict(G=4, BS=16, BSP=16, DP=64, num_warps=4)
    yield attention.store_kv_kernel, {**kv, "slot_ptr": "*i64"}, dict(HP=8, DP=64)


def compile_all() -> None:
    n = 0
    for kern, types, consts in _cases():
        fn = kern if isinstance(kern, JITFunction) else JITFunction(kern.fn)  # interpreter wraps kernels
        opts = {k: consts.pop(k) for k in OPTS if k in consts}
        sig = {a: types.get(a, "i32") for a in fn.arg_names if a not in consts}
        try:
            triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=opts)
        except Exception as exc:  # noqa: BLE001
            if "ptxas" in str(exc).lower() or "no such file" in str(exc).lower():
                print("SKIP offline CUDA toolchain unavailable")
                return
            raise AssertionError(f"{fn.__name__} {consts} {opts} failed to compile: {exc}") from exc
        n += 1
    print(f"OK {n}")


def test_compile_sm90():
    # own process: TRITON_INTERPRET=1 (set by conftest on CPU) changes triton.language globally
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    code = "import sys; sys.path.insert(0, %r); import test_compile; test_compile.compile_all()" % os.path.dirname(__file__)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert res.returncode == 0, res.stderr[-3000:]
    if "SKIP" in res.stdout:
        pytest.skip(res.stdout.strip())
    assert "OK" in res.stdout
