"""The engine on the Triton kernels (interpreter on CPU) gives the twins' outputs on Qwen3-MoE
(per-head q/k norm, head_dim 24, GQA, a dense-MLP layer) and Qwen2-MoE (q/k/v biases, dense
LoRA into column slices of the shared expert's fused gate/up output). Subprocess: TRITON_INTERPRET
must be set before triton compiles anything."""

from __future__ import annotations

import pytest

from drlora.models import MoeShape
from drlora.tiny_families import ensure_tiny_family

from serve_helpers import TRITON_PREFIX, assert_triton_matches_twins, make_adapter, run_twins_and_triton


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe"])
def test_family_engine_on_triton_kernels_matches_twins(model_type, tmp_path):
    pytest.importorskip("triton")
    d = ensure_tiny_family(model_type)
    shape = MoeShape.from_model_dir(d)
    make_adapter(tmp_path / "a", shape, seed=11, max_rank=8, dense=True, shared=bool(shape.shared_expert_intermediate_size))
    make_adapter(tmp_path / "b", shape, seed=12, max_rank=12, router=True, targets=("up", "down"))
    p = TRITON_PREFIX
    out = run_twins_and_triton(d, tmp_path, [(p + "runs", None), (p + "sleeps", "a"), ("Once upon a time", "b")])
    assert_triton_matches_twins(out, 3)
