"""Kernel tests: Triton runs in interpreter mode on the CPU when no CUDA device is present.

TRITON_INTERPRET is read by triton.jit at decoration time; our kernel modules
(kernels._tl.*) are imported lazily on first Triton dispatch, so setting it here is early
enough. Modules imported earlier in another mode are reloaded.
"""

import importlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # for kt_helpers

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in sorted(m for m in sys.modules if m.startswith("kernels._tl.")):  # lora before moe_gemm
        importlib.reload(sys.modules[_name])


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: test needs a CUDA device")


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")])]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def triton_on(device, monkeypatch):
    """Run the Triton path on `device`: CUDA natively, CPU through the interpreter."""
    pytest.importorskip("triton")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("CPU Triton needs TRITON_INTERPRET=1 (CUDA present: tested on cuda)")
        monkeypatch.setenv("DRLORA_FORCE_TRITON", "1")
    monkeypatch.setenv("DRLORA_POISON", "1")
    return device


@pytest.fixture(autouse=True)
def _seed(request):
    # fresh random inputs each run, but reproducible from the printed seed on failure
    # (DRLORA_TEST_SEED=N replays a failure)
    seed = int(os.environ.get("DRLORA_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    rep = (yield).get_result()
    if rep.failed:
        for key, value in item.user_properties:
            if key == "seed":
                rep.sections.append(("replay", f"DRLORA_TEST_SEED={value} pytest '{item.nodeid}'"))
