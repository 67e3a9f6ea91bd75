"""Sampling controls, structured outputs and tool calls through the real server (`drlora-serve
--model tiny` in a subprocess) driven by the openai client: outputs equal the offline LLM's,
JSON outputs validate, streamed equals non-streamed, tool calls come back as OpenAI tool_calls."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from drlora_serve.types import SamplingParams
from tests.server.conftest import ServerProcess, make_adapter, real_server_cmd

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "temp": {"type": "integer", "minimum": -50,
                                                                           "maximum": 60},
                   "sky": {"enum": ["clear", "cloudy", "rain"]}},
    "required": ["city", "temp", "sky"],
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 10},
                                                "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"]}}}
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e-structured")
    make_adapter(tmp / "adapters" / "a1", seed=1)
    s = ServerProcess(real_server_cmd("--adapters", str(tmp / "adapters"), "--max-num-seqs", "16",
                                      "--structured-outputs-config",
                                      '{"disable_any_whitespace": true, "disable_additional_properties": true}'),
                      log=tmp / "log.txt")
    yield {"url": s.url, "adapters": tmp / "adapters"}
    assert s.stop() == 0, s.tail()


def client(env) -> openai.OpenAI:
    return openai.OpenAI(base_url=env["url"] + "/v1", api_key="x", max_retries=0)


def aclient(env) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=env["url"] + "/v1", api_key="x", max_retries=0)


def test_controls_equal_offline_llm(env):
    from drlora_serve.llm import LLM

    llm = LLM(model="tiny", adapters={"a1": str(env["adapters"] / "a1")})
    cases = [
        dict(repetition_penalty=1.4, frequency_penalty=0.5),
        dict(presence_penalty=-1.0, min_p=0.2, temperature=0.9, seed=5),
        dict(logit_bias={"18": 5.0, "225": -100}, min_tokens=6),
        dict(bad_words=["the", " cat"], allowed_token_ids=list(range(5, 500))),
        dict(logit_bias={"1": 100}, skip_special_tokens=False, max_tokens=4),
        dict(stop=["a"], include_stop_str_in_output=True, ignore_eos=True),
    ]
    c = client(env)
    for model in ("tiny", "a1"):
        for kw in cases:
            kw = {"temperature": 0, "max_tokens": 12, **kw}
            got = c.completions.create(model=model, prompt="The cat sat", extra_body=kw)
            sp = SamplingParams(**{k: v for k, v in kw.items() if k != "logit_bias"},
                                logit_bias={int(k): max(-100.0, v) for k, v in kw.get("logit_bias", {}).items()}
                                or None)
            ref = llm.generate("The cat sat", sp, adapter=None if model == "tiny" else model)[0].outputs[0]
            assert got.choices[0].text == ref.text, (model, kw)
            assert got.choices[0].finish_reason == ref.finish_reason
    pad = c.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0, logit_bias={"1": 100},
                               extra_body={"skip_special_tokens": False})
    assert pad.choices[0].text == "<|pad|>" * 3


def test_response_format_and_guided_fields(env):
    c = client(env)
    rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}
    texts = set()
    for seed in range(6):
        r = c.chat.completions.create(model="a1" if seed % 2 else "tiny", messages=MSG, max_tokens=80,
                                      temperature=1.0, seed=seed, response_format=rf)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        texts.add(r.choices[0].message.content)
    assert len(texts) > 2
    obj = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=60, temperature=0,
                                    response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    r = c.completions.create(model="tiny", prompt="Code:", max_tokens=20, temperature=0.8, seed=1, n=4,
                             extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{2,3}"})
    assert all(__import__("re").fullmatch(r"[A-Z]{2}-[0-9]{2,3}", ch.text) for ch in r.choices)
    r = c.completions.create(model="a1", prompt="Answer:", max_tokens=20, temperature=1.0, seed=2, n=4,
                             extra_body={"guided_choice": ["yes", "no"]})
    assert {ch.text for ch in r.choices} <= {"yes", "no"}
    r = c.completions.create(model="tiny", prompt="Answer:", max_tokens=20, temperature=1.0, seed=2,
                             extra_body={"structured_outputs": {"grammar": 'start: "x" /[0-9]/ "y"'}})
    assert __import__("re").fullmatch(r"x[0-9]y", r.choices[0].text)
    g = c.completions.create(model="tiny", prompt="Data:", max_tokens=80, temperature=0,
                             extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(g.choices[0].text), SCHEMA)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=MSG, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                "a": {"$ref": "#/missing"}}}}})
    assert e.value.body["param"] == "response_format"


def test_constrained_streams_equal_unstreamed(env):
    ac = aclient(env)
    rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}

    async def chat(stream: bool, seed: int):
        kw = dict(model="a1", messages=MSG, max_tokens=80, temperature=0.9, seed=seed, n=2, response_format=rf)
        if not stream:
            r = await ac.chat.completions.create(**kw)
            return sorted((ch.index, ch.message.content, ch.finish_reason) for ch in r.choices)
        text, reason = {}, {}
        async for ch in await ac.chat.completions.create(**kw, stream=True):
            for c in ch.choices:
                text[c.index] = text.get(c.index, "") + (c.delta.content or "")
                reason[c.index] = c.finish_reason or reason.get(c.index)
        return sorted((i, text[i], reason[i]) for i in text)

    async def main():
        return await asyncio.gather(*[chat(s, seed) for seed in (1, 2, 3) for s in (False, True)])

    got = asyncio.run(main())
    for k in range(0, len(got), 2):
        assert got[k] == got[k + 1]
        for _, text, _ in got[k]:
            jsonschema.validate(json.loads(text), SCHEMA)


def _stream_tool_calls(c, **kw):
    calls: dict[int, dict] = {}
    finish = None
    for ch in c.chat.completions.create(stream=True, **kw):
        for choice in ch.choices:
            for tc in choice.delta.tool_calls or []:
                cur = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    cur["id"] = tc.id
                if tc.function and tc.function.name:
                    cur["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    cur["arguments"] += tc.function.arguments
            finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}],
                         ids=["required", "named"])
def test_tool_calls(env, tool_choice):
    c = client(env)
    schemas = {"get_weather": WEATHER["function"]["parameters"], "add": ADD["function"]["parameters"]}
    complete = 0
    for seed in range(4):
        kw = dict(model="tiny", messages=MSG, tools=[WEATHER, ADD], tool_choice=tool_choice, max_tokens=150,
                  temperature=0.8, seed=seed, parallel_tool_calls=seed == 3)  # the tiny model never stops calling
        r = c.chat.completions.create(**kw)
        ch = r.choices[0]
        streamed, finish = _stream_tool_calls(c, **kw)
        assert finish == ch.finish_reason
        if ch.finish_reason == "length":  # cut inside the call list: the text, as generated
            assert ch.message.tool_calls is None and ch.message.content
            continue
        complete += 1
        # (OpenAI and vLLM: "tool_calls" for "required", "stop" for a named function)
        assert ch.finish_reason == ("tool_calls" if tool_choice == "required" else "stop"), ch
        assert ch.message.content is None, ch
        calls = ch.message.tool_calls
        assert calls and all(tc.id.startswith("call_") and tc.type == "function" for tc in calls)
        for tc in calls:
            jsonschema.validate(json.loads(tc.function.arguments), schemas[tc.function.name])
        if tool_choice != "required":
            assert [tc.function.name for tc in calls] == ["add"]
        elif seed < 3:
            assert len(calls) == 1
        assert [(s["name"], s["arguments"]) for s in streamed] == \
            [(tc.function.name, tc.function.arguments) for tc in calls]
        assert all(s["id"] and s["id"].startswith("call_") for s in streamed)
    assert complete >= 2


def test_tool_choice_errors_and_followup_turn(env):
    c = client(env)
    for kw, param in ((dict(tools=[WEATHER]), "tool_choice"), (dict(tools=[WEATHER], tool_choice="auto"), "tool_choice"),
                      (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
                       "tool_choice"),
                      (dict(tool_choice="required"), "tool_choice"),
                      (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
                       "response_format")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, **kw)
        assert e.value.body["param"] == param, kw
    plain = c.chat.completions.create(model="tiny", messages=MSG, tools=[WEATHER], tool_choice="none", max_tokens=4)
    assert plain.choices[0].message.tool_calls is None
    follow = c.chat.completions.create(model="tiny", max_tokens=4, messages=MSG + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assert follow.choices[0].finish_reason in ("stop", "length")


def test_prompt_logprobs_and_truncation(env, tokenizer):
    c = client(env)
    r = c.completions.create(model="tiny", prompt="The cat sat on the mat", max_tokens=1,
                             extra_body={"prompt_logprobs": 2})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    ids = c.completions.create(model="tiny", prompt="The cat sat on the mat", max_tokens=0, echo=True, logprobs=0)
    assert plp[0] is None and len(plp) == len(ids.choices[0].logprobs.tokens)
    for entry in plp[1:]:
        assert 1 <= len(entry) <= 3
        for tid, v in entry.items():
            assert int(tid) >= 0 and v["rank"] >= 1 and v["logprob"] <= 0 and isinstance(v["decoded_token"], str)
        assert sorted(v["rank"] for v in entry.values())[:2] == [1, 2] or len(entry) == 3
    chat = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=1, extra_body={"prompt_logprobs": 0})
    assert chat.model_extra["prompt_logprobs"][0] is None and len(chat.model_extra["prompt_logprobs"]) > 5
    prompt = "one two three four five six seven"
    t = c.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, echo=True,
                             extra_body={"truncate_prompt_tokens": 3})
    last3 = tokenizer.encode(prompt)[-3:]
    assert t.usage.prompt_tokens == 3 and t.choices[0].text.startswith(tokenizer.decode(last3))
    same = c.completions.create(model="tiny", prompt=last3, max_tokens=2, temperature=0)
    assert t.choices[0].text == tokenizer.decode(last3) + same.choices[0].text


def _strict_sse(r) -> list[dict]:
    """The stream's JSON events, parsed strictly (no NaN or Infinity: not JSON)."""
    def refuse(c):
        raise AssertionError(f"{c} is not JSON")
    events = [ln[len("data: "):] for ln in r.text.split("\n\n") if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e, parse_constant=refuse) for e in events[:-1]]


