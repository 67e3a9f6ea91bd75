"""Suite-wide fixtures: a private DRLORA_HOME so tests never touch the user's cache, and the
tiny checkpoint built (or found) once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before any drlora import resolves the cache root. A shipped pretrained tiny model
# (drlora/assets/tiny) is used as is; otherwise the random one is built here once.
os.environ.setdefault("DRLORA_HOME", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "drlora_home"))


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from drlora.models import resolve_model

    return resolve_model("tiny")


@pytest.fixture(scope="session")
def tiny_shape(tiny_path):
    from drlora.models import MoeShape

    return MoeShape.from_model_dir(tiny_path)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
