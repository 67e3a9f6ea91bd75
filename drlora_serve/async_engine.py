"""AsyncLLMEngine: the EngineClient the HTTP server uses.

The LLMEngine runs in one background thread (torch releases the GIL in its kernels, so the
event loop stays responsive). Every mutation (add, abort, adapter load/unload) is a command
queued to that thread and applied between steps, in submission order: a request submitted
before a replace runs on the old version. Outputs go back to per-request asyncio queues via
call_soon_threadsafe; consumers that fall behind only see the latest cumulative snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future

from drlora_serve.config import EngineArgs
from drlora_serve.engine import LLMEngine
from drlora_serve.types import (
    AdapterInfo,
    AdapterNotFoundError,
    EngineStats,
    InvalidRequestError,
    SamplingParams,
)

log = logging.getLogger(__name__)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self._accepting = True
        self._idle = threading.Event()
        self._stats = engine.stats()
        self._adapters = engine.list_adapters()

    @classmethod
    def from_args(cls, args: EngineArgs) -> AsyncLLMEngine:
        return cls(LLMEngine(args))

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="drlora-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, graceful: bool = True) -> None:
        self._accepting = False
        if self._thread is None:
            return
        if graceful:
            while not self._idle.is_set():
                await asyncio.sleep(0.01)
        else:
            await self._call(lambda e: [self._send(r, e.abort(r)) for r in list(e.requests)])
        self._stop = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._thread = None

    # ------------------------------------------------------------------ requests
    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                 adapter: str | None = None):
        """Validates now (raises InvalidRequestError / AdapterNotFoundError before any
        streaming), then returns an async iterator of cumulative snapshots."""
        if not self._accepting:
            raise InvalidRequestError("the engine is shutting down")
        self.engine.check_request(prompt_token_ids, params)
        if adapter is not None and adapter not in self.engine.pool.current:
            raise AdapterNotFoundError(f"adapter '{adapter}' not found")
        if request_id in self._streams:
            raise InvalidRequestError(f"request id '{request_id}' is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        self._idle.clear()
        self._commands.put(("add", request_id, list(prompt_token_ids), params, adapter))
        self._wake.set()
        return self._stream(request_id, q)

    async def _stream(self, request_id: str, q: asyncio.Queue):
        finished = False
        try:
            while True:
                item = await q.get()
                while not q.empty():  # cumulative snapshots: the latest suffices
                    nxt = q.get_nowait()
                    if isinstance(item, BaseException):
                        break
                    item = nxt
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if self._streams.get(request_id) is q:
                del self._streams[request_id]
            if not finished:  # client went away: abort and free its blocks
                self._commands.put(("abort", request_id))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # ------------------------------------------------------------------ adapters & stats
    def list_adapters(self) -> list[AdapterInfo]:
        return list(self._adapters)

    async def load_adapter(self, name: str, path: str, replace: bool = False) -> AdapterInfo:
        """Loads between engine steps; list_adapters() shows the change once this returns."""
        return await self._call(lambda e: e.load_adapter(name, path, replace))

    async def unload_adapter(self, name: str) -> None:
        await self._call(lambda e: e.unload_adapter(name))

    def stats(self) -> EngineStats:
        return self._stats

    async def _call(self, fn):
        """Run fn(engine) on the engine thread between steps; result or exception."""
        if self._thread is None:  # not started: run inline
            out = fn(self.engine)
            self._adapters = self.engine.list_adapters()
            return out
        fut: Future = Future()
        self._commands.put(("call", fn, fut))
        self._wake.set()
        return await asyncio.wrap_future(fut)

    # ------------------------------------------------------------------ engine thread
    def _emit(self, request_id: str, item) -> None:
        q = self._streams.get(request_id)
        if q is not None:
            q.put_nowait(item)
            if isinstance(item, BaseException) or item.finished:  # its last item: forget the
                del self._streams[request_id]  # stream even if no one ever iterates it

    def _send(self, request_id: str, item) -> None:
        self._loop.call_soon_threadsafe(self._emit, request_id, item)

    def _apply(self, cmd) -> None:
        e = self.engine
        if cmd[0] == "add":
            _, rid, toks, params, adapter = cmd
            try:
                e.add_request(rid, toks, params, adapter)
            except Exception as exc:  # e.g. the adapter was unloaded meanwhile
                self._send(rid, exc)
        elif cmd[0] == "abort":
            out = e.abort(cmd[1])
            if out is not None:
                self._send(cmd[1], out)
        elif cmd[0] == "call":
            _, fn, fut = cmd
            try:
                result = fn(e)
            except BaseException as exc:
                fut.set_exception(exc)
            else:
                self._adapters = e.list_adapters()
                fut.set_result(result)

    def _run(self) -> None:
        e = self.engine
        while not self._stop:
            while True:
                try:
                    self._apply(self._commands.get_nowait())
                except queue.Empty:
                    break
            if e.has_unfinished():
                try:
                    for out in e.step():
                        self._send(out.request_id, out)
                except Exception as exc:  # keep serving: fail the in-flight requests only
                    log.exception("engine step failed")
                    for rid in list(e.requests):
                        try:
                            e.abort(rid)
                        except Exception:
                            log.exception("abort after failure")
                            e.requests.pop(rid, None)
                        self._send(rid, exc)
            self._stats = e.stats()
            self._adapters = e.list_adapters()
            if not e.has_unfinished() and self._commands.empty():
                self._idle.set()
                self._wake.wait(0.05)
                self._wake.clear()
            else:
                self._idle.clear()
