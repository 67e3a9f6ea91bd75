"""The whole engine on the Triton kernels (interpreter on CPU) gives the twins' outputs.

Runs in a subprocess: TRITON_INTERPRET must be set before triton compiles anything. The
engine (tiny model, fp32) serves base and adapter requests with a shared prompt prefix (so
prefix caching makes a prefill chunk with a cached prefix), chunked prefill and decode; the
same requests run with DRLORA_FORCE_TRITON=1 and without, and the greedy tokens and their
logprobs must agree."""

from __future__ import annotations

import pytest

from serve_helpers import TRITON_PREFIX, assert_triton_matches_twins, run_twins_and_triton


def test_engine_on_triton_kernels_matches_twins(tiny_dir, adapters_dir):
    pytest.importorskip("triton")
    p = TRITON_PREFIX
    out = run_twins_and_triton(tiny_dir, adapters_dir, [(p + "runs", None), (p + "sleeps", "a"),
                                                        ("Once upon a time", "b"), (p + "eats", "c")])
    assert out["triton_cache_hits"] > 0  # a prefill chunk attended over a cached prefix
    assert_triton_matches_twins(out, 4)