def test_logprobs_of_tokens_a_grammar_forbids(env):
    """Top logprobs under a grammar list tokens it forbids (fewer than k allowed) at vLLM's
    floor, -9999.0, not -inf (no JSON), in completions and chat, streamed or not."""
    import httpx

    body = {"model": "tiny", "prompt": "Give", "max_tokens": 4, "temperature": 0, "logprobs": 3,
            "guided_json": {"type": "object"}}
    r = httpx.post(env["url"] + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    tops = r.json()["choices"][0]["logprobs"]["top_logprobs"]
    values = [v for t in tops for v in t.values()]
    assert -9999.0 in values and all(v >= -9999.0 for v in values)  # "{" is the only start
    s = httpx.post(env["url"] + "/v1/completions", json={**body, "stream": True}, timeout=60)
    streamed = [v for ev in _strict_sse(s) for ch in ev["choices"] if ch["logprobs"]
                for t in ch["logprobs"]["top_logprobs"] for v in t.values()]
    assert streamed == values
    chat = {"model": "tiny", "messages": MSG, "max_tokens": 4, "temperature": 0, "logprobs": True,
            "top_logprobs": 3, "response_format": {"type": "json_object"}}
    r = httpx.post(env["url"] + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert any(t["logprob"] == -9999.0 for c in content for t in c["top_logprobs"])
    s = httpx.post(env["url"] + "/v1/chat/completions", json={**chat, "stream": True}, timeout=60)
    assert len(_strict_sse(s)) > 2


def test_a_constraint_that_cannot_go_on_is_an_error(env, tokenizer):
    """allowed_token_ids leaving none of the tokens a grammar allows: a 400 that says so and
    names the constraint's field (an error event once a stream has started), not an empty 200;
    the server goes on serving."""
    import httpx

    outside = tokenizer.encode("zzz", add_special_tokens=False)[0]
    body = {"model": "tiny", "prompt": "x", "max_tokens": 5, "allowed_token_ids": [outside],
            "guided_regex": "[0-9]+"}
    r = httpx.post(env["url"] + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and "allowed_token_ids" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "guided_regex"
    s = httpx.post(env["url"] + "/v1/completions", json={**body, "stream": True}, timeout=60)
    events = _strict_sse(s)
    assert "error" in events[-1] and events[-1]["error"]["code"] == 400
    assert events[-1]["error"]["param"] == "guided_regex"
    ok = client(env).completions.create(model="tiny", prompt="x", max_tokens=3, extra_body={"guided_regex": "[0-9]+"})
    assert ok.choices[0].text.isdigit()
