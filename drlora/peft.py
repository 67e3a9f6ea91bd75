"""Convert between drlora adapters and PEFT (0.21) LoRA folders on transformers-v5 MoE models
(OLMoE, Qwen3-MoE, Qwen2-MoE, Mixtral: all keep their experts at `mlp.experts` in v5).

PEFT's expert LoRA targets the fused parameters (`target_parameters`), one rank r for all
experts (layout checked against peft 0.21.2, see tests/train/test_peft.py):
- `mlp.experts.gate_up_proj` (E, 2I, H): lora_A (r*E, H) -> (E, r, H); lora_B (2I, r*E) ->
  (2I, r, E), expert index fastest; delta_e = scaling * B[:, :, e] @ A[e].
- `mlp.experts.down_proj` (E, H, I): lora_A (r*E, I), lora_B (H, r*E), same reshapes.
- saved keys: `base_model.model.model.layers.{l}.mlp.experts[.base_layer].lora_{A,B}.weight`;
  with both targets gate_up is the inner wrapper (`experts.base_layer`). The two are told
  apart by shape (gate_up: in H, out 2I; down: in I, out H), never by nesting.
- scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).
gate and up share one LoRA in PEFT, so drlora -> PEFT stacks them: A = [A_gate; A_up] and
B = [[B_gate, 0], [0, B_up]], rank r_gate + r_up; an adapter without `gate` exports zero
gate rows. Every expert is zero-padded to one rank r (the largest needed).
Dense LoRA (attention q/k/v/o_proj, a Qwen2-MoE shared expert's gate/up/down_proj) is a plain
PEFT `target_modules` LoRA (`self_attn.q_proj`, `mlp.shared_expert.gate_proj`, ...): lora_A
(r, in), lora_B (out, r), exported at the same rank r (zero-padded; PEFT has one r). Dense-MLP
layers (Qwen3-MoE `mlp_only_layers`) have no experts and get no expert tensors.

Import only needs torch, safetensors and drlora: the serving engine calls `peft_to_drlora`.

# E experts, R rank, H hidden, I intermediate
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from drlora.adapter_format import (CONFIG_NAME, DENSE_PROJS, SHARED_PROJS, WEIGHTS_NAME, AdapterConfig,
                                   AdapterFormatError, key, read_adapter, save_tensors, write_adapter)
from drlora.models import MoeShape

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# what an adapter folder is read from, per format: drlora's, or PEFT's (converted on load)
ADAPTER_FILE_PAIRS = ((CONFIG_NAME, WEIGHTS_NAME), (PEFT_CONFIG, PEFT_WEIGHTS))
ADAPTER_FILES = tuple(f for pair in ADAPTER_FILE_PAIRS for f in pair)
PREFIX = "base_model.model.model.layers"
_EXPERT_KEY = re.compile(r"layers\.(\d+)\.mlp\.experts\.(?:base_layer\.)?lora_([AB])\.weight$")
_DENSE_KEY = re.compile(r"layers\.(\d+)\.self_attn\.([qkvo]_proj)\.lora_([AB])(?:\.default)?\.weight$")
_SHARED_KEY = re.compile(r"layers\.(\d+)\.mlp\.shared_expert\.(gate|up|down)_proj\.lora_([AB])(?:\.default)?\.weight$")


def module_name(l: int, proj: str) -> str:
    """PEFT module path (below base_model.model.model.layers) of a dense projection."""
    if proj in SHARED_PROJS:
        return f"{l}.mlp.shared_expert.{proj[len('shared_'):]}_proj"
    return f"{l}.self_attn.{proj}"


def target_module(proj: str) -> str:
    """PEFT target_modules entry: matched as a suffix of module names, so the shared expert's
    needs its parent (a dense-MLP layer's own mlp.gate_proj must not match)."""
    return f"shared_expert.{proj[len('shared_'):]}_proj" if proj in SHARED_PROJS else proj


def _per_expert(ad, l: int, p: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(A_e (r_e, in), B_e (out, r_e))] of one layer and projection."""
    A, B, ranks = ad.expert_lora(l, p)
    out, off = [], 0
    for r in ranks:
        out.append((A[off:off + r].float(), B[:, off:off + r].float()))
        off += r
    return out


def drlora_to_peft(ad) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json dict, tensors) of a PEFT folder equal to the drlora adapter."""
    cfg: AdapterConfig = ad.config
    s = cfg.base_shape
    E, H, I = s.num_experts, s.hidden_size, s.intermediate_size
    if cfg.train_router:
        raise AdapterFormatError("export to PEFT does not carry a trained router (PEFT would need modules_to_save)")
    has_gu = any(p in cfg.ranks for p in ("gate", "up"))
    has_d = "down" in cfg.ranks
    r_gu = int((cfg.expert_ranks("gate") + cfg.expert_ranks("up")).max()) if has_gu else 0
    r_d = int(cfg.expert_ranks("down").max()) if has_d else 0
    r = max([r_gu, r_d, 1] + [max(v) for v in cfg.dense_ranks.values()])
    tensors: dict[str, torch.Tensor] = {}
    for p, per_layer in cfg.dense_ranks.items():
        i, o = s.proj_dims(p)
        for l, rl in enumerate(per_layer):
            if p in SHARED_PROJS and not s.is_sparse(l):
                continue
            A, B = torch.zeros(r, i), torch.zeros(o, r)
            a, b = ad.dense_lora(l, p)
            A[:rl], B[:, :rl] = a.float(), b.float()
            tensors[f"{PREFIX}.{module_name(l, p)}.lora_A.weight"] = A
            tensors[f"{PREFIX}.{module_name(l, p)}.lora_B.weight"] = B
    for l in s.sparse_layers:
        if has_gu:
            A = torch.zeros(E, r, H)  # E, R, H
            B = torch.zeros(2 * I, r, E)  # 2I, R, E
            gate = _per_expert(ad, l, "gate") if "gate" in cfg.ranks else [(torch.zeros(0, H), torch.zeros(I, 0))] * E
            up = _per_expert(ad, l, "up") if "up" in cfg.ranks else [(torch.zeros(0, H), torch.zeros(I, 0))] * E
            for e in range(E):
                (ag, bg), (au, bu) = gate[e], up[e]
                rg, ru = ag.shape[0], au.shape[0]
                A[e, :rg], A[e, rg:rg + ru] = ag, au
                B[:I, :rg, e], B[I:, rg:rg + ru, e] = bg, bu
            inner = ".base_layer" if has_d else ""
            tensors[f"{PREFIX}.{l}.mlp.experts{inner}.lora_A.weight"] = A.reshape(E * r, H)
            tensors[f"{PREFIX}.{l}.mlp.experts{inner}.lora_B.weight"] = B.reshape(2 * I, r * E)
        if has_d:
            A = torch.zeros(E, r, I)
            B = torch.zeros(H, r, E)
            for e, (a, b) in enumerate(_per_expert(ad, l, "down")):
                A[e, :a.shape[0]], B[:, :a.shape[0], e] = a, b
            tensors[f"{PREFIX}.{l}.mlp.experts.lora_A.weight"] = A.reshape(E * r, I)
            tensors[f"{PREFIX}.{l}.mlp.experts.lora_B.weight"] = B.reshape(H, r * E)
    targets = (["mlp.experts.gate_up_proj"] if has_gu else []) + (["mlp.experts.down_proj"] if has_d else [])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": cfg.base_model,
              "r": r, "lora_alpha": cfg.scaling * r, "lora_dropout": 0.0, "bias": "none",
              "target_modules": [target_module(p) for p in cfg.dense_ranks], "target_parameters": targets,
              "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "inference_mode": True,
              "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}}
    return config, tensors


def export_peft(adapter_dir: str | Path, out: str | Path) -> Path:
    ad = read_adapter(adapter_dir)
    config, tensors = drlora_to_peft(ad)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AdapterFormatError(f"{out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    # PEFT ignores safetensors metadata; the exact ranks there make the round trip exact even
    # for ranks whose B is still zero (which the zero-padding rule would otherwise drop)
    meta = {"format": "pt", "drlora_ranks": json.dumps(ad.config.ranks),
            "drlora_dense_ranks": json.dumps(ad.config.dense_ranks)}
    # each file through a rename, weights first (as write_adapter), readable per the umask
    save_tensors(out / PEFT_WEIGHTS, {k: v.contiguous() for k, v in tensors.items()}, meta)
    tmp = out / (PEFT_CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=1))
    tmp.replace(out / PEFT_CONFIG)
    return out


def _scale(pc: dict, name: str, r: int) -> float:
    """PEFT's scaling for one module (alpha_pattern / rank_pattern keys are regex suffixes)."""
    alpha = pc.get("lora_alpha", 8)
    for pat, a in (pc.get("alpha_pattern") or {}).items():
        if re.search(pat, name):
            alpha = a
    return alpha / math.sqrt(r) if pc.get("use_rslora") else alpha / r


def _compact(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop ranks that contribute nothing (zero A row or zero B column): zero padding."""
    keep = (A.abs().sum(1) > 0) & (B.abs().sum(0) > 0)
    return A[keep], B[:, keep]


def peft_to_drlora(peft_dir: str | Path, base_shape: MoeShape) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """A PEFT LoRA folder (expert `target_parameters` and/or attention q/k/v/o_proj) as a
    drlora adapter. Ranks: exact when the file carries our export's `drlora_ranks` metadata,
    else zero padding (zero A row or zero B column: a no-op rank) is dropped."""
    peft_dir = Path(peft_dir)
    try:
        pc = json.loads((peft_dir / PEFT_CONFIG).read_text())
        raw = load_file(str(peft_dir / PEFT_WEIGHTS))
        with safe_open(str(peft_dir / PEFT_WEIGHTS), "pt") as f:
            meta = f.metadata() or {}
        exact = json.loads(meta.get("drlora_ranks", "null"))
        exact_dense = json.loads(meta.get("drlora_dense_ranks", "null"))
    except FileNotFoundError as exc:
        raise AdapterFormatError(f"{peft_dir} is not a PEFT adapter folder ({Path(exc.filename).name} missing)") from None
    except (json.JSONDecodeError, Exception) as exc:  # safetensors raises its own errors
        raise AdapterFormatError(f"{peft_dir}: unreadable PEFT adapter ({exc})") from None
    if pc.get("peft_type", "LORA") != "LORA" or pc.get("use_dora"):
        raise AdapterFormatError(f"{peft_dir}: only plain LoRA can be imported (got {pc.get('peft_type')}, dora={pc.get('use_dora')})")
    s = base_shape
    L, E, H, I = s.num_hidden_layers, s.num_experts, s.hidden_size, s.intermediate_size
    pairs: dict[tuple, dict[str, torch.Tensor]] = {}
    for k, v in raw.items():
        if m := _EXPERT_KEY.search(k):  # grouped by key prefix; classified by shape below
            pairs.setdefault(("expert", int(m.group(1)), k[:m.start(2) - 5]), {})[m.group(2)] = v.float()
        elif m := _DENSE_KEY.search(k):
            pairs.setdefault(("dense", int(m.group(1)), m.group(2)), {})[m.group(3)] = v.float()
        elif m := _SHARED_KEY.search(k):
            if not s.shared_expert_intermediate_size:
                raise AdapterFormatError(f"{peft_dir}: tensor {k} targets a shared expert but the base has none")
            pairs.setdefault(("dense", int(m.group(1)), "shared_" + m.group(2)), {})[m.group(3)] = v.float()
        else:
            raise AdapterFormatError(f"{peft_dir}: tensor {k} is not an expert, attention or shared-expert LoRA")
    for pk in [k for k in pairs if k[0] == "expert"]:
        d = pairs.pop(pk)
        if set(d) != {"A", "B"}:
            raise AdapterFormatError(f"{peft_dir}: {pk[2]} lacks lora_A or lora_B")
        # gate_up: A (r*E, H), B (2I, r*E); down: A (r*E, I), B (H, r*E); (H, 2I) != (I, H) always
        dims = (d["A"].shape[1], d["B"].shape[0])
        proj = {(H, 2 * I): "gate_up", (I, H): "down"}.get(dims)
        if proj is None:
            raise AdapterFormatError(f"{peft_dir}: {pk[2]} has shapes {dims} that fit no expert projection")
        pairs[("expert", pk[1], proj)] = d
    if not pairs:
        raise AdapterFormatError(f"{peft_dir}: no LoRA tensors")
    base_r = int(pc.get("r", 8))
    scaling = _scale(pc, "", base_r)
    parts: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    dense: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for (kind, l, proj), d in sorted(pairs.items()):
        if set(d) != {"A", "B"} or l >= L:
            raise AdapterFormatError(f"{peft_dir}: layer {l} {proj} lacks lora_A or lora_B, or is out of range")
        A, B = d["A"], d["B"]
        if kind == "dense":
            r = A.shape[0]
            B = B * (_scale(pc, f"layers.{module_name(l, proj)}", r) / scaling)
            if exact_dense is not None and proj in exact_dense:
                rk = exact_dense[proj][l]
                dense[(l, proj)] = (A[:rk], B[:, :rk])
            else:
                dense[(l, proj)] = _compact(A, B)
            continue
        r = A.shape[0] // E
        A, B = A.reshape(E, r, -1), B.reshape(B.shape[0], r, E)  # E, R, in ; out, R, E
        B = B * (_scale(pc, f"layers.{l}.mlp.experts.{proj}", r) / scaling)
        names = [("gate", slice(0, I)), ("up", slice(I, 2 * I))] if proj == "gate_up" else [("down", slice(None))]
        first = [0] * E  # drlora layout: per expert, gate ranks, then up ranks, then padding
        for p, rows in names:
            if exact is not None:
                rk = exact[p][l] if p in exact else [0] * E
                parts[(l, p)] = [(A[e, first[e]:first[e] + rk[e]], B[rows, first[e]:first[e] + rk[e], e])
                                 for e in range(E)]
                first = [f + x for f, x in zip(first, rk)]
                if max(first) > r:
                    raise AdapterFormatError(f"{peft_dir}: drlora_ranks metadata exceeds the stored rank {r}")
            else:
                parts[(l, p)] = [_compact(A[e], B[rows, :, e]) for e in range(E)]
    ranks: dict[str, list[list[int]]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for p in ("gate", "up", "down"):
        if not any(k[1] == p for k in parts):
            continue
        if all(a.shape[0] == 0 for (l, q), v in parts.items() if q == p for a, _ in v):
            if exact is None or p not in exact:
                continue  # e.g. the zero gate rows of an up-only export
        ranks[p] = []
        i, o = s.proj_dims(p)
        for l in range(L):
            per = parts.get((l, p), [(torch.zeros(0, i), torch.zeros(o, 0))] * E)
            ranks[p].append([a.shape[0] for a, _ in per])
            if s.is_sparse(l):  # a dense-MLP layer stores no expert tensors
                tensors[key(l, p, "lora_A")] = torch.cat([a for a, _ in per])
                tensors[key(l, p, "lora_B")] = torch.cat([b for _, b in per], 1)
    dense_ranks: dict[str, list[int]] = {}
    for p in DENSE_PROJS:
        if not any(k[1] == p for k in dense):
            continue
        i, o = s.proj_dims(p)
        dense_ranks[p] = []
        for l in range(L):
            A, B = dense.get((l, p), (torch.zeros(0, i), torch.zeros(o, 0)))
            dense_ranks[p].append(A.shape[0])
            if p not in SHARED_PROJS or s.is_sparse(l):
                tensors[key(l, p, "lora_A")], tensors[key(l, p, "lora_B")] = A, B
    cfg = AdapterConfig(base_model=str(pc.get("base_model_name_or_path") or "unknown"), base_shape=s,
                        method="peft-import", scaling=float(scaling), ranks=ranks, dense_ranks=dense_ranks,
                        provenance={"imported_from": str(peft_dir.resolve()), "peft_r": base_r,
                                    "peft_lora_alpha": pc.get("lora_alpha"),
                                    "peft_version": pc.get("peft_version")})
    return cfg, tensors


def import_peft(peft_dir: str | Path, out: str | Path, model: str | None = None) -> Path:
    """CLI helper: resolve the base model's shape, convert, write a drlora adapter folder."""
    from drlora.models import resolve_model

    pc = json.loads((Path(peft_dir) / PEFT_CONFIG).read_text()) if (Path(peft_dir) / PEFT_CONFIG).is_file() else {}
    spec = model or pc.get("base_model_name_or_path")
    if not spec:
        raise AdapterFormatError("the PEFT config names no base model: pass --model")
    cfg, tensors = peft_to_drlora(peft_dir, MoeShape.from_model_dir(resolve_model(spec)))
    if model:
        cfg.base_model = model
    return write_adapter(out, cfg, tensors)
