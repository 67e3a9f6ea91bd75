"""AsyncLLM: the EngineClient the HTTP server uses. The engine core runs in its own process
(core_proc.py); this side, in the server's process, validates requests, sends them over ZMQ,
and turns the core's per-step deltas into text and outputs (output_processor.py) on the event
loop, so tokenization, detokenization, stop strings and HTTP never take the core's time.

Every mutation (add, abort, adapter load/unload) is a message applied by the core between
steps, in the order sent: a request submitted before a replace runs on the old version.
`generate()` validates synchronously (raising InvalidRequestError / AdapterNotFoundError before
any streaming), then returns an async iterator of RequestOutputs of the request's
`output_kind`; a consumer that falls behind gets the deltas merged. Closing the iterator
early aborts the request and frees its blocks. If the core process dies, requests in flight
fail and `dead` is set (the server's /health then fails).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import multiprocessing
import tempfile
import time
from pathlib import Path

import zmq
import zmq.asyncio

from drlora.models import resolve_model

from drlora_serve.config import EngineArgs
from drlora_serve.core_proc import run_engine_core
from drlora_serve.engine import load_tokenizer
from drlora_serve.output_processor import OutputProcessor, RequestState
from drlora_serve.preprocess import prepare
from drlora_serve.structured import GrammarValidator
from drlora_serve.protocol import (
    Abort,
    AddRequest,
    CoreFailed,
    EngineInfo,
    FinishSeqs,
    Ready,
    Shutdown,
    StepOutputs,
    UtilityCall,
    UtilityResult,
    error_from,
    input_codec,
    output_codec,
)
from drlora_serve.types import (
    AdapterInfo,
    AdapterNotFoundError,
    EngineDeadError,
    EngineStats,
    EngineUnavailableError,
    InvalidRequestError,
    SamplingParams,
)

__all__ = ["AsyncLLM", "EngineDeadError"]

log = logging.getLogger(__name__)


class AsyncLLM:
    def __init__(self, args: EngineArgs, tokenizer=None, log_level: str = "INFO"):
        self.args = args
        self.model_dir = resolve_model(args.model, dummy=args.load_format == "dummy")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_dir)
        self.eos_token_id = self.tokenizer.eos_token_id
        self.model_name = args.served_model_name or args.model
        self.log_level = log_level
        self.processor = OutputProcessor(self.tokenizer, self.eos_token_id)
        self.grammars = GrammarValidator()
        self.info: EngineInfo | None = None
        self.max_model_len = 0  # known once started
        self.dead = False
        # called after every step with the processor's token timings (ttfts, itls): the
        # server's latency histograms
        self.token_timing = None
        self._accepting = True
        self._stats = EngineStats(max_loras=args.max_loras)
        self._adapters: list[AdapterInfo] = []
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._tasks: list[asyncio.Task] = []
        self._ctx: zmq.asyncio.Context | None = None
        self._enc, _ = input_codec()
        _, self._dec = output_codec()

    @classmethod
    def from_args(cls, args: EngineArgs, log_level: str = "INFO") -> AsyncLLM:
        return cls(args, log_level=log_level)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the core process and wait until its model is loaded."""
        if self._proc is not None:
            return
        self._dir = tempfile.TemporaryDirectory(prefix="drlora-ipc-")
        in_addr, out_addr = (f"ipc://{Path(self._dir.name) / n}" for n in ("in", "out"))
        self._ctx = zmq.asyncio.Context()
        self._in = self._ctx.socket(zmq.PUSH)
        self._in.setsockopt(zmq.SNDHWM, 0)  # never drop or block on requests
        self._in.bind(in_addr)
        self._out = self._ctx.socket(zmq.PULL)
        self._out.setsockopt(zmq.RCVHWM, 0)
        self._out.bind(out_addr)
        mp = multiprocessing.get_context("spawn")
        self._proc = mp.Process(target=run_engine_core, name="drlora-engine-core", daemon=True,
                                args=(self.args, str(self.model_dir), self.eos_token_id, in_addr, out_addr,
                                      self.log_level))
        self._proc.start()
        atexit.register(self._kill_core)
        while True:  # loading the model may take minutes: wait as long as the process lives
            if await self._out.poll(500):
                msg = self._dec.decode(await self._out.recv())
                if isinstance(msg, Ready):
                    break
                if isinstance(msg, CoreFailed):
                    await self._stop_process()
                    raise RuntimeError(f"the engine core failed to start: {msg.message}")
            elif not self._proc.is_alive():
                await self._stop_process()
                raise RuntimeError(f"the engine core exited during start-up (exit code {self._proc.exitcode})")
        self.info = msg.info
        self.max_model_len = self.info.max_model_len
        self._adapters = list(self.info.adapters)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._output_loop()), loop.create_task(self._watch())]

    async def shutdown(self, graceful: bool = True) -> None:
        self._accepting = False
        if self._proc is None or self._ctx is None:  # never started, or stopped already (a failed start)
            return
        if graceful:
            while self.processor.has_unfinished() and not self.dead:
                await asyncio.sleep(0.01)
        else:
            for rid in list(self.processor.requests):
                await self.abort(rid)
        if not self.dead:
            self._send(Shutdown())
        await self._stop_process()

    def _kill_core(self) -> None:
        """At interpreter exit, if the core still runs (the frontend ends without shutdown()):
        the core ignores SIGTERM (core_proc.py), so multiprocessing's own exit handler, which
        terminates daemon children and then joins them, would wait for it forever."""
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(5)

    async def _stop_process(self) -> None:
        atexit.unregister(self._kill_core)
        proc = self._proc
        if proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, proc.join, 10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._ctx is not None:
            self._in.close(0)
            self._out.close(0)
            self._ctx.term()
            self._ctx = None
        self._dir.cleanup()

    # ------------------------------------------------------------------ requests
    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                 adapter: str | None = None):
        if self.dead:
            raise EngineDeadError("the engine core is dead")
        if not self._accepting:
            raise EngineUnavailableError("the engine is shutting down")
        info = self.info
        params, prompt_token_ids = prepare(params, list(prompt_token_ids), self.tokenizer, info.vocab_size,
                                           info.max_model_len, self.grammars)
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty")
        if n + params.max_tokens > info.max_model_len:
            raise InvalidRequestError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                      f"maximum context length {info.max_model_len}")
        vocab = info.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        need = -(-(n + params.max_tokens) // info.block_size)
        if need > info.num_kv_blocks:
            raise InvalidRequestError(f"request needs {need} KV blocks but the cache has {info.num_kv_blocks}")
        if adapter is not None and all(a.name != adapter for a in self._adapters):
            raise AdapterNotFoundError(f"adapter '{adapter}' not found")
        if request_id in self.processor.requests:
            raise InvalidRequestError(f"request id '{request_id}' is already in use")
        req = self.processor.add_request(request_id, list(prompt_token_ids), params, adapter)
        req.event = asyncio.Event()
        self._send(AddRequest(request_id, req.key, req.prompt_token_ids, params, adapter, time.monotonic()))
        return self._stream(req)

    async def _stream(self, req: RequestState):
        finished = False
        try:
            while True:
                await req.event.wait()
                req.event.clear()
                out = self.processor.output(req)  # raises the request's error, if it failed
                if out is not None:
                    yield out
                if req.finished:
                    finished = True
                    return
        except BaseException:
            finished = req.finished
            raise
        finally:
            if not finished:  # the consumer went away: abort, free its blocks
                self.processor.abort(req.request_id)
                if not self.dead and self._ctx is not None:
                    self._send(Abort([req.request_id]))

    async def abort(self, request_id: str) -> None:
        req = self.processor.abort(request_id)
        if req is not None and req.event is not None:
            req.event.set()
        if not self.dead and self._ctx is not None:
            self._send(Abort([request_id]))

    def _send(self, msg) -> None:
        self._in.send(self._enc.encode(msg), copy=False)  # never blocks: no high-water mark

    # ------------------------------------------------------------------ outputs
    async def _output_loop(self) -> None:
        try:
            await self._read_outputs()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken channel must fail requests, not hang them
            log.exception("reading the engine core's outputs failed")
            self._died(f"the engine core's output channel failed ({type(exc).__name__}: {exc})")

    async def _read_outputs(self) -> None:
        dec, sock = self._dec, self._out
        while True:
            msg = dec.decode(await sock.recv())
            if isinstance(msg, StepOutputs):
                self._on_step(msg)
            elif isinstance(msg, UtilityResult):
                fut = self._calls.pop(msg.call_id, None)
                if fut is not None and not fut.done():
                    if msg.error_type is not None:
                        fut.set_exception(error_from(msg.error_type, msg.message))
                    else:
                        fut.set_result(msg.value)
            elif isinstance(msg, CoreFailed):
                self._died(msg.message)
                return

    def _on_step(self, msg: StepOutputs) -> None:
        proc = self.processor
        touched, stopped = proc.process(msg)
        if stopped:
            self._send(FinishSeqs(stopped))
        if self.token_timing is not None and (proc.ttfts or proc.itls):
            self.token_timing(proc.ttfts, proc.itls)
        for req in touched:
            if req.event is not None:
                req.event.set()
        if msg.stats is not None:
            self._stats = msg.stats
        if msg.adapters is not None:
            self._adapters = msg.adapters

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self._proc is not None and not self._proc.is_alive() and self._accepting:
                self._died(f"the engine core process exited (code {self._proc.exitcode})")
                return

    def _died(self, why: str) -> None:
        log.error("%s; failing requests in flight", why)
        self.dead = True
        err = EngineDeadError(why)
        self.fail_all(err)
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(err)
        self._calls.clear()

    def fail_all(self, exc: Exception) -> None:
        """Fail every request in flight with exc (their consumers raise it) and abort them in
        the core: the server's shutdown deadline, or the core's death."""
        reqs = list(self.processor.requests.values())
        for req in reqs:
            self.processor.fail(req, exc)
            if req.event is not None:
                req.event.set()
        if reqs and not self.dead and self._ctx is not None:
            self._send(Abort([r.request_id for r in reqs]))

    # ------------------------------------------------------------------ adapters & stats
    async def _call(self, method: str, *args):
        if self.dead:
            raise EngineDeadError("the engine core is dead")
        call_id = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        self._send(UtilityCall(call_id, method, list(args)))
        return await fut

    def list_adapters(self) -> list[AdapterInfo]:
        return list(self._adapters)

    async def load_adapter(self, name: str, path: str, replace: bool = False) -> AdapterInfo:
        """Loads between engine steps; list_adapters() shows the change once this returns."""
        return AdapterInfo(**await self._call("load_adapter", name, path, replace))

    async def unload_adapter(self, name: str) -> None:
        # gone for new requests from now on: the core applies messages in order, so a request
        # sent before runs on the adapter, and one after would only fail there (a stream already
        # answered 200)
        self._adapters = [a for a in self._adapters if a.name != name]
        await self._call("unload_adapter", name)

    async def compact_adapters(self) -> int:
        return await self._call("compact_adapters")

    def stats(self) -> EngineStats:
        return self._stats
