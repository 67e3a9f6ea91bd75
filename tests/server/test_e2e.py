"""Acceptance tests: `drlora-serve --model tiny` (real engine, CPU) in a subprocess on
127.0.0.1, driven by the official openai client; outputs compared with the offline
`drlora_serve.llm.LLM` for the same seeds."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import string
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from drlora_serve.types import SamplingParams
from tests.server.conftest import ServerProcess, make_adapter, real_server_cmd, stream_in_thread

KEY = "test-key"
PROMPTS = ["The cat", "Once upon a time", "hello world"]
MAX_PROMPTS = 600


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    adapters = tmp / "adapters"
    make_adapter(adapters / "a1", seed=1)
    make_adapter(adapters / "a2", seed=2, max_rank=8)
    make_adapter(adapters / ".staging" / "b1", seed=3)  # hidden: only loadable by endpoint
    make_adapter(tmp / "outside" / "evil", seed=4)
    s = ServerProcess(real_server_cmd("--adapters", str(adapters), "--watch-interval", "0.2",
                                      "--api-key", KEY, "--max-num-seqs", "16", "--max-prompts-per-request",
                                      str(MAX_PROMPTS)), log=tmp / "log.txt")
    yield {"server": s, "url": s.url, "adapters": adapters, "tmp": tmp}
    assert s.stop() == 0, s.tail()  # SIGINT: graceful shutdown, exit 0
    assert "Application shutdown complete" in s.tail()


@pytest.fixture(scope="module")
def llm(env):
    from drlora_serve.llm import LLM

    a = env["adapters"]
    return LLM(model="tiny", adapters={"a1": str(a / "a1"), "a2": str(a / "a2")})


def client(env, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=env["url"] + "/v1", api_key=KEY, max_retries=0, **kw)


def wait_for_model(env, name: str, present: bool = True, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (name in [m.id for m in client(env).models.list().data]) == present:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} {'never appeared' if present else 'never went away'}")


def test_concurrent_adapters_match_offline_llm(env, llm):
    wait_for_model(env, "a2")
    jobs = [(p, m, seed) for p in PROMPTS for m in ("tiny", "a1", "a2") for seed in (7,)]
    aclient = openai.AsyncOpenAI(base_url=env["url"] + "/v1", api_key=KEY, max_retries=0)

    async def one(p, m, seed, stream):
        kw = dict(model=m, prompt=p, max_tokens=12, temperature=0.8, seed=seed)
        if not stream:
            return (await aclient.completions.create(**kw)).choices[0].text
        parts = [c.choices[0].text async for c in await aclient.completions.create(**kw, stream=True) if c.choices]
        return "".join(parts)

    async def all_jobs():
        return await asyncio.gather(*[one(p, m, s, st) for (p, m, s) in jobs for st in (False, True)])

    got = asyncio.run(all_jobs())
    want = llm.generate([p for p, _, _ in jobs],
                        [SamplingParams(max_tokens=12, temperature=0.8, seed=s) for _, _, s in jobs],
                        adapter=[None if m == "tiny" else m for _, m, _ in jobs])
    for k, out in enumerate(want):
        assert got[2 * k] == out.outputs[0].text, jobs[k]
        assert got[2 * k + 1] == out.outputs[0].text, jobs[k]
    # adapters change the output (the weights are random and non-zero)
    assert len({got[2 * k] for k in range(3)}) > 1


def test_chat_and_lm_eval_scoring(env):
    c = client(env)
    chat = c.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    assert chat.choices[0].logprobs.content and len(chat.choices[0].logprobs.content[0].top_logprobs) == 2
    chunks = list(c.chat.completions.create(model="a1", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == chat.choices[0].message.content
    r = c.completions.create(model="a2", prompt="The cat sat on the mat", max_tokens=0, echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "The cat sat on the mat"
    assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])
    assert all(len(t) >= 1 for t in lp.top_logprobs[1:])


def random_stops(rng: random.Random, text: str) -> list[str]:
    """1 to 4 stop strings: pieces of the unconstrained output (so that some hit, anywhere)
    and random strings of 3 to 10 characters (longer than the text so far, so held back)."""
    stops = []
    for _ in range(rng.randint(1, 4)):
        if text and rng.random() < 0.5:
            i = rng.randrange(len(text))
            stops.append(text[i:i + rng.randint(1, 8)])
        else:
            stops.append("".join(rng.choices(string.ascii_letters + " :>-=", k=rng.randint(3, 10))))
    return stops


def test_streamed_text_equals_unstreamed_over_random_stop_sets(env):
    """Joined stream deltas == the non-streamed text, and the same finish and stop reasons, for
    random stop sets, greedy and seeded sampling, completions and chat, n = 1 and 2 (issue 10.2)."""
    aclient = openai.AsyncOpenAI(base_url=env["url"] + "/v1", api_key=KEY, max_retries=0)
    rng = random.Random(10)
    modes = {"greedy": dict(temperature=0), "seeded": dict(temperature=1.0, seed=3)}

    def call(kind: str, model: str, kw: dict, stream: bool):
        if kind == "chat":
            return aclient.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "dave:26 frank:56. get frank:"}],
                stream=stream, **kw)
        return aclient.completions.create(model=model, prompt="dave:26 frank:56. get frank:",
                                          stream=stream, **kw)

    async def unstreamed(kind, model, kw) -> list[tuple[str, str]]:
        r = await call(kind, model, kw, False)
        return [((c.message.content if kind == "chat" else c.text), c.finish_reason, c.model_extra["stop_reason"])
                for c in sorted(r.choices, key=lambda c: c.index)]

    async def streamed(kind, model, kw) -> list[tuple[str, str]]:
        text: dict[int, str] = {}
        reason: dict[int, tuple] = {}
        async for ch in await call(kind, model, kw, True):
            for c in ch.choices:
                piece = (c.delta.content or "") if kind == "chat" else c.text
                text[c.index] = text.get(c.index, "") + piece
                if c.finish_reason:
                    reason[c.index] = (c.finish_reason, c.model_extra["stop_reason"])
        return [(text[i], *reason[i]) for i in sorted(text)]

    async def main() -> int:
        cases = [(kind, model, mode, n) for kind in ("completions", "chat") for model in ("tiny", "a1")
                 for mode in modes for n in (1, 2) if not (mode == "greedy" and n == 2)]
        bases = await asyncio.gather(*[unstreamed(kind, model, dict(max_tokens=16, n=n, **modes[mode]))
                                       for kind, model, mode, n in cases])
        jobs = []
        for (kind, model, mode, n), base in zip(cases, bases):
            for _ in range(4):
                stops = random_stops(rng, rng.choice(base)[0])
                jobs.append((kind, model, dict(max_tokens=16, n=n, stop=stops, **modes[mode])))
        got = await asyncio.gather(*[f(*job) for job in jobs for f in (unstreamed, streamed)])
        for k, job in enumerate(jobs):
            assert got[2 * k + 1] == got[2 * k], job
        for (kind, model, kw), g in zip(jobs, got[::2]):
            for text, reason, stop_reason in g:  # a stop string ends it (eos: None)
                assert stop_reason is None or (reason == "stop" and stop_reason in kw["stop"]), (kw, g)
        return sum(s is not None for g in got for _, _, s in g)

    stopped = asyncio.run(main())
    assert stopped > 10  # the stop sets did cut some outputs


def test_hot_load_by_folder_and_endpoint(env):
    c, url, a = client(env), env["url"], env["adapters"]
    make_adapter(a / "dropped", seed=5)
    wait_for_model(env, "dropped")
    assert c.completions.create(model="dropped", prompt="x", max_tokens=2).usage.completion_tokens == 2
    shutil.rmtree(a / "dropped")
    wait_for_model(env, "dropped", present=False)

    h = {"Authorization": f"Bearer {KEY}"}
    body = {"lora_name": "b1", "lora_path": str(a / ".staging" / "b1")}
    r = httpx.post(url + "/v1/load_lora_adapter", json=body, headers=h)
    assert r.status_code == 200, r.text
    assert c.completions.create(model="b1", prompt="x", max_tokens=2).usage.completion_tokens == 2
    assert httpx.post(url + "/v1/load_lora_adapter", json=body, headers=h).status_code == 400
    assert httpx.post(url + "/v1/load_lora_adapter", json={**body, "load_inplace": True}, headers=h).status_code == 200
    # a PEFT folder (what vLLM users pass) loads through the endpoint too, with the same outputs
    from drlora.peft import export_peft

    export_peft(a / ".staging" / "b1", a / ".staging" / "b1-peft")
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "pe", "lora_path": str(a / ".staging" / "b1-peft")},
                   headers=h)
    assert r.status_code == 200, r.text
    kw = dict(prompt="hello there", max_tokens=4, temperature=0)
    assert c.completions.create(model="pe", **kw).choices[0].text == c.completions.create(model="b1", **kw).choices[0].text
    # ... and so does a PEFT folder dropped into the watched folder
    shutil.copytree(a / ".staging" / "b1-peft", a / "pe-dropped")
    wait_for_model(env, "pe-dropped")
    assert c.completions.create(model="pe-dropped", **kw).choices[0].text == c.completions.create(model="pe", **kw).choices[0].text
    shutil.rmtree(a / "pe-dropped")
    wait_for_model(env, "pe-dropped", present=False)
    for name in ("a/b", "x\ny", " "):
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(a / ".staging" / "b1")},
                       headers=h)
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", r.text
    for bad in (str(env["tmp"] / "outside" / "evil"), str(a / ".." / "outside" / "evil")):
        assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "e", "lora_path": bad}, headers=h).status_code == 400
    assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "e", "lora_path": str(a / "nothing")}, headers=h).status_code == 404
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "b1"}, headers=h).status_code == 200
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="b1", prompt="x", max_tokens=2)


def test_folder_recreated_with_other_weights_never_hits_the_old_prefix_cache(env):
    """Retraining into the same folder: the watcher unloads the name, then loads it again
    (its version restarts at 1). The old weights' cached KV must not be reused (issue 10.1)."""
    c, a = client(env), env["adapters"]
    prompt = " ".join(f"k{i}:{i * 7 % 100}" for i in range(12))  # several full KV blocks
    kw = dict(prompt=prompt, max_tokens=6, temperature=0, logprobs=0)
    make_adapter(a / "retrained", seed=9)
    wait_for_model(env, "retrained")
    before = c.completions.create(model="retrained", **kw).choices[0]
    shutil.rmtree(a / "retrained")
    wait_for_model(env, "retrained", present=False)
    shutil.copytree(a / "a1", a / "retrained")  # now the same weights as a1
    wait_for_model(env, "retrained")
    again = c.completions.create(model="retrained", **kw).choices[0]
    ref = c.completions.create(model="a1", **kw).choices[0]
    assert again.text == ref.text != before.text
    assert again.logprobs.token_logprobs == pytest.approx(ref.logprobs.token_logprobs, abs=1e-5)
    shutil.rmtree(a / "retrained")


