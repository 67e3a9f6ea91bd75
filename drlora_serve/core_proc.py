"""The engine core in its own process: a loop between two ZMQ sockets.

    frontend (API server) --PUSH--> [in]  core process  [out] --PUSH--> frontend

Each turn: take every waiting input (requests, aborts, stop-string finishes, utility calls),
run one step if there is work, send its deltas. Idle, it blocks on the input socket and sends
its stats when they change. Stats ride along with the step outputs at most every
`stats_interval` seconds. It exits when told to, or when its parent process is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch
import zmq

from drlora_serve.config import EngineArgs
from drlora_serve.core import EngineCore
from drlora_serve.protocol import (
    Abort,
    AddRequest,
    CoreFailed,
    FinishSeqs,
    Ready,
    RequestFailed,
    Shutdown,
    StepOutputs,
    UtilityCall,
    UtilityResult,
    error_fields,
    input_codec,
    output_codec,
)

log = logging.getLogger("drlora_serve.core")

UTILITY_METHODS = {"load_adapter", "unload_adapter", "list_adapters", "compact_adapters", "stats"}
ADAPTER_METHODS = {"load_adapter", "unload_adapter"}


def run_engine_core(args: EngineArgs, model_dir: str, eos_token_id: int | None, in_addr: str, out_addr: str,
                    log_level: str = "INFO") -> None:
    """Process entry point (multiprocessing, spawn)."""
    # Ctrl-C, and a service manager's SIGTERM to the process group (systemd's default
    # KillMode, supervisord's stopasgroup, `kill -- -PGID`), reach the core too: the API server
    # drains its requests and then tells the core to stop (or the core sees its parent gone),
    # so the core ignores both itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        torch.set_num_threads(args.cpu_threads or max(1, (os.cpu_count() or 2) - 1))
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.connect(in_addr)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 2000)
    out.connect(out_addr)
    enc, _ = output_codec()
    try:
        core = EngineCore(args, Path(model_dir), eos_token_id=eos_token_id)
    except BaseException as exc:  # noqa: BLE001 - reported to the frontend, which fails its start
        log.debug("engine core failed to start", exc_info=True)  # the frontend logs the one-line reason
        out.send(enc.encode(CoreFailed(f"{type(exc).__name__}: {exc}")))
        out.close()
        ctx.term()
        raise SystemExit(1) from None
    out.send(enc.encode(Ready(core.info())))
    try:
        CoreLoop(core, inp, out, args.stats_interval).run()
    finally:
        inp.close(0)
        out.close()
        ctx.term()


class CoreLoop:
    def __init__(self, core: EngineCore, inp: zmq.Socket, out: zmq.Socket, stats_interval: float):
        self.core, self.inp, self.out = core, inp, out
        self.enc, _ = output_codec()
        _, self.dec = input_codec()
        self.stats_interval = stats_interval
        self.parent = os.getppid()
        self.stop = False
        self.stats_dirty = True
        self.adapters_sent = core.list_adapters()

    def run(self) -> None:
        core, poller = self.core, zmq.Poller()
        poller.register(self.inp, zmq.POLLIN)
        last_stats = last_parent_check = 0.0
        stalled = False  # the last step had nothing to run (requests waiting for an adapter slot)
        while not self.stop:
            if core.has_unfinished():
                timeout_ms = 1 if stalled else 0
            else:
                timeout_ms = 1000 * min(self.stats_interval * 4, 0.5)
            if poller.poll(timeout_ms):
                self._drain()
            out = None
            if core.has_unfinished():
                try:
                    out = core.step()
                    stalled = core.inflight is None and out.empty
                    if out.empty:
                        out = None  # nothing to tell the frontend (never a stream of empty messages)
                except Exception as exc:  # noqa: BLE001 - keep serving: fail the requests in flight only
                    log.exception("engine step failed")
                    core.fail_all(exc)
                    out = StepOutputs([], [], failed=core._failed)
                    core._failed = []
                    stalled = False
                self.stats_dirty = True
            elif core._failed or core._finished:
                out = StepOutputs([], [], finished=core._finished, failed=core._failed)
                core._finished, core._failed = [], []
            now = time.monotonic()
            if self.stats_dirty and (now - last_stats >= self.stats_interval or not core.has_unfinished()):
                out = out or StepOutputs([], [])
                out.stats = core.stats()
                last_stats, self.stats_dirty = now, core.has_unfinished()
                adapters = core.list_adapters()  # residency and pins change as requests run
                if adapters != self.adapters_sent:
                    out.adapters = self.adapters_sent = adapters
            if out is not None:
                self.out.send(self.enc.encode(out), copy=False)
            if now - last_parent_check > 1.0:
                last_parent_check = now
                if os.getppid() != self.parent:
                    log.warning("the frontend process is gone; engine core exits")
                    return

    def _drain(self) -> None:
        while True:
            try:
                frame = self.inp.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(self.dec.decode(frame.buffer))
            self.stats_dirty = True

    def _handle(self, msg) -> None:
        core = self.core
        if isinstance(msg, AddRequest):
            try:
                core.add_request(msg.request_id, msg.key, msg.prompt_token_ids, msg.params, msg.adapter, msg.arrival)
            except Exception as exc:  # noqa: BLE001 - e.g. the adapter was unloaded meanwhile
                core._failed.append(RequestFailed(msg.key, *error_fields(exc)))
        elif isinstance(msg, Abort):
            for rid in msg.request_ids:
                core.abort(rid)
        elif isinstance(msg, FinishSeqs):
            core.finish_seqs(msg.seq_keys, msg.reason)
        elif isinstance(msg, UtilityCall):
            self._utility(msg)
        elif isinstance(msg, Shutdown):
            self.stop = True

    def _utility(self, call: UtilityCall) -> None:
        core = self.core
        if call.method not in UTILITY_METHODS:
            res = UtilityResult(call.call_id, None, "ValueError", f"unknown engine method {call.method!r}")
        else:
            try:
                res = UtilityResult(call.call_id, getattr(core, call.method)(*call.args))
            except Exception as exc:  # noqa: BLE001 - the caller gets it
                res = UtilityResult(call.call_id, None, *error_fields(exc))
        if call.method in ADAPTER_METHODS:  # the list first: current once the call returns
            self.adapters_sent = core.list_adapters()
            self.out.send(self.enc.encode(StepOutputs([], [], adapters=self.adapters_sent)))
        self.out.send(self.enc.encode(res))
