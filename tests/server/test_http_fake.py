"""The real CLI + uvicorn in a subprocess over the FakeEngine: the official openai client,
client disconnects aborting requests, graceful shutdown, bad flags, API key from the env."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.app import build_app
from server.state import ServerConfig
from tests.server.conftest import ServerProcess, fake_server_cmd, stream_in_thread, uvicorn_in_thread
from tests.server.fake_engine import FakeEngine


def gauge(url: str, name: str) -> float:
    for f in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        if f.name == name:
            return f.samples[0].value
    raise KeyError(name)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fake")
    s = ServerProcess(fake_server_cmd("--adapters", str(tmp / "adapters")),
                      env={"FAKE_DELAY": "0.02", "VLLM_API_KEY": "k1"}, log=tmp / "log.txt")
    yield s
    # graceful shutdown: a stream in flight when SIGINT arrives still finishes
    t, lines, started = stream_in_thread(s.url + "/v1/completions", {"prompt": "x", "max_tokens": 40, "stream": True},
                                         {"Authorization": "Bearer k1"}, timeout=30)
    assert started.wait(10)
    assert s.stop() == 0, s.tail()
    t.join(30)
    assert lines[-1] == "data: [DONE]" and '"finish_reason": "length"' in "".join(lines)
    assert "Application shutdown complete" in s.tail()


def test_openai_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="k1", max_retries=0)
    out = client.completions.create(model="tiny", prompt="hello", max_tokens=5, logprobs=1)
    assert out.usage.completion_tokens == 5 and len(out.choices[0].logprobs.tokens) == 5
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="hello", max_tokens=5, stream=True) if c.choices)
    assert text == out.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4)
    stream = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    assert stream[-1].usage.completion_tokens == 4
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=-3)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def aborted_total(url: str) -> float:
    for f in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        if f.name == "vllm:request_success":
            return sum(s.value for s in f.samples if s.name.endswith("_total") and s.labels["finished_reason"] == "abort")
    return 0.0


def test_disconnect_aborts(server):
    headers = {"Authorization": "Bearer k1"}
    body = {"model": "tiny", "prompt": "x", "max_tokens": 100}
    aborted = aborted_total(server.url)
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=headers) as r:
            it = r.iter_lines()
            next(l for l in it if l.startswith("data:"))
            assert gauge(server.url, "vllm:num_requests_running") == 1
        # non-streaming client that gives up
        with pytest.raises(httpx.ReadTimeout):
            c.post(server.url + "/v1/completions", json=body, headers=headers, timeout=0.3)
    deadline = time.monotonic() + 1.5  # 100 tokens would take 2 s
    while gauge(server.url, "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "request not aborted after disconnect"
        time.sleep(0.05)
    assert aborted_total(server.url) == aborted + 2  # finished_reason="abort" (vLLM leaves it at 0)


def test_bad_flags_exit_2():
    for args in (["--port", "abc"], ["--max-loras", "0"], ["--lora-modules", "noequals"],
                 ["--model", "/nonexistent/model"], ["--bogus"]):
        r = subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and "error" in r.stderr, r.stderr


def test_help_shows_the_defaults():
    """Every flag that takes a value shows its default (on/off switches do not: argparse would
    print store_false's True); the runtime-updating switch names both environment variables."""
    from server.cli import build_parser

    out = " ".join(build_parser().format_help().split())
    for flag, default in (("--port PORT", 8000), ("--max-loras MAX_LORAS", 16), ("--max-num-seqs MAX_NUM_SEQS", 128),
                          ("--block-size BLOCK_SIZE", 16), ("--log-level {debug,info,warning,error}", "info")):
        entry = out.split(flag)[-1].split(" --")[0]
        assert f"(default: {default})" in entry, (flag, entry)
    assert "(default: True)" not in out and "(default: False)" not in out
    assert "$DRLORA_ALLOW_RUNTIME_LORA_UPDATING" in out


def test_load_format_and_pool_flags_reach_the_engine():
    from server.cli import configure

    eargs, _ = configure(["--model", "tiny", "--load-format", "dummy", "--lora-pool-rank-rows", "512"])
    assert eargs.load_format == "dummy" and eargs.lora_pool_rank_rows == 512
    r = subprocess.run([sys.executable, "-m", "server.cli", "--load-format", "pickle"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "load-format" in r.stderr


def test_unexpected_failure_is_a_500_body_and_keeps_the_connection(tokenizer):
    """An exception no handler expects (here: the engine's adapter list fails) is a 500 with
    the OpenAI body, and the keep-alive connection survives it (issue 10.3)."""
    engine = FakeEngine(tokenizer)
    app = build_app(lambda: engine, ServerConfig())
    connects = []

    def trace(event: str, info: dict) -> None:
        if event == "connection.connect_tcp.complete":
            connects.append(event)

    with uvicorn_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        engine.fail_list = True
        for _ in range(3):
            r = c.get("/v1/models", extensions={"trace": trace})
            assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError", r.text
        engine.fail_list = False
        assert c.get("/v1/models", extensions={"trace": trace}).status_code == 200
    assert len(connects) == 1


def test_retrieve_model_with_the_openai_client(tokenizer, tmp_path):
    """GET /v1/models/{id}: the card as listed, for the base (whose served name may hold
    slashes) and adapters; an unknown id is a 404 with the OpenAI body (issue 10.7)."""
    from tests.server.conftest import make_adapter

    engine = FakeEngine(tokenizer, model_name="allenai/OLMoE-1B-7B-0125")
    make_adapter(tmp_path / "a1", seed=1)
    app = build_app(lambda: engine, ServerConfig(model_path="/models/olmoe"))
    with uvicorn_in_thread(app) as url:
        asyncio.run(engine.load_adapter("a1", str(tmp_path / "a1")))
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        card = lambda m: {k: v for k, v in m.to_dict().items() if k != "created"}  # noqa: E731
        listed = {m.id: card(m) for m in client.models.list().data}
        base = client.models.retrieve("allenai/OLMoE-1B-7B-0125")
        assert base.id == "allenai/OLMoE-1B-7B-0125" and card(base) == listed[base.id]
        assert base.root == "/models/olmoe"
        a1 = client.models.retrieve("a1")
        assert card(a1) == listed["a1"] and a1.parent == base.id
        with pytest.raises(openai.NotFoundError) as e:
            client.models.retrieve("nope/missing")
        assert e.value.body == {"message": "The model `nope/missing` does not exist.", "type": "NotFoundError",
                                "param": "model", "code": 404}


def test_dummy_load_format_resolves_an_alias_to_its_preset_without_the_hub(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from drlora.models import PRESETS
    from server.cli import configure

    monkeypatch.setenv("DRLORA_HOME", str(tmp_path))
    eargs, cfg = configure(["--model", "qwen3-moe", "--load-format", "dummy"])
    folder = Path(cfg.model_path)
    assert folder.is_relative_to(tmp_path) and (folder / "tokenizer.json").is_file() and eargs.model == "qwen3-moe"
    assert json.loads((folder / "config.json").read_text()) == PRESETS["qwen3-moe"]


def test_port_in_use_is_one_line_before_the_engine_starts(tmp_path):
    """The port is bound before the model loads: a port in use is one line and status 2 at
    once, not minutes of loading and then an error (vLLM binds first too)."""
    import socket

    from tests.server.conftest import free_port

    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        t0 = time.monotonic()
        r = subprocess.run(fake_server_cmd("--host", "127.0.0.1", "--port", str(port)), capture_output=True,
                           text=True, timeout=120, env={**__import__("os").environ, "FAKE_START_DELAY": "30"})
    assert r.returncode == 2 and time.monotonic() - t0 < 30, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("drlora-serve: error: cannot listen on 127.0.0.1:")
    assert "Traceback" not in r.stderr


def test_health_is_503_while_the_engine_starts_and_a_failed_start_exits_1(tmp_path):
    """While the model loads the port answers: /health 503, requests 503 with an OpenAI body.
    An engine that fails to start stops the server with status 1 and one log line."""
    import os

    from tests.server.conftest import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(fake_server_cmd("--host", "127.0.0.1", "--port", str(port)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "FAKE_START_DELAY": "4"})
    try:
        codes, early = [], []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and 200 not in codes:
            try:
                codes.append(httpx.get(url + "/health", timeout=2).status_code)
                if codes[-1] == 503:  # (the engine may become ready in between)
                    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
                    early.append(r.json()["error"]["type"] if r.status_code == 503 else r.status_code)
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert 503 in codes and codes[-1] == 200, codes
        assert "ServiceUnavailableError" in early and set(early) <= {"ServiceUnavailableError", 200}, early
    finally:
        proc.send_signal(2)
        proc.wait(30)
    r = subprocess.run(fake_server_cmd("--host", "127.0.0.1", "--port", str(free_port())), capture_output=True,
                       text=True, timeout=120, env={**os.environ, "FAKE_START_ERROR": "no such device"})
    assert r.returncode == 1, r.stderr
    assert "the engine failed to start: no such device" in r.stderr and "Traceback" not in r.stderr


def test_requests_past_the_shutdown_deadline_fail_with_error_bodies(tmp_path):
    """At --shutdown-timeout the requests still running fail with an OpenAI error: a 503 body,
    or a stream's error event and [DONE] (uvicorn's own deadline would cut them with a
    text/plain 500 or mid-chunk)."""
    import json as _json
    import signal

    s = ServerProcess(fake_server_cmd("--shutdown-timeout", "1"), env={"FAKE_DELAY": "0.05"}, log=tmp_path / "log")
    got: dict = {}

    def plain() -> None:
        got["plain"] = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 120}, timeout=60)

    threads = [threading.Thread(target=plain)]
    threads[0].start()
    t, lines, _ = stream_in_thread(s.url + "/v1/completions", {"prompt": "x", "max_tokens": 120, "stream": True})
    threads.append(t)
    time.sleep(1.0)
    t0 = time.monotonic()
    assert s.stop(sig=signal.SIGINT) == 0, s.tail()
    assert time.monotonic() - t0 < 5
    for t in threads:
        t.join(30)
    r = got["plain"]
    assert r.status_code == 503 and r.json()["error"]["message"] == "the server is shutting down", r.text
    assert lines[-1] == "data: [DONE]" and _json.loads(lines[-2][6:])["error"]["code"] == 503, lines[-3:]
    assert "Traceback" not in s.tail()
