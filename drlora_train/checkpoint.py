"""Training checkpoints: everything a resumed run needs to continue bit-for-bit.

Saved: LoRA params and masks (and the router if trained), optimizer, scheduler, saliency
EMAs, RNG states, the step, the rank history and the data-order seed (the order itself is a
pure function of seed and step, see data.global_batch_indices; it is stored for inspection).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

CKPT_DIR = "checkpoint"
CKPT_FILE = "state.pt"


def path_of(output: str | Path) -> Path:
    return Path(output) / CKPT_DIR / CKPT_FILE


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save(output: str | Path, state: dict) -> Path:
    """Write atomically (temp file, then rename): a crash never leaves a half checkpoint."""
    p = path_of(output)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(p)
    return p


def load(output: str | Path) -> dict | None:
    """On CPU (RNG states must be); load_state_dict moves the rest to the params' device."""
    p = path_of(output)
    if not p.is_file():
        return None
    return torch.load(p, map_location="cpu", weights_only=False)
