"""Resolve a `--model` argument to a local Hugging Face folder.

Accepted: `tiny` (built or shipped by the project), an alias (`olmoe`, `olmoe-instruct`,
`qwen3-moe`, `qwen2-moe`, `mixtral`), a local folder holding config.json, or a hub id (from the
local HF cache, else downloaded where the hub is reachable). With `dummy=True` (the engine's
`--load-format dummy`) an alias resolves to a folder holding only the real model's config (a
preset below) and the bundled tiny tokenizer: random weights at the real shape, no download.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

ALIASES = {
    "olmoe": "allenai/OLMoE-1B-7B-0125",
    "olmoe-instruct": "allenai/OLMoE-1B-7B-0125-Instruct",
    "qwen3-moe": "Qwen/Qwen3-30B-A3B",
    "qwen2-moe": "Qwen/Qwen1.5-MoE-A2.7B",
    "mixtral": "mistralai/Mixtral-8x7B-v0.1",
}
# allenai/OLMoE-1B-7B-0125's config.json (the fields the engine reads): benchmarks at the real
# shape with random weights (`--load-format dummy`), no download.
OLMOE_1B_7B = dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                   num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                   num_experts_per_tok=8, max_position_embeddings=4096, rms_norm_eps=1e-5, norm_topk_prob=False,
                   clip_qkv=None, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                   tie_word_embeddings=False, eos_token_id=50279, pad_token_id=1, bos_token_id=None)
# Qwen/Qwen3-30B-A3B's config.json: 48 layers x 128 experts (top 8, renormalised), per-head q/k norm,
# GQA 32/4 heads of 128.
QWEN3_30B_A3B = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                     moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                     head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                     decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, rope_scaling=None, attention_bias=False, use_sliding_window=False,
                     sliding_window=None, max_window_layers=48, hidden_act="silu", tie_word_embeddings=False,
                     bos_token_id=151643, eos_token_id=151645)
# Qwen/Qwen1.5-MoE-A2.7B's config.json: 24 layers x 60 experts (top 4) and a shared expert of 5632.
QWEN15_MOE_A27B = dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                       moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
                       norm_topk_prob=False, decoder_sparse_step=1, max_position_embeddings=8192,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False, sliding_window=32768,
                       max_window_layers=21, hidden_act="silu", tie_word_embeddings=False,
                       bos_token_id=151643, eos_token_id=151643)
# mistralai/Mixtral-8x7B-v0.1's config.json: 32 layers x 8 experts (top 2), GQA 32/8.
MIXTRAL_8X7B = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                    num_experts_per_tok=2, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
                    sliding_window=None, hidden_act="silu", tie_word_embeddings=False, bos_token_id=1,
                    eos_token_id=2)
PRESETS = {"olmoe": OLMOE_1B_7B, "qwen3-moe": QWEN3_30B_A3B, "qwen2-moe": QWEN15_MOE_A27B, "mixtral": MIXTRAL_8X7B}

# random tiny checkpoints of the other families (drlora/tiny_families.py)
TINY_FAMILIES = {"tiny-qwen3-moe": "qwen3_moe", "tiny-qwen2-moe": "qwen2_moe", "tiny-mixtral": "mixtral"}

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]


class ModelNotFoundError(RuntimeError):
    """The model could not be found or fetched; the message names what was tried."""


def dummy_model_dir(alias: str) -> Path:
    """A folder (under the drlora cache) with a preset's config.json and the bundled tiny tokenizer
    (its ids fit every vocabulary): what `--load-format dummy` needs, nothing downloaded."""
    import shutil

    from drlora.tiny import ASSET_DIR, cache_root

    if alias not in PRESETS:
        raise ModelNotFoundError(f"no preset config for '{alias}' (presets: {', '.join(PRESETS)})")
    cfg = dict(PRESETS[alias])
    folder = cache_root() / "dummy" / alias
    folder.mkdir(parents=True, exist_ok=True)
    for f in ASSET_DIR.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def resolve_model(spec: str, dummy: bool = False) -> Path:
    """Local folder of `spec`; with dummy, an alias with a preset gives `dummy_model_dir`."""
    if dummy and spec in PRESETS and not Path(spec).expanduser().exists():
        return dummy_model_dir(spec)
    if spec == "tiny":
        from drlora.tiny import ensure_tiny

        return ensure_tiny()
    if spec in TINY_FAMILIES:  # random tiny Qwen3-MoE / Qwen2-MoE / Mixtral, built once
        from drlora.tiny_families import ensure_tiny_family

        return ensure_tiny_family(TINY_FAMILIES[spec])
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
            f"(expected owner/name) nor an alias ({', '.join(['tiny', *TINY_FAMILIES, *ALIASES])})"
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
    """The parts of a base model's shape an adapter must agree with. `intermediate_size` is a
    routed expert's; the last two fields (absent from adapters written before they existed,
    which read as their defaults) describe Qwen MoE extras."""

    model_type: str
    num_hidden_layers: int
    num_experts: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert (0: none)
    dense_layers: tuple[int, ...] = ()  # layers whose MLP is dense, without experts (Qwen MoE)

    def __post_init__(self):  # JSON gives a list; keep the shape hashable and comparable
        object.__setattr__(self, "dense_layers", tuple(int(x) for x in self.dense_layers))

    @classmethod
    def from_config(cls, cfg) -> MoeShape:
        from drlora.families import FAMILIES, dense_layers

        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (
            lambda k, d=None: getattr(cfg, k, d)
        )
        heads = get("num_attention_heads")
        fam = FAMILIES.get(get("model_type", "olmoe"))
        size_key = fam.expert_size_key if fam else "moe_intermediate_size"
        return cls(
            model_type=get("model_type", "olmoe"),
            num_hidden_layers=get("num_hidden_layers"),
            num_experts=get("num_experts") or get("num_local_experts"),
            hidden_size=get("hidden_size"),
            intermediate_size=get(size_key) or get("intermediate_size"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or get("hidden_size") // heads,
            shared_expert_intermediate_size=(get("shared_expert_intermediate_size") or 0)
            if fam is not None and fam.shared_expert else 0,
            dense_layers=dense_layers(cfg),
        )

    @classmethod
    def from_model_dir(cls, path: str | Path) -> MoeShape:
        return cls.from_config(json.loads((Path(path) / "config.json").read_text()))

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @property
    def sparse_layers(self) -> list[int]:
        return [l for l in range(self.num_hidden_layers) if l not in self.dense_layers]

    def dense_projs(self) -> tuple[str, ...]:
        """Dense-LoRA projections this base has: attention, plus the shared expert's if any."""
        attn = ("q_proj", "k_proj", "v_proj", "o_proj")
        return attn + (("shared_gate", "shared_up", "shared_down") if self.shared_expert_intermediate_size else ())

    def proj_dims(self, proj: str) -> tuple[int, int]:
        """(in_dim, out_dim) of a projection name (expert gate/up/down, attention q/k/v/o,
        shared expert shared_gate/shared_up/shared_down)."""
        H, I, S = self.hidden_size, self.intermediate_size, self.shared_expert_intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        dims = {"gate": (H, I), "up": (H, I), "down": (I, H),
                "q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H)}
        if S:
            dims |= {"shared_gate": (H, S), "shared_up": (H, S), "shared_down": (S, H)}
        if proj not in dims:
            raise ValueError(f"unknown projection '{proj}'" + (
                " (this base has no shared expert)" if proj.startswith("shared_") else ""))
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