SURROGATE = '"\\ud800x"'  # JSON text of a lone surrogate: valid JSON, not encodable as UTF-8
DEEP = "[" * 100_000 + "]" * 100_000

# (method, path, raw JSON body or None, status, param): each is sent as is on one connection
MALFORMED = [
    ("POST", "/v1/completions", '{"model": "tiny", "prompt": %s}' % SURROGATE, 400, "prompt"),
    ("POST", "/v1/completions", '{"prompt": ["ok", %s]}' % SURROGATE, 400, "prompt"),
    ("POST", "/v1/completions", '{"model": %s, "prompt": "x"}' % SURROGATE, 400, "model"),
    ("POST", "/v1/completions", '{"prompt": "x", "stop": [%s]}' % SURROGATE, 400, "stop"),
    ("POST", "/v1/completions", '{"prompt": "x", "user": %s}' % SURROGATE, 400, "user"),
    ("POST", "/v1/completions", '{"prompt": "x", "logit_bias": {%s: 1}}' % SURROGATE, 400, "logit_bias"),
    ("POST", "/v1/completions", '{"prompt": "x", "response_format": {"type": %s}}' % SURROGATE, 400,
     "response_format"),
    ("POST", "/v1/chat/completions", '{"messages": [{"role": "user", "content": %s}]}' % SURROGATE, 400,
     "messages"),
    ("POST", "/v1/chat/completions",
     '{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}' % SURROGATE, 400, "messages"),
    ("POST", "/v1/chat/completions", '{"messages": [{"role": %s, "content": "x"}]}' % SURROGATE, 400, "messages"),
    ("POST", "/v1/chat/completions", '{"model": %s, "messages": [{"role": "user", "content": "x"}]}' % SURROGATE,
     400, "model"),
    ("POST", "/v1/load_lora_adapter", '{"lora_name": %s, "lora_path": "x"}' % SURROGATE, 400, "lora_name"),
    ("POST", "/v1/load_lora_adapter", '{"lora_name": "x", "lora_path": %s}' % SURROGATE, 400, "lora_path"),
    ("POST", "/v1/unload_lora_adapter", '{"lora_name": %s}' % SURROGATE, 400, "lora_name"),
    ("POST", "/v1/completions", '{oops', 400, None),
    ("POST", "/v1/completions", '{"prompt": "x"', 400, None),
    ("POST", "/v1/completions", '', 400, None),
    ("POST", "/v1/completions", 'null', 400, None),
    ("POST", "/v1/completions", '[]', 400, None),
    ("POST", "/v1/completions", '"prompt"', 400, None),
    ("POST", "/v1/completions", '{"prompt": 5}', 400, "prompt"),
    ("POST", "/v1/completions", '{"prompt": {"a": 1}}', 400, "prompt"),
    ("POST", "/v1/completions", '{"prompt": [[1, "a"]]}', 400, "prompt"),
    ("POST", "/v1/completions", '{"prompt": "x", "max_tokens": "many"}', 400, "max_tokens"),
    ("POST", "/v1/completions", '{"prompt": "x", "max_tokens": 1e400}', 400, "max_tokens"),
    ("POST", "/v1/completions", '{"prompt": "x", "max_tokens": %d}' % 10**40, 400, "max_tokens"),
    ("POST", "/v1/completions", '{"prompt": "x", "n": %d}' % 10**30, 400, "n"),
    ("POST", "/v1/completions", '{"prompt": "x", "seed": %d}' % 10**30, 400, "seed"),
    ("POST", "/v1/completions", '{"prompt": [%d]}' % 10**30, 400, "prompt"),
    ("POST", "/v1/completions", '{"prompt": "x", "stop_token_ids": [%d]}' % 10**30, 400, "stop_token_ids"),
    ("POST", "/v1/completions", '{"prompt": "x", "top_k": %d}' % 10**20, 400, "top_k"),
    ("POST", "/v1/completions", '{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("POST", "/v1/completions", '{"prompt": "x", "top_p": -Infinity}', 400, "top_p"),
    ("POST", "/v1/completions", '{"prompt": "x", "temperature": 1e308}', 400, "temperature"),
    ("POST", "/v1/completions", '{"prompt": "x", "presence_penalty": NaN}', 400, "presence_penalty"),
    ("POST", "/v1/completions", '{"prompt": %s}' % DEEP, 400, None),
    ("POST", "/v1/completions", '{"prompt": "x", "stream_options": "yes"}', 400, "stream_options"),
    ("POST", "/v1/chat/completions", '{"messages": "hi"}', 400, "messages"),
    ("POST", "/v1/chat/completions",
     '{"messages": [{"role": "user", "content": [{"type": "text", "text": {"a": [1, 2]}}]}]}', 400, "messages"),
    ("POST", "/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400,
     "messages"),
    ("POST", "/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400,
     "max_tokens"),
    ("GET", "/v1/completions", None, 405, None),
    ("GET", "/v1/nothing", None, 404, None),
    ("GET", "/v1/models/%ED%A0%80", None, 404, None),
]


def test_malformed_inputs_are_4xx_and_keep_the_connection(env):
    """Every malformed body is a 4xx with the OpenAI error body naming the field, and the
    keep-alive connection survives all of them in a row (issue 10.3)."""
    connects = []

    def trace(event: str, info: dict) -> None:
        if event == "connection.connect_tcp.complete":
            connects.append(event)

    h = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    with httpx.Client(base_url=env["url"], headers=h, timeout=60,
                      limits=httpx.Limits(max_connections=1)) as c:
        for method, path, body, status, param in MALFORMED:
            r = c.request(method, path, content=None if body is None else body.encode("utf-8", "surrogatepass"),
                          extensions={"trace": trace})
            assert r.status_code == status, (path, body[:200] if body else None, r.text[:300])
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, err
            if param is not None:
                assert err["param"] == param, (body, err)
        # wrong key (body never read), then a good request: still the same connection
        r = c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"},
                   extensions={"trace": trace})
        assert r.status_code == 401
        r = c.post("/v1/completions", json={"prompt": "dave:26", "max_tokens": 3}, extensions={"trace": trace})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert len(connects) == 1, f"{len(connects)} connections for {len(MALFORMED) + 2} requests"


