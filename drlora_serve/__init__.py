"""drlora_serve: the serving engine for MoE LoRA adapters with per-expert ranks.

vLLM's entry points are importable from the package root, as in vLLM:

    from drlora_serve import LLM, SamplingParams

Each name is imported on first access (PEP 562), so `import drlora_serve` stays light: torch
and the model code load only when LLM / LLMEngine / AsyncLLM are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "LLM": ("drlora_serve.llm", "LLM"),
    "LLMEngine": ("drlora_serve.engine", "LLMEngine"),
    "AsyncLLM": ("drlora_serve.async_llm", "AsyncLLM"),
    "AsyncLLMEngine": ("drlora_serve.async_llm", "AsyncLLM"),  # vLLM's older name; one class here
    "EngineArgs": ("drlora_serve.config", "EngineArgs"),
    "AsyncEngineArgs": ("drlora_serve.config", "EngineArgs"),  # vLLM's name; one class here
    "SamplingParams": ("drlora_serve.types", "SamplingParams"),
    "RequestOutput": ("drlora_serve.types", "RequestOutput"),
    "CompletionOutput": ("drlora_serve.types", "CompletionOutput"),
    "TokenLogprob": ("drlora_serve.types", "TokenLogprob"),
    "Logprob": ("drlora_serve.types", "Logprob"),
    "LoRARequest": ("drlora_serve.types", "LoRARequest"),
    "AdapterInfo": ("drlora_serve.types", "AdapterInfo"),
    "EngineStats": ("drlora_serve.types", "EngineStats"),
    "EngineClient": ("drlora_serve.types", "EngineClient"),
    "InvalidRequestError": ("drlora_serve.types", "InvalidRequestError"),
    "AdapterNotFoundError": ("drlora_serve.types", "AdapterNotFoundError"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("drlora")
        except PackageNotFoundError:
            return "0+unknown"
    if name not in _EXPORTS:
        raise AttributeError(f"module 'drlora_serve' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | {"__version__"} | {k for k in globals() if k.startswith("__")})


if TYPE_CHECKING:  # static analysers see the real names
    from drlora_serve.async_llm import AsyncLLM
    from drlora_serve.async_llm import AsyncLLM as AsyncLLMEngine
    from drlora_serve.config import EngineArgs
    from drlora_serve.config import EngineArgs as AsyncEngineArgs
    from drlora_serve.engine import LLMEngine
    from drlora_serve.llm import LLM
    from drlora_serve.types import (AdapterInfo, AdapterNotFoundError, CompletionOutput, EngineClient,
                                    EngineStats, InvalidRequestError, Logprob, LoRARequest, RequestOutput,
                                    SamplingParams, TokenLogprob)
