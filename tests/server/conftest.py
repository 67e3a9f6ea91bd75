"""Shared fixtures for the server tests: adapters on disk, the tiny tokenizer, an in-process
app over the FakeEngine, and real uvicorn servers in subprocesses on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from drlora.adapter_format import AdapterConfig, expected_shapes, write_adapter
from drlora.models import MoeShape, resolve_model

HERE = Path(__file__).parent


def make_adapter(path: Path, seed: int = 0, max_rank: int = 4) -> Path:
    """An adapter for the tiny model with random per-expert ranks and random non-zero weights."""
    shape = MoeShape.from_model_dir(resolve_model("tiny"))
    g = torch.Generator().manual_seed(seed)
    L, E = shape.num_hidden_layers, shape.num_experts
    ranks = {p: torch.randint(1, max_rank + 1, (L, E), generator=g).tolist() for p in ("gate", "up", "down")}
    cfg = AdapterConfig(base_model="tiny", base_shape=shape, method="drlora", scaling=2.0, ranks=ranks)
    tensors = {k: torch.randn(*s, generator=g) * 0.5 for k, s in expected_shapes(cfg).items()}
    return write_adapter(path, cfg, tensors)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("tiny"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server in a subprocess; `stop()` sends SIGINT (graceful) and kills after a timeout."""

    def __init__(self, args: list[str], env: dict | None = None, log: Path | None = None,
                 startup_timeout: float = 120.0, group: bool = False) -> None:
        """group: the server leads a process group of its own, and stop() signals the whole
        group, as Ctrl-C in a terminal does."""
        self.group = group
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [*args, "--host", "127.0.0.1", "--port", str(self.port)]
        out = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=group)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start in {startup_timeout}s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log and self.log.exists() else ""

    def stop(self, timeout: float = 30.0, sig: int = signal.SIGINT) -> int | None:
        if self.proc.poll() is None:
            if self.group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def stream_in_thread(url: str, body: dict, headers: dict | None = None,
                     timeout: float = 60) -> tuple[threading.Thread, list[str], threading.Event]:
    """POST a streaming request from a started thread: (the thread, the non-empty SSE lines as
    they arrive, an event set at the first one)."""
    lines: list[str] = []
    first = threading.Event()

    def run() -> None:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=timeout) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    first.set()

    t = threading.Thread(target=run)
    t.start()
    return t, lines, first


def fake_server_cmd(*extra: str) -> list[str]:
    """A real uvicorn server over the FakeEngine (tests/server/fake_server.py)."""
    return [sys.executable, str(HERE / "fake_server.py"), *extra]


def real_server_cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "--model", "tiny", *extra]


@contextmanager
def uvicorn_in_thread(app):
    """A real uvicorn server for `app` on a free port, in a thread of this process (so that a
    test can drive the app's engine double); yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)
