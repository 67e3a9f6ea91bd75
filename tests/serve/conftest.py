"""Shared fixtures: the tiny model, random rank-exact adapters, small engines (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
from drlora.models import MoeShape, resolve_model

from serve_helpers import make_adapter

torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine: threads only contend


@pytest.fixture(scope="session")
def tiny_dir():
    return resolve_model("tiny")


@pytest.fixture(scope="session")
def tiny_shape(tiny_dir):
    return MoeShape.from_model_dir(tiny_dir)


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory, tiny_shape):
    """Three adapters with different per-expert ranks: a (expert only), b (+ attention LoRA),
    c (+ its own router)."""
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(root / "a", tiny_shape, seed=1, max_rank=8)
    make_adapter(root / "b", tiny_shape, seed=2, max_rank=4, dense=True)
    make_adapter(root / "c", tiny_shape, seed=3, max_rank=12, router=True, targets=("gate", "down"))
    return root


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


