"""Adapters at runtime: vLLM's load/unload endpoints, with path confinement."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from drlora.adapter_format import CONFIG_NAME, AdapterFormatError, is_adapter_dir
from drlora.peft import PEFT_CONFIG
from drlora_serve.adapter_pool import valid_adapter_name
from drlora_serve.types import AdapterNotFoundError, EngineClient, EngineUnavailableError
from server.confinement import OutsideRootsError, confine
from server.errors import APIError, bad_request, from_exception
from server.protocol import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from server.state import ServerState, get_state

log = logging.getLogger("drlora.server.adapters")
router = APIRouter()


def resolve_lora_path(path: str, roots: list[str]) -> str:
    """The real path of `path` under the confinement rule (server/confinement.py); a 400
    with param lora_path otherwise."""
    if not roots:
        raise bad_request("Loading adapters by path is disabled: start the server with "
                          "--lora-root or --adapters to allow a folder", "lora_path")
    try:
        return confine(path, roots)
    except OutsideRootsError as exc:
        raise bad_request(f"lora_path: {exc}", "lora_path") from None


def _check_enabled(state: ServerState) -> None:
    if not state.config.allow_runtime_lora_updating:
        raise APIError(403, "Runtime adapter loading is disabled on this server (--disable-runtime-lora-updating, "
                            "or DRLORA_ALLOW_RUNTIME_LORA_UPDATING / VLLM_ALLOW_RUNTIME_LORA_UPDATING false)")


def _names(engine: EngineClient) -> dict[str, str]:
    return {a.name: a.path for a in engine.list_adapters()}


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(req: LoadLoraAdapterRequest, request: Request) -> PlainTextResponse:
    state = get_state(request)
    _check_enabled(state)
    name = req.lora_name
    if state.is_base(name):
        raise bad_request(f"lora_name '{name}' is the base model's name", "lora_name")
    if not valid_adapter_name(name):
        raise bad_request(f"lora_name {name!r} is not a valid adapter name (no '/', no control characters, "
                          "not blank)", "lora_name")
    path = resolve_lora_path(req.lora_path, state.config.allowed_roots())
    exists = name in _names(state.engine)
    if exists and not req.load_inplace:
        raise bad_request(f"The lora adapter '{name}' has already been loaded. Pass "
                          "\"load_inplace\": true to replace it.", "lora_name")
    if not (is_adapter_dir(path) or (Path(path) / PEFT_CONFIG).is_file()):  # drlora's format, or PEFT's
        raise APIError(404, f"No adapter found at '{req.lora_path}' (neither {CONFIG_NAME} nor {PEFT_CONFIG})",
                       "lora_path")
    try:
        await state.engine.load_adapter(name, path, replace=exists)
    except (AdapterFormatError, AdapterNotFoundError, EngineUnavailableError) as exc:
        raise from_exception(exc) from None
    except Exception as exc:  # noqa: BLE001 - a failed load never takes the server down
        log.warning("loading adapter %s from %s failed: %s", name, path, exc, exc_info=True)
        raise bad_request(f"Failed to load adapter '{name}': {exc}", "lora_path") from None
    log.info("%s adapter %s from %s", "replaced" if exists else "loaded", name, path)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(req: UnloadLoraAdapterRequest, request: Request) -> PlainTextResponse:
    state = get_state(request)
    _check_enabled(state)
    name = req.lora_name
    if name not in _names(state.engine):
        raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
    try:
        await state.engine.unload_adapter(name)
    except AdapterNotFoundError:
        raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name") from None
    log.info("unloaded adapter %s", name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
