"""Adapters at runtime: vLLM's load/unload endpoints (with path confinement) and the
watcher that hot-loads, reloads and unloads the subfolders of `--adapters`."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from drlora.adapter_format import CONFIG_NAME, WEIGHTS_NAME, AdapterFormatError, is_adapter_dir
from drlora_serve.types import AdapterNotFoundError, EngineClient
from server.errors import APIError, bad_request, from_exception
from server.protocol import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from server.state import ServerState, get_state

log = logging.getLogger("drlora.server.adapters")
router = APIRouter()


def _inside(path: str, roots: list[str]) -> bool:
    return any(os.path.commonpath([path, r]) == r for r in roots)


def resolve_lora_path(path: str, roots: list[str]) -> str:
    """The real path of `path` if it (symlinks followed, files included) lies inside one of
    the allowed roots; a 400 otherwise. Checked before existence so that paths outside the
    roots reveal nothing about what exists there."""
    if "\x00" in path:
        raise bad_request("lora_path contains a NUL byte", "lora_path")
    if not roots:
        raise bad_request("Loading adapters by path is disabled: start the server with "
                          "--lora-root or --adapters to allow a folder", "lora_path")
    real = os.path.realpath(os.path.expanduser(path))
    if not _inside(real, roots):
        raise bad_request(f"lora_path '{path}' is outside the allowed adapter roots", "lora_path")
    for name in (CONFIG_NAME, WEIGHTS_NAME):  # a file symlinked out of the root escapes too
        f = os.path.join(real, name)
        if os.path.lexists(f) and not _inside(os.path.realpath(f), roots):
            raise bad_request(f"lora_path '{path}': {name} points outside the allowed adapter "
                              "roots", "lora_path")
    return real


def _check_enabled(state: ServerState) -> None:
    if not state.config.allow_runtime_lora_updating:
        raise APIError(403, "Runtime adapter loading is disabled on this server (started with "
                            "--disable-runtime-lora-updating)")


def _names(engine: EngineClient) -> dict[str, str]:
    return {a.name: a.path for a in engine.list_adapters()}


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(req: LoadLoraAdapterRequest, request: Request) -> PlainTextResponse:
    state = get_state(request)
    _check_enabled(state)
    name = req.lora_name
    if state.is_base(name):
        raise bad_request(f"lora_name '{name}' is the base model's name", "lora_name")
    path = resolve_lora_path(req.lora_path, state.config.allowed_roots())
    exists = name in _names(state.engine)
    if exists and not req.load_inplace:
        raise bad_request(f"The lora adapter '{name}' has already been loaded. Pass "
                          "\"load_inplace\": true to replace it.", "lora_name")
    if not is_adapter_dir(path):
        raise APIError(404, f"No adapter found at '{req.lora_path}' (no {CONFIG_NAME})", "lora_path")
    try:
        await state.engine.load_adapter(name, path, replace=exists)
    except (AdapterFormatError, AdapterNotFoundError) as exc:
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


Signature = tuple[int, int, int, int]


def signature(folder: str) -> Signature | None:
    """Sizes and mtimes of config and weights; None while either is missing."""
    try:
        c = os.stat(os.path.join(folder, CONFIG_NAME))
        w = os.stat(os.path.join(folder, WEIGHTS_NAME))
    except OSError:
        return None
    return (c.st_size, c.st_mtime_ns, w.st_size, w.st_mtime_ns)


@dataclass
class AdapterWatcher:
    """Polls `folder`: a new complete subfolder is loaded (named after it) once its files are
    unchanged across two polls, a changed one is reloaded in place, a removed one unloaded.
    Only acts on changes, so an adapter unloaded through the API stays unloaded until its
    files change. Failures are logged and retried when the files change again."""

    engine: EngineClient
    folder: str
    interval: float = 2.0
    prev: dict[str, Signature | None] = field(default_factory=dict)  # last poll
    loaded: dict[str, Signature] = field(default_factory=dict)  # what we loaded
    failed: dict[str, Signature] = field(default_factory=dict)
    _task: asyncio.Task | None = None

    def _scan_folder(self) -> dict[str, Signature | None]:
        found: dict[str, Signature | None] = {}
        try:
            entries = list(os.scandir(self.folder))
        except OSError as exc:
            log.warning("cannot list %s: %s", self.folder, exc)
            return dict(self.prev)  # keep state; do not unload on a transient error
        for e in entries:
            if e.name.startswith(".") or not e.is_dir():
                continue
            found[e.name] = signature(e.path)
        return found

    async def poll(self, initial: bool = False) -> None:
        current = self._scan_folder()
        engine_has = _names(self.engine)
        for name, sig in sorted(current.items()):
            if sig is None or self.loaded.get(name) == sig or self.failed.get(name) == sig:
                continue
            if not initial and self.prev.get(name) != sig:
                continue  # still being written: wait until two polls agree
            path = os.path.realpath(os.path.join(self.folder, name))
            if name in engine_has and name not in self.loaded:
                if os.path.realpath(engine_has[name]) == path and initial:
                    self.loaded[name] = sig  # loaded by the engine at startup
                    continue
                if os.path.realpath(engine_has[name]) != path:
                    log.warning("not loading %s: an adapter of that name is already loaded from %s",
                                path, engine_has[name])
                    self.failed[name] = sig
                    continue
            await self._load(name, path, sig, replace=name in engine_has)
        for name in list(self.loaded):
            if name not in current:
                del self.loaded[name]
                self.failed.pop(name, None)
                try:
                    await self.engine.unload_adapter(name)
                    log.info("unloaded adapter %s (folder removed)", name)
                except AdapterNotFoundError:
                    pass
                except Exception as exc:  # noqa: BLE001
                    log.warning("unloading adapter %s failed: %s", name, exc)
        self.prev = current

    async def _load(self, name: str, path: str, sig: Signature, replace: bool) -> None:
        try:
            await self.engine.load_adapter(name, path, replace=replace)
        except Exception as exc:  # noqa: BLE001 - never fatal
            log.warning("loading adapter %s from %s failed: %s", name, path, exc)
            self.failed[name] = sig
            return
        self.failed.pop(name, None)
        self.loaded[name] = sig
        log.info("%s adapter %s from %s", "reloaded" if replace else "loaded", name, path)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failure
                log.exception("adapter watcher poll failed")

    async def start(self) -> None:
        await self.poll(initial=True)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
