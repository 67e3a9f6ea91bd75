"""Acceptance tests: `drlora-serve --model tiny` (real engine, CPU) in a subprocess on
127.0.0.1, driven by the official openai client; outputs compared with the offline
`drlora_serve.llm.LLM` for the same seeds."""

from __future__ import annotations

import asyncio
import shutil
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from drlora_serve.types import SamplingParams
from tests.server.conftest import ServerProcess, make_adapter, real_server_cmd

KEY = "test-key"
PROMPTS = ["The cat", "Once upon a time", "hello world"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    adapters = tmp / "adapters"
    make_adapter(adapters / "a1", seed=1)
    make_adapter(adapters / "a2", seed=2, max_rank=8)
    make_adapter(adapters / ".staging" / "b1", seed=3)  # hidden: only loadable by endpoint
    make_adapter(tmp / "outside" / "evil", seed=4)
    s = ServerProcess(real_server_cmd("--adapters", str(adapters), "--watch-interval", "0.2",
                                      "--api-key", KEY, "--max-num-seqs", "16"), log=tmp / "log.txt")
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
    for bad in (str(env["tmp"] / "outside" / "evil"), str(a / ".." / "outside" / "evil")):
        assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "e", "lora_path": bad}, headers=h).status_code == 400
    assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "e", "lora_path": str(a / "nothing")}, headers=h).status_code == 404
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "b1"}, headers=h).status_code == 200
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="b1", prompt="x", max_tokens=2)


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
