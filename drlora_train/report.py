"""The run's outputs: the adapter folder, the rank heatmap and history, the log, `--push`."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import torch

from drlora.adapter_format import AdapterConfig, write_adapter
from drlora.models import MoeShape

HISTORY_NAME = "rank_history.json"
HEATMAP_NAME = "ranks.png"
LOG_NAME = "train_log.jsonl"


def build_config(base_model: str, shape: MoeShape, ranks: torch.Tensor, targets: tuple[str, ...],
                 scaling: float, train_router: bool, provenance: dict, shared_rank: int = 0) -> AdapterConfig:
    """ranks: (L, E) over every layer. shared_rank: the shared expert's LoRA rank on its
    targets, on every layer that has experts (Qwen2-MoE)."""
    per_layer = [[int(x) for x in row] for row in ranks.tolist()]
    dense = {}
    if shared_rank:
        dense = {f"shared_{p}": [shared_rank if shape.is_sparse(l) else 0 for l in range(shape.num_hidden_layers)]
                 for p in targets}
    return AdapterConfig(base_model=base_model, base_shape=shape, method=provenance["method"],
                         scaling=float(scaling), ranks={p: per_layer for p in targets}, dense_ranks=dense,
                         train_router=train_router, dtype="float32", provenance=provenance)


def write_outputs(out: Path, cfg: AdapterConfig, tensors: dict[str, torch.Tensor],
                  history: list[dict]) -> Path:
    write_adapter(out, cfg, tensors)
    (out / HISTORY_NAME).write_text(json.dumps(history))
    heatmap(torch.tensor(history[-1]["ranks"]), out / HEATMAP_NAME,
            title=f"{cfg.method}: active rank per expert (step {history[-1]['step']})")
    return out


def heatmap(ranks: torch.Tensor, path: Path, title: str) -> None:
    """Layers x experts image of the ranks (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, E = ranks.shape
    fig, ax = plt.subplots(figsize=(max(4.0, E * 0.18 + 2), max(2.5, L * 0.3 + 1.5)))
    im = ax.imshow(ranks.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="rank")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class JsonlLog:
    """Append-only JSONL log (one object per line); resuming appends to the same file."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rec: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


class PushError(RuntimeError):
    """--push failed; the adapter is already written (the CLI exits 1 with one line)."""


def push(url: str, name: str, path: Path, api_key: str | None, timeout: float = 60.0) -> str:
    """POST the adapter to a running server's load endpoint; return a one-line result, or raise
    PushError when the server cannot be reached or refuses it."""
    body = json.dumps({"lora_name": name, "lora_path": str(path.resolve()), "load_inplace": True}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/v1/load_lora_adapter", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    written = f"(the adapter is written in {path})"
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return f"push: loaded '{name}' into {url} (HTTP {resp.status})"
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip().replace("\n", " ")[:300]
        raise PushError(f"push: {url} refused '{name}' (HTTP {exc.code}): {detail} {written}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = str(getattr(exc, "reason", exc)).replace("\n", " ")
        raise PushError(f"push: could not reach {url} ({reason}) {written}") from None
