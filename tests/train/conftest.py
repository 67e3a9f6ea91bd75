"""Shared fixtures: the tiny model (built once per machine into the drlora cache), a copy
whose routers are biased towards a few experts, and small data files."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from drlora.corpus import arithmetic

FAVOURITES = (0, 1, 2, 3)  # experts the skewed tiny model routes most tokens to


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from drlora.models import resolve_model

    return resolve_model("tiny")


def load_tiny(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def write_arith(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            lhs, rhs = arithmetic(rng).split(" = ")
            f.write(json.dumps({"prompt": lhs + " =", "completion": " " + rhs}) + "\n")
    return path


@pytest.fixture(scope="session")
def arith_file(tmp_path_factory) -> Path:
    return write_arith(tmp_path_factory.mktemp("data") / "arith.jsonl", 64)


@pytest.fixture(scope="session")
def skewed_tiny(tiny_path, tmp_path_factory, arith_file) -> Path:
    """The tiny model with each router biased towards FAVOURITES: their rows get a component
    along the mean router input on the arithmetic data, so those experts win top-k often."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = load_tiny(tiny_path)
    texts = [json.loads(l)["prompt"] + json.loads(l)["completion"] for l in open(arith_file)][:32]
    ids = tok(texts, return_tensors="pt", padding=True)["input_ids"]
    means = {}
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda mod, inp, out, l=l: means.__setitem__(l, inp[0].reshape(-1, inp[0].shape[-1]).mean(0)))
        for l, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
        for h in hooks:
            h.remove()
        for l, layer in enumerate(model.model.layers):
            u = means[l] / means[l].norm() ** 2  # u . mean = 1
            for e in FAVOURITES:
                layer.mlp.gate.weight[e] += 1.5 * u
    out = tmp_path_factory.mktemp("skewed") / "tiny-skewed"
    model.save_pretrained(out)
    for f in Path(tiny_path).iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out
