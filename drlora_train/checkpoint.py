"""Training checkpoints: everything a resumed run needs to continue bit-for-bit.

Saved: LoRA params and masks (and the router if trained), optimizer, scheduler, saliency
EMAs, RNG states, the step, the rank history and the data-order seed (the order itself is a
pure function of seed and step, see data.global_batch_indices; it is stored for inspection).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

CKPT_DIR = "checkpoint"
CKPT_FILE = "state.pt"
# settings that cannot change the trained adapter: they may differ between a run and its --resume
RESUME_FREE = frozenset({"output", "resume", "log_every", "progress", "push", "api_key", "checkpoint_every",
                         "device", "eval_max_examples", "eval_max_new_tokens", "eval_data"})


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


def clear(output: str | Path) -> None:
    """A fresh run drops a checkpoint left by an earlier run, so a later --resume cannot
    continue that one."""
    shutil.rmtree(Path(output) / CKPT_DIR, ignore_errors=True)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def resume_key(cfg, model_path: str | Path, dtype: str) -> dict:
    """Everything that determines the trained adapter, as the checkpoint records it: the
    config minus RESUME_FREE, with the model, data and dtype resolved (a relative path or
    `--dtype auto` means the same thing only on the same machine and folder)."""
    key = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE}
    key["model"] = str(Path(model_path).resolve())
    key["dtype"] = dtype
    # the data by content (a moved or renamed copy is the same data); the path only for messages
    key["data"] = file_digest(cfg.data)
    key["data_path"] = str(Path(cfg.data).resolve())
    # the held-out split changes the training set; a separate eval file does not
    key["eval_fraction"] = "unused (--eval-data)" if cfg.eval_data else cfg.eval_fraction
    return json.loads(json.dumps(key))  # tuples -> lists, as they come back from the checkpoint


def resume_mismatch(state: dict, key: dict) -> list[str]:
    """'--flag: checkpoint X, now Y' for every result-changing setting that differs. A
    checkpoint from before resume keys existed is compared on its raw config."""
    saved = state.get("resume_key")
    if saved is None:
        saved = {k: v for k, v in json.loads(json.dumps(state.get("config", {}))).items()
                 if k in key and k not in ("model", "data", "dtype", "eval_fraction")}
    diffs = []
    for k in sorted(saved):
        if k == "data_path" or saved[k] == key.get(k):
            continue
        if k == "data" and "data_path" in saved:
            diffs.append(f"--data: checkpoint {saved['data_path']} (sha256 {saved[k]}), "
                         f"now {key['data_path']} (sha256 {key[k]})")
        else:
            diffs.append(f"--{k.replace('_', '-')}: checkpoint {_show(saved[k])}, now {_show(key.get(k))}")
    return diffs


def _show(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)
