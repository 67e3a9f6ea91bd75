"""model_type (config.json) -> serving model class. Every supported family shares the routed-
expert decoder in models/moe.py; their differences are described in drlora.families."""

from __future__ import annotations

import importlib

_MODELS = {
    "olmoe": ("drlora_serve.models.olmoe", "OlmoeForServing"),
    "qwen3_moe": ("drlora_serve.models.moe", "MoeForServing"),
    "qwen2_moe": ("drlora_serve.models.moe", "MoeForServing"),
    "mixtral": ("drlora_serve.models.moe", "MoeForServing"),
}


def register_model(model_type: str, module: str, cls: str) -> None:
    _MODELS[model_type] = (module, cls)


def get_model_class(model_type: str):
    if model_type not in _MODELS:
        raise ValueError(f"model_type '{model_type}' is not supported by the engine "
                         f"(supported: {', '.join(sorted(_MODELS))})")
    module, cls = _MODELS[model_type]
    return getattr(importlib.import_module(module), cls)


def supported_model_types() -> list[str]:
    return sorted(_MODELS)


def load_model_class(path: str):
    """A model class from an import path `module:Class` (out-of-tree models; the host-overhead
    benchmark's stub). It needs what the registry's classes have: `from_pretrained(dir, config,
    dtype, device)` and/or `random(config, dtype, device, seed)`, `forward(ids, ctx)`,
    `compute_logits`, `kv_caches`, `max_positions`."""
    module, sep, cls = path.partition(":")
    if not sep or not module or not cls:
        raise ValueError(f"model class {path!r}: expected module:Class")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model class {path!r} cannot be imported: {exc}") from None
