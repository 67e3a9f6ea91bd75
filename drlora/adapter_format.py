"""The drlora adapter format: the one place that writes, reads and validates adapters.

An adapter is a folder with two files:

- `drlora_adapter.json`: format id and version, base model (name and shape), method,
  scaling, target projections, the rank of every (layer, expert, projection), optional dense
  (attention) LoRA ranks per layer, dtype and training provenance.
- `drlora_adapter.safetensors`: only the active ranks, packed per (layer, projection):
  `layers.{l}.experts.{p}.lora_A` (sum_e r[l,e,p], in) and `layers.{l}.experts.{p}.lora_B`
  (out, sum_e r[l,e,p]); expert e owns rows / columns [off_e, off_e + r[l,e,p]) with off the
  running sum over experts 0..e-1. Dense LoRA: `layers.{l}.self_attn.{q,k,v,o}_proj.lora_A`
  (r, in) / `.lora_B` (out, r), and on a Qwen2-MoE shared expert
  `layers.{l}.shared_expert.{gate,up,down}.lora_A` / `.lora_B` (projections `shared_gate`,
  `shared_up`, `shared_down`). A trained router: `layers.{l}.router.weight` (E, H), which
  replaces the base router of that layer. Layers without experts (Qwen MoE dense-MLP layers,
  `base_shape.dense_layers`) have rank 0 for every expert and no expert, shared or router
  tensors (attention LoRA is allowed on every layer).

The delta of expert e on projection p is `scaling * B_e @ A_e`. File names differ from
PEFT's (`adapter_config.json`) on purpose so that PEFT and vLLM never mistake ours for theirs.
Spec: docs/adapter-format.md.
"""

from __future__ import annotations

import json
import math
import os
import struct
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from drlora.models import MoeShape

FORMAT_ID = "drlora-moe-lora"
FORMAT_VERSION = 1
CONFIG_NAME = "drlora_adapter.json"
WEIGHTS_NAME = "drlora_adapter.safetensors"
EXPERT_PROJS = ("gate", "up", "down")
ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
SHARED_PROJS = ("shared_gate", "shared_up", "shared_down")  # Qwen2-MoE's shared expert
DENSE_PROJS = ATTN_PROJS + SHARED_PROJS  # one rank per layer (`dense_ranks`)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AdapterFormatError(ValueError):
    """An adapter folder is missing, malformed or does not fit the base model."""


class NotAnAdapterError(AdapterFormatError):
    """The path holds no adapter of any known kind."""


@dataclass
class AdapterConfig:
    base_model: str
    base_shape: MoeShape
    method: str
    scaling: float
    # ranks[p][l][e]: rank of expert e of layer l on projection p (p in targets)
    ranks: dict[str, list[list[int]]]
    dense_ranks: dict[str, list[int]] = field(default_factory=dict)  # p -> rank per layer
    train_router: bool = False
    dtype: str = "float32"
    provenance: dict = field(default_factory=dict)
    format: str = FORMAT_ID
    format_version: int = FORMAT_VERSION
    # random per write_adapter call, also in the weights' metadata: a reader that catches a
    # rewrite between the two renames sees two ids and refuses ("" in adapters from before)
    write_id: str = ""

    @property
    def targets(self) -> list[str]:
        return [p for p in EXPERT_PROJS if p in self.ranks]

    def expert_ranks(self, proj: str) -> torch.Tensor:
        """(L, E) int64 ranks of one projection (zeros if not targeted)."""
        if proj not in self.ranks:
            return torch.zeros(self.base_shape.num_hidden_layers, self.base_shape.num_experts,
                               dtype=torch.long)
        return torch.tensor(self.ranks[proj], dtype=torch.long)

    def total_ranks(self) -> int:
        return int(sum(sum(map(sum, r)) for r in self.ranks.values()) +
                   sum(sum(r) for r in self.dense_ranks.values()))

    def num_parameters(self) -> int:
        n = 0
        for p, r in self.ranks.items():
            i, o = self.base_shape.proj_dims(p)
            n += sum(map(sum, r)) * (i + o)
        for p, r in self.dense_ranks.items():
            i, o = self.base_shape.proj_dims(p)
            n += sum(r) * (i + o)
        if self.train_router:
            s = self.base_shape
            n += len(s.sparse_layers) * s.num_experts * s.hidden_size
        return n

    def to_json(self) -> dict:
        d = asdict(self)
        d["base_shape"] = shape_json(self.base_shape)
        if not d["write_id"]:
            del d["write_id"]
        return d

    @classmethod
    def from_json(cls, d: dict, where: str = "config") -> AdapterConfig:
        try:
            if d.get("format") != FORMAT_ID:
                raise AdapterFormatError(f"{where}: 'format' is {d.get('format')!r}, expected {FORMAT_ID!r}")
            if int(d.get("format_version", 0)) > FORMAT_VERSION:
                raise AdapterFormatError(
                    f"{where}: format_version {d['format_version']} is newer than this drlora "
                    f"understands ({FORMAT_VERSION})")
            d = dict(d)
            d["base_shape"] = MoeShape(**d["base_shape"])
            return cls(**d)
        except AdapterFormatError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterFormatError(f"{where}: malformed adapter config ({exc})") from None


