"""Resolve a `--model` argument to a local Hugging Face folder.

Accepted: `tiny` (built or shipped by the project), an alias (`olmoe`, `olmoe-instruct`),
a local folder holding config.json, or a hub id (from the local HF cache, else downloaded
where the hub is reachable).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

ALIASES = {
    "olmoe": "allenai/OLMoE-1B-7B-0125",
    "olmoe-instruct": "allenai/OLMoE-1B-7B-0125-Instruct",
}
# allenai/OLMoE-1B-7B-0125's config.json (the fields the engine reads): benchmarks at the real
# shape with random weights (`--load-format dummy`), no download.
OLMOE_1B_7B = dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                   num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                   num_experts_per_tok=8, max_position_embeddings=4096, rms_norm_eps=1e-5, norm_topk_prob=False,
                   clip_qkv=None, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                   tie_word_embeddings=False, eos_token_id=50279, pad_token_id=1, bos_token_id=None)

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]


class ModelNotFoundError(RuntimeError):
    """The model could not be found or fetched; the message names what was tried."""


def resolve_model(spec: str) -> Path:
    if spec == "tiny":
        from drlora.tiny import ensure_tiny

        return ensure_tiny()
    tried: list[str] = []
    path = Path(spec).expanduser()
    if path.exists():
        if (path / "config.json").is_file():
            return path.resolve()
        raise ModelNotFoundError(f"model folder {path} has no config.json")
    tried.append(f"local folder {path}")
    hub_id = ALIASES.get(spec, spec)
    if hub_id.count("/") != 1 or hub_id.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"model '{spec}' not found: tried {', '.join(tried)}; not a hub id "
            f"(expected owner/name) nor an alias ({', '.join(['tiny', *ALIASES])})"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise ModelNotFoundError(f"model '{spec}' not found: huggingface_hub is not installed")
    try:
        return Path(snapshot_download(hub_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:
        tried.append(f"HF cache for {hub_id}")
    try:
        return Path(snapshot_download(hub_id, allow_patterns=HUB_PATTERNS, etag_timeout=10))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        tried.append(f"hub download of {hub_id} ({reason})")
    raise ModelNotFoundError(f"model '{spec}' not found: tried {'; '.join(tried)}")


@dataclass(frozen=True)
class MoeShape:
    """The parts of a base model's shape an adapter must agree with."""

    model_type: str
    num_hidden_layers: int
    num_experts: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, cfg) -> MoeShape:
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (
            lambda k, d=None: getattr(cfg, k, d)
        )
        heads = get("num_attention_heads")
        return cls(
            model_type=get("model_type", "olmoe"),
            num_hidden_layers=get("num_hidden_layers"),
            num_experts=get("num_experts") or get("num_local_experts"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("moe_intermediate_size") or get("intermediate_size"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or get("hidden_size") // heads,
        )

    @classmethod
    def from_model_dir(cls, path: str | Path) -> MoeShape:
        return cls.from_config(json.loads((Path(path) / "config.json").read_text()))

    def proj_dims(self, proj: str) -> tuple[int, int]:
        """(in_dim, out_dim) of a projection name (expert gate/up/down or attention q/k/v/o)."""
        H, I = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        dims = {"gate": (H, I), "up": (H, I), "down": (I, H),
                "q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H)}
        if proj not in dims:
            raise ValueError(f"unknown projection '{proj}'")
        return dims[proj]


def weights_fingerprint(model_dir: str | Path, full_below: int = 64 << 20, window: int = 1 << 20) -> str | None:
    """A cheap identity for a base model's weights (sha256[:16]) that adapters record, so that
    an adapter served on other weights of the same shape can be told apart. Files under 64 MiB
    are hashed whole; larger ones by name, size, header (tensor names, shapes, offsets) and three
    1 MiB windows of data (start, middle, end), a few MiB per file even for OLMoE-1B-7B: any
    retraining changes those windows. None when the folder holds no safetensors."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if size < full_below:
                h.update(fh.read())
                continue
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, size)))
            for pos in sorted({8 + n, max(8 + n, size // 2), max(8 + n, size - window)}):
                fh.seek(pos)
                h.update(fh.read(window))
    return h.hexdigest()[:16]
