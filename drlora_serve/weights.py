"""Read Hugging Face safetensors checkpoints (single file or sharded with an index) lazily,
one tensor at a time, so that a large model is copied straight into its device buffers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class WeightSource:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {k: self.dir / f for k, f in weight_map.items()}
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.dir} holds no *.safetensors weights")
            self.where = {}
            for f in files:
                with safe_open(str(f), "pt") as h:
                    for k in h.keys():
                        self.where[k] = f
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        f = self.where.get(name)
        if f is None:
            raise KeyError(f"checkpoint {self.dir} has no tensor {name}")
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = safe_open(str(f), "pt")
        return h.get_tensor(name)

    def load(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        return self.get(name).to(device=device, dtype=dtype).contiguous()

    def stack_experts(self, prefix: str, num_experts: int, projs: list[str], dtype, device) -> torch.Tensor:
        """Per-expert `{prefix}.{e}.{proj}.weight` (hub layout) stacked into (E, sum out, in);
        several projs are concatenated along out (gate then up -> (E, 2I, H))."""
        first = [self.get(f"{prefix}.0.{p}.weight") for p in projs]
        out_dim, in_dim = sum(t.shape[0] for t in first), first[0].shape[1]
        w = torch.empty(num_experts, out_dim, in_dim, dtype=dtype, device=device)
        for e in range(num_experts):
            row = 0
            for p in projs:
                t = self.get(f"{prefix}.{e}.{p}.weight")
                w[e, row:row + t.shape[0]].copy_(t)
                row += t.shape[0]
        return w

    def close(self) -> None:
        self._handles.clear()


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype '{name}' (expected auto, {', '.join(table)})")
    return table[name]