def engine_load(url: str) -> tuple[float, float, float]:
    """(running, waiting, generated tokens so far) from /metrics."""
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    return tuple(fams[n].samples[0].value for n in
                 ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:generation_tokens"))


def wait_load(url: str, pred, timeout: float) -> tuple[float, float, float]:
    deadline = time.monotonic() + timeout
    while True:
        load = engine_load(url)
        if pred(load) or time.monotonic() > deadline:
            return load
        time.sleep(0.05)


def test_prompt_count_is_bounded(env):
    c = client(env)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=["x"] * (MAX_PROMPTS + 1), max_tokens=1)
    assert e.value.body["param"] == "prompt" and "--max-prompts-per-request" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):  # prompts x n counts
        c.completions.create(model="tiny", prompt=["x"] * (MAX_PROMPTS // 2), n=3, max_tokens=1)
    r = c.completions.create(model="tiny", prompt=[f"p{i}" for i in range(40)], max_tokens=2, n=2)
    assert sorted(ch.index for ch in r.choices) == list(range(80))


@pytest.mark.parametrize("stream", [False, True])
def test_many_prompts_run_together_count_in_gauges_and_stop_with_the_client(env, stream):
    """One request with MAX_PROMPTS long prompts: all submitted at once (the gauges count them
    all at once: 16 running, the rest waiting), and all aborted when the client hangs up
    (issue 10.4)."""
    url, n = env["url"], MAX_PROMPTS
    assert wait_load(url, lambda l: l[0] + l[1] == 0, 10)[:2] == (0, 0)
    body = json.dumps({"model": "a1", "prompt": [f"item {i}: the" for i in range(n)], "max_tokens": 300,
                       "ignore_eos": True, "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", env["server"].port))
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer " + KEY.encode() +
                     b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        running, waiting, _ = wait_load(url, lambda l: l[0] + l[1] == n, 20)
        assert (running, waiting) == (16, n - 16), "not all prompts were submitted together"
        if stream:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        sock.close()  # the client hangs up
    t0 = time.monotonic()
    running, waiting, tokens = wait_load(url, lambda l: l[0] + l[1] == 0, 10)
    assert (running, waiting) == (0, 0), "the prompts ran on after the client left"
    assert time.monotonic() - t0 < 5
    time.sleep(0.5)
    assert engine_load(url)[2] == tokens  # nothing generated any more


def test_errors_and_metrics(env):
    c, url = client(env), env["url"]
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt="x", max_tokens=1)
    assert e.value.body["message"] == "The model `nope` does not exist."
    for kw in (dict(prompt=[5] * 600), dict(prompt="x", max_tokens=10_000), dict(prompt="x", temperature=-1),
               dict(prompt="x", top_p=2.0)):
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="tiny", **{"max_tokens": 1, **kw})
    r = httpx.post(url + "/v1/completions", content=b"{", headers={"Authorization": f"Bearer {KEY}",
                                                                  "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    assert httpx.get(url + "/v1/models").status_code == 401
    text = httpx.get(url + "/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["vllm:generation_tokens"].samples[0].value > 0
    assert fams["vllm:time_to_first_token_seconds"].samples
    assert "vllm:lora_requests_info" in fams and "vllm:kv_cache_usage_perc" in fams


def test_adapter_residency_and_load_time_metrics(tmp_path):
    """/metrics says where each adapter is (device pool, host memory, disk), how big it is,
    and how long loads took by stage. One device slot and one host slot make every tier
    appear in a known order (issue 10.8)."""
    from drlora.adapter_format import load_config

    adapters = tmp_path / "adapters"
    make_adapter(adapters / "a", seed=1)
    make_adapter(adapters / "b", seed=2, max_rank=8)
    s = ServerProcess(real_server_cmd("--adapters", str(adapters), "--max-loras", "1", "--max-cpu-loras", "1"),
                      log=tmp_path / "log.txt")
    try:
        def scrape() -> tuple[dict, dict]:
            fams = {f.name: f for f in text_string_to_metric_families(httpx.get(s.url + "/metrics").text)}
            tiers = {x.labels["lora_name"]: x.labels for x in fams["drlora:loaded_lora_adapters"].samples}
            loads = {(x.labels["stage"], x.name.rsplit("_", 1)[-1]): x.value
                     for x in fams["drlora:lora_load_seconds"].samples if not x.name.endswith("_bucket")}
            return tiers, loads

        def ask(model: str) -> None:
            r = httpx.post(s.url + "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 200, r.text

        def settled(want: dict) -> tuple[dict, dict]:  # stats refresh right after the engine step
            deadline = time.monotonic() + 5
            while True:
                tiers, loads = scrape()
                if {k: v["tier"] for k, v in tiers.items()} == want or time.monotonic() > deadline:
                    assert {k: v["tier"] for k, v in tiers.items()} == want
                    return tiers, loads
                time.sleep(0.05)

        tiers, loads = settled({"a": "disk", "b": "cpu"})  # loading b pushed a out of the host slot
        for name in ("a", "b"):
            cfg = load_config(adapters / name)
            top = max(max(map(max, r)) for r in cfg.ranks.values())
            assert tiers[name]["total_rank"] == str(cfg.total_ranks()) and tiers[name]["max_rank"] == str(top)
            assert tiers[name]["model_name"] == "tiny"
        assert loads[("disk_to_cpu", "count")] == 2 and loads[("cpu_to_gpu", "count")] == 0
        ask("a")  # read again from disk, placed on the device
        tiers, loads = settled({"a": "gpu", "b": "disk"})
        assert loads[("disk_to_cpu", "count")] == 3 and loads[("cpu_to_gpu", "count")] == 1
        ask("b")  # evicts a from the one device slot
        tiers, loads = settled({"a": "disk", "b": "gpu"})
        assert loads[("disk_to_cpu", "count")] == 4 and loads[("cpu_to_gpu", "count")] == 2
        assert 0 < loads[("disk_to_cpu", "sum")] < 60 and 0 < loads[("cpu_to_gpu", "sum")] < 60
    finally:
        assert s.stop() == 0, s.tail()


def test_streamed_echo_logprobs_equal_unstreamed_when_prompts_are_chunked(env):
    """Prompts submitted together share the step's token budget, so a long prompt is scored
    over several steps: the streamed echo must wait for all of its prompt logprobs."""
    c = client(env)
    prompts = [" ".join(f"w{i}x{j}" for j in range(70)) for i in range(12)]  # ~400 tokens each
    kw = dict(model="tiny", prompt=prompts, max_tokens=1, echo=True, logprobs=1, temperature=0)
    full = c.completions.create(**kw)
    want = {ch.index: ch.logprobs.token_logprobs for ch in full.choices}
    got: dict[int, list] = {}
    for chunk in c.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            got.setdefault(ch.index, []).extend(ch.logprobs.token_logprobs)
    assert sum(x is None for x in want[0]) == 1  # only the first prompt token has none
    assert got.keys() == want.keys()
    for i, lps in want.items():  # the two runs batch differently: float rounding may differ
        assert [x is None for x in got[i]] == [x is None for x in lps]
        assert [x for x in got[i] if x is not None] == pytest.approx([x for x in lps if x is not None], abs=1e-4)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_to_the_process_group_stops_cleanly(tmp_path, sig):
    """Ctrl-C in a terminal (SIGINT), and a service manager's stop (systemd's default
    KillMode, supervisord's stopasgroup: SIGTERM), signal the server's whole process group, the
    engine core process included: a stream in flight finishes, the server drains and exits 0,
    the core stops when told (no KeyboardInterrupt traceback from it), and no process of the
    group is left behind."""
    import os
    import signal

    s = ServerProcess(real_server_cmd(), log=tmp_path / "log.txt", group=True)
    pgid = s.proc.pid
    r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3})
    assert r.status_code == 200
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
    t, lines, first = stream_in_thread(s.url + "/v1/completions", body)
    assert first.wait(30)
    # uvicorn re-raises the signal once it has shut down: SIGTERM's exit is then -15, which
    # service managers count as a clean stop
    assert s.stop(sig=getattr(signal, sig)) in (0, -signal.SIGTERM), s.tail()
    t.join(30)
    assert lines[-1] == "data: [DONE]" and "error" not in "".join(lines), lines[-3:]
    log = (tmp_path / "log.txt").read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    deadline = time.monotonic() + 10
    while True:  # the group is empty once every member has exited
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "a process of the server's group is still running"
        time.sleep(0.1)


def test_engine_core_death_fails_requests_and_stops_the_server(tmp_path):
    """If the engine core process dies, a stream in flight ends with an error event, and the
    server stops with status 1 (as vLLM's does, for a supervisor to restart it) rather than
    living on with a dead engine, stale metrics and 4xx answers."""
    import os
    import signal
    from pathlib import Path

    s = ServerProcess(real_server_cmd(), log=tmp_path / "log.txt")
    kids = [int(p) for p in os.popen(f"pgrep -P {s.proc.pid}").read().split()]
    core = [p for p in kids if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(core) == 1, kids
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
    t, lines, first = stream_in_thread(s.url + "/v1/completions", body)
    assert first.wait(30)
    os.kill(core[0], signal.SIGKILL)
    t.join(30)
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == 503, lines[-2:]
    assert s.proc.wait(30) == 1, s.tail()
    assert "the engine core is dead; stopping the server" in s.tail()
