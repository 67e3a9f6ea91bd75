"""The adapter folder watcher: hot-loads, reloads and unloads the subfolders of `--adapters`."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from drlora.peft import ADAPTER_FILE_PAIRS
from drlora_serve.types import AdapterNotFoundError, EngineClient
from server.confinement import OutsideRootsError, confine

log = logging.getLogger("drlora.server.watcher")


def _names(engine: EngineClient) -> dict[str, str]:
    return {a.name: a.path for a in engine.list_adapters()}


Signature = tuple[int, int, int, int]


def _is_text(name: str) -> bool:
    """Folder names become adapter names in JSON: undecodable bytes (surrogate escapes) cannot."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def signature(folder: str) -> Signature | None:
    """Sizes and mtimes of config and weights, drlora's or else PEFT's (converted on load, as
    the load endpoint does); None while either is missing."""
    for config, weights in ADAPTER_FILE_PAIRS:
        try:
            c = os.stat(os.path.join(folder, config))
            w = os.stat(os.path.join(folder, weights))
        except OSError:
            continue
        return (c.st_size, c.st_mtime_ns, w.st_size, w.st_mtime_ns)
    return None


@dataclass
class AdapterWatcher:
    """Polls `folder`: a new complete subfolder is loaded (named after it) once its files are
    unchanged across two polls, a changed one is reloaded in place, a removed one unloaded.
    Only acts on changes, so an adapter unloaded through the API stays unloaded until its
    files change. Failures are logged and retried when the files change again. A subfolder
    (or an adapter file in it) that resolves outside `folder` is refused like the load
    endpoint refuses it (server/confinement.py), and so is a folder named like the base model
    (`reserved`: such an adapter could never be asked for). A removed folder unloads only the
    adapter loaded from it: one replaced through the API from elsewhere since stays."""

    engine: EngineClient
    folder: str
    interval: float = 2.0
    reserved: Callable[[str], bool] = lambda name: False  # names requests cannot give an adapter
    prev: dict[str, Signature | None] = field(default_factory=dict)  # last poll
    loaded: dict[str, Signature] = field(default_factory=dict)  # what we loaded
    paths: dict[str, str] = field(default_factory=dict)  # ... and from where (resolved)
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
            try:  # the endpoint's rule, with the watched folder as the only root
                if not _is_text(name):
                    raise OutsideRootsError("its name is not valid UTF-8")
                if self.reserved(name):
                    raise OutsideRootsError("that name is the base model's (requests naming it get the base model)")
                path = confine(os.path.join(self.folder, name), [os.path.realpath(self.folder)])
            except OutsideRootsError as exc:
                log.warning("not loading adapter folder %r: %s", name, exc)
                self.failed[name] = sig
                continue
            if name in engine_has and name not in self.loaded:
                if os.path.realpath(engine_has[name]) == path and initial:
                    self.loaded[name], self.paths[name] = sig, path  # loaded by the engine at startup
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
                ours = self.paths.pop(name, None)
                if name in engine_has and os.path.realpath(engine_has[name]) != ours:
                    log.info("folder %s removed; adapter %s stays (it was replaced from %s)", name, name,
                             engine_has[name])
                    continue
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
            log.warning("loading adapter %r from %s failed: %s", name, path, exc)
            self.failed[name] = sig
            return
        self.failed.pop(name, None)
        self.loaded[name], self.paths[name] = sig, path
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