def shape_json(shape: MoeShape) -> dict:
    """base_shape as written: the Qwen MoE fields only when set, so that an OLMoE (or Mixtral)
    adapter's config is exactly what drlora wrote before those fields existed."""
    d = asdict(shape)
    d["dense_layers"] = list(shape.dense_layers)
    for k, default in (("shared_expert_intermediate_size", 0), ("dense_layers", [])):
        if d[k] == default:
            del d[k]
    return d


@dataclass
class Adapter:
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    path: Path | None = None

    def expert_lora(self, layer: int, proj: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Packed (A (R, in), B (out, R), ranks per expert) of one layer and projection (empty
        on a dense-MLP layer, which stores no expert tensors)."""
        ranks = self.config.ranks[proj][layer]
        if not self.config.base_shape.is_sparse(layer):
            i, o = self.config.base_shape.proj_dims(proj)
            return torch.zeros(0, i), torch.zeros(o, 0), ranks
        return self.tensors[key(layer, proj, "lora_A")], self.tensors[key(layer, proj, "lora_B")], ranks

    def expert_delta(self, layer: int, proj: str) -> torch.Tensor:
        """Dense (E, out, in) delta `scaling * B_e @ A_e` for every expert (for tests/merging)."""
        A, B, ranks = self.expert_lora(layer, proj)
        i, o = self.config.base_shape.proj_dims(proj)
        out = torch.zeros(len(ranks), o, i, dtype=torch.float32)
        off = 0
        for e, r in enumerate(ranks):
            out[e] = B[:, off:off + r].float() @ A[off:off + r].float()
            off += r
        return out * self.config.scaling

    def dense_lora(self, layer: int, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        if proj in SHARED_PROJS and not self.config.base_shape.is_sparse(layer):
            i, o = self.config.base_shape.proj_dims(proj)
            return torch.zeros(0, i), torch.zeros(o, 0)
        return self.tensors[key(layer, proj, "lora_A")], self.tensors[key(layer, proj, "lora_B")]

    def router_weight(self, layer: int) -> torch.Tensor | None:
        return self.tensors.get(f"layers.{layer}.router.weight")


def key(layer: int, proj: str, which: str) -> str:
    """Tensor name in the safetensors file; which in {lora_A, lora_B}."""
    if proj in EXPERT_PROJS:
        return f"layers.{layer}.experts.{proj}.{which}"
    if proj in ATTN_PROJS:
        return f"layers.{layer}.self_attn.{proj}.{which}"
    if proj in SHARED_PROJS:
        return f"layers.{layer}.shared_expert.{proj[len('shared_'):]}.{which}"
    raise ValueError(f"unknown projection '{proj}'")


def expected_shapes(cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    s = cfg.base_shape
    for p, per_layer in cfg.ranks.items():
        i, o = s.proj_dims(p)
        for l, ranks in enumerate(per_layer):
            if not s.is_sparse(l):
                continue  # a dense-MLP layer: no expert tensors at all
            R = sum(ranks)
            shapes[key(l, p, "lora_A")] = (R, i)
            shapes[key(l, p, "lora_B")] = (o, R)
    for p, ranks in cfg.dense_ranks.items():
        i, o = s.proj_dims(p)
        for l, r in enumerate(ranks):
            if p in SHARED_PROJS and not s.is_sparse(l):
                continue  # no shared expert on a dense-MLP layer
            shapes[key(l, p, "lora_A")] = (r, i)
            shapes[key(l, p, "lora_B")] = (o, r)
    if cfg.train_router:
        for l in s.sparse_layers:
            shapes[f"layers.{l}.router.weight"] = (s.num_experts, s.hidden_size)
    return shapes


def _count(x) -> bool:
    """A non-negative integer, and not a JSON boolean (Python's True is an int)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_config(cfg: AdapterConfig) -> None:
    s = cfg.base_shape
    L, E = s.num_hidden_layers, s.num_experts
    if not cfg.ranks and not cfg.dense_ranks and not cfg.train_router:
        raise AdapterFormatError("adapter targets no projection")
    for p, per_layer in cfg.ranks.items():
        if p not in EXPERT_PROJS:
            raise AdapterFormatError(f"unknown expert projection '{p}' (expected one of {EXPERT_PROJS})")
        if len(per_layer) != L or any(len(r) != E for r in per_layer):
            raise AdapterFormatError(f"ranks['{p}'] must be {L} layers x {E} experts")
        if any(not _count(x) for r in per_layer for x in r):
            raise AdapterFormatError(f"ranks['{p}'] must hold non-negative integers")
        for l in s.dense_layers:
            if l < L and any(per_layer[l]):
                raise AdapterFormatError(f"ranks['{p}'] gives experts to layer {l}, a dense-MLP layer of this base")
    for p, ranks in cfg.dense_ranks.items():
        if p not in DENSE_PROJS:
            raise AdapterFormatError(f"unknown dense projection '{p}' (expected one of {DENSE_PROJS})")
        if p not in s.dense_projs():
            raise AdapterFormatError(f"dense_ranks['{p}']: the base ({s.model_type}) has no shared expert")
        if len(ranks) != L or any(not _count(x) for x in ranks):
            raise AdapterFormatError(f"dense_ranks['{p}'] must be {L} non-negative integers")
        if p in SHARED_PROJS and any(ranks[l] for l in s.dense_layers if l < L):
            raise AdapterFormatError(f"dense_ranks['{p}'] is non-zero on a dense-MLP layer (no shared expert there)")
    if not (isinstance(cfg.scaling, (int, float)) and math.isfinite(cfg.scaling)):
        raise AdapterFormatError(f"scaling must be a finite number, got {cfg.scaling!r}")
    if cfg.dtype not in DTYPES:
        raise AdapterFormatError(f"dtype '{cfg.dtype}' not one of {list(DTYPES)}")


def check_base(cfg: AdapterConfig, base: MoeShape) -> None:
    """Refuse an adapter whose family or shapes do not fit the base model."""
    a = cfg.base_shape
    for f in ("model_type", "num_hidden_layers", "num_experts", "hidden_size", "intermediate_size",
              "num_attention_heads", "num_key_value_heads", "head_dim", "shared_expert_intermediate_size",
              "dense_layers"):
        if getattr(a, f) != getattr(base, f):
            raise AdapterFormatError(
                f"adapter was made for {f}={getattr(a, f)} but the base model has {getattr(base, f)}")


WRITE_ID_KEY = "drlora_write_id"  # safetensors metadata key of AdapterConfig.write_id


def umask_mode(mode: int = 0o666) -> int:
    """`mode` as the process umask leaves it for a new file (what open() would create)."""
    try:  # Linux: read it without setting it (os.umask would change it for other threads a moment)
        with open("/proc/self/status") as f:
            mask = next(int(l.split()[1], 8) for l in f if l.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return mode & ~mask


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """save_file through a temporary file and a rename. safetensors creates its file 0600; the
    temporary gets the umask's mode first, so a server running as another user can read it."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, umask_mode())
    tmp.replace(path)


def write_adapter(path: str | Path, cfg: AdapterConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Validate and write an adapter folder: weights first, config last, each through a rename.
    Both carry one fresh write id; read_adapter refuses a folder caught between the renames
    of a rewrite (new weights, old config)."""
    path = Path(path)
    _check_config(cfg)
    _check_tensors(cfg, tensors)
    path.mkdir(parents=True, exist_ok=True)
    dt = DTYPES[cfg.dtype]
    out = {k: v.detach().to("cpu", dt).contiguous() for k, v in tensors.items()}
    wid = uuid.uuid4().hex
    save_tensors(path / WEIGHTS_NAME, out, {"format": FORMAT_ID, "format_version": str(FORMAT_VERSION),
                                            WRITE_ID_KEY: wid})
    tmp = path / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps({**cfg.to_json(), "write_id": wid}, indent=1))
    tmp.replace(path / CONFIG_NAME)
    return path


def _check_tensors(cfg: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing:
        raise AdapterFormatError(f"missing tensor {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise AdapterFormatError(f"unexpected tensor {extra[0]} (not implied by the ranks)")
    for k, shape in want.items():
        t = tensors[k]
        if tuple(t.shape) != shape:
            raise AdapterFormatError(f"tensor {k} has shape {tuple(t.shape)}, ranks imply {shape}")
        if not t.is_floating_point():  # (integer weights would load, truncated to nothing)
            raise AdapterFormatError(f"tensor {k} is {str(t.dtype).removeprefix('torch.')}, not floating point")
        if not torch.isfinite(t).all():
            raise AdapterFormatError(f"tensor {k} holds NaN or inf")


def _read_safetensors_header(path: Path) -> dict:
    """Parse the safetensors header without loading tensors; refuse anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("file too short")
            n = struct.unpack("<Q", head)[0]
            if n > 100_000_000 or n > path.stat().st_size - 8:
                raise ValueError("bad header length")
            return json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise AdapterFormatError(f"{path.name} is not a safetensors file ({exc})") from None


def _write_id(header: dict) -> str:
    meta = header.get("__metadata__")
    return str(meta.get(WRITE_ID_KEY, "")) if isinstance(meta, dict) else ""


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def load_config(path: str | Path) -> AdapterConfig:
    path = Path(path)
    if not path.is_dir():
        raise NotAnAdapterError(f"{path} is not a folder")
    if not (path / CONFIG_NAME).is_file():
        raise NotAnAdapterError(f"{path} has no {CONFIG_NAME}")
    try:
        d = json.loads((path / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise AdapterFormatError(f"{CONFIG_NAME} must hold a JSON object")
    cfg = AdapterConfig.from_json(d, where=CONFIG_NAME)
    _check_config(cfg)
    return cfg


def read_adapter(path: str | Path, base: MoeShape | None = None) -> Adapter:
    """Read and fully validate an adapter folder (on CPU)."""
    path = Path(path)
    cfg = load_config(path)
    if base is not None:
        check_base(cfg, base)
    wpath = path / WEIGHTS_NAME
    if not wpath.is_file():
        others = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found {others[0]}: only safetensors weights are accepted)" if others else ""
        raise AdapterFormatError(f"{path} has no {WEIGHTS_NAME}{hint}")
    before = _write_id(_read_safetensors_header(wpath))
    try:
        tensors = load_file(str(wpath))
    except Exception as exc:
        raise AdapterFormatError(f"{WEIGHTS_NAME} could not be read ({exc})") from None
    # every write has a fresh id, so the same id before and after load_file means load_file
    # read that file (not one renamed in meanwhile)
    after = _write_id(_read_safetensors_header(wpath))
    if cfg.write_id and (before != after or (before and before != cfg.write_id)):
        raise AdapterFormatError(
            f"{path} is being rewritten: config and weights come from different writes "
            f"(write ids {cfg.write_id} and {after}); read it again when the write is done")
    _check_tensors(cfg, tensors)
    return Adapter(cfg, tensors, path)


def validate_adapter(path: str | Path, base: MoeShape | None = None) -> AdapterConfig:
    """Raise AdapterFormatError naming the problem, else return the config."""
    return read_adapter(path, base).config
