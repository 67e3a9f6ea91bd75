"""The HTTP layer in-process (FastAPI TestClient) over the FakeEngine: response formats,
every error status, load/unload with path confinement, API key, metrics exposition."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.app import build_app
from server.state import ServerConfig
from tests.server.conftest import make_adapter
from tests.server.fake_engine import FakeEngine


@pytest.fixture
def make_client(tokenizer, tmp_path):
    clients = []

    def make(**cfg) -> tuple[TestClient, FakeEngine]:
        engine = FakeEngine(tokenizer)
        cfg.setdefault("base_aliases", ["tiny", "/models/tiny"])
        cfg.setdefault("lora_roots", [str(tmp_path / "root")])
        c = TestClient(build_app(lambda: engine, ServerConfig(**cfg)))
        c.__enter__()
        clients.append(c)
        return c, engine

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def err(r, status: int, type_: str | None = None) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["code"] == status
    if type_:
        assert e["type"] == type_
    return e


def sse(r) -> list:
    lines = [ln for ln in r.text.split("\n\n") if ln.strip()]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


def test_completion_formats(make_client):
    c, _ = make_client()
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": ["a b", "c"], "max_tokens": 3, "n": 2})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert [ch["index"] for ch in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["completion_tokens"] == 12
    # token-id prompts and the alias / path of the base model
    for model in ("/models/tiny", None):
        r = c.post("/v1/completions", json={"model": model, "prompt": [5, 6, 7], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3


def test_echo_logprobs_for_lm_eval(make_client, tokenizer):
    c, _ = make_client()
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "hello world", "max_tokens": 0,
                                        "echo": True, "logprobs": 1, "temperature": 0})
    ch = r.json()["choices"][0]
    n = len(tokenizer.encode("hello world"))
    lp = ch["logprobs"]
    assert ch["text"] == "hello world"
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    assert lp["text_offset"][0] == 0 and "".join(lp["tokens"]) == "hello world"
    # echo + generation: prompt logprobs then generated ones, offsets keep increasing
    r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2, "echo": True, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(tokenizer.encode("hello")) + 2
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_streaming_completion_and_chat(make_client):
    c, _ = make_client()
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "stream": True, "logprobs": 0,
                                        "stream_options": {"include_usage": True}})
    chunks = sse(r)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    toks = [t for ch in chunks[:-1] for t in ch["choices"][0]["logprobs"]["tokens"]]
    assert len(toks) == 4 and chunks[-2]["choices"][0]["finish_reason"] == "length"
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": 3, "stream": True, "n": 2})
    chunks = sse(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"][0]["index"] == 0)
    full = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert full.json()["choices"][0]["message"]["content"] == text


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
    ({"prompt": [1] * 200, "max_tokens": 1}, 400, "prompt"),
    ({"prompt": [999999]}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "x", "presence_penalty": 3.0}, 400, "presence_penalty"),
    ({"prompt": "x", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "allowed_token_ids": [99999]}, 400, "allowed_token_ids"),
    ({"prompt": "x", "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens"),
    ({"prompt": "x", "allowed_token_ids": []}, 400, "allowed_token_ids"),
    ('{"prompt": "x", "logit_bias": {"5": NaN}}', 400, "logit_bias"),  # (JSON text: NaN is no JSON)
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "x", "guided_json": "[" * 5000 + "]" * 5000}, 400, "guided_json"),
    ({"prompt": "x", "guided_regex": "[^\\s\\S]"}, 400, "guided_regex"),  # matches no text at all
    ({"prompt": "x", "guided_grammar": 'start: start "a"'}, 400, "guided_grammar"),
    ({"prompt": "x", "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ({"prompt": "x", "response_format": {"type": "structural_tag"}}, 400, "response_format"),
    ({"prompt": "x", "structured_outputs": {"structural_tag": "x"}}, 400, "structured_outputs"),
    ({"prompt": "x", "guided_regex": "a(b"}, 400, "guided_regex"),
    ({"prompt": "x", "guided_json": {"type": "object"}, "guided_regex": "a"}, 400, "guided_regex"),
    ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs"),
    ({"prompt": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    ({}, 400, "prompt"),
])
def test_errors(make_client, body, status, param):
    c, _ = make_client()
    r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"}) \
        if isinstance(body, str) else c.post("/v1/completions", json=body)
    e = err(r, status)
    if param:
        assert e["param"] == param
    if status == 404:
        assert e == {"message": "The model `nope` does not exist.", "type": "NotFoundError",
                     "param": "model", "code": 404}


def test_malformed_json_and_engine_failure(make_client):
    c, engine = make_client()
    err(c.post("/v1/completions", content=b"{oops", headers={"content-type": "application/json"}), 400, "BadRequestError")
    err(c.post("/v1/chat/completions", json={"messages": []}), 400)
    err(c.get("/v1/nothing"), 404)
    engine.fail_next = True
    err(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4}), 500, "InternalServerError")
    assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    engine.fail_next = True  # mid-stream: an error event, then [DONE]
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and sse(r)[-1]["error"]["code"] == 500


def test_load_unload_and_models(make_client, tmp_path):
    root = tmp_path / "root"
    make_adapter(root / "a1", seed=1)
    c, engine = make_client()
    ok = c.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": str(root / "a1")})
    assert ok.status_code == 200 and "success" in ok.text.lower()
    err(c.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": str(root / "a1")}), 400)
    assert c.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": str(root / "a1"),
                                                 "load_inplace": True}).status_code == 200
    assert engine.adapters["a1"].version == 1
    models = c.get("/v1/models").json()["data"]
    a = next(m for m in models if m["id"] == "a1")
    assert a["object"] == "model" and a["parent"] == "tiny" and a["root"] == str(root / "a1")
    assert c.post("/v1/completions", json={"model": "a1", "prompt": "x", "max_tokens": 1}).status_code == 200
    err(c.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(root / "missing")}), 404)
    (root / "bad").mkdir()
    (root / "bad" / "drlora_adapter.json").write_text("{not json")
    err(c.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(root / "bad")}), 400)
    err(c.post("/v1/load_lora_adapter", json={"lora_name": "tiny", "lora_path": str(root / "a1")}), 400)
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "a1"}).status_code == 200
    err(c.post("/v1/unload_lora_adapter", json={"lora_name": "a1"}), 404)
    err(c.post("/v1/completions", json={"model": "a1", "prompt": "x"}), 404)


def test_path_confinement(make_client, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    make_adapter(outside / "evil", seed=2)
    root.mkdir(exist_ok=True)
    os.symlink(outside / "evil", root / "link")
    (root / "half").mkdir()
    make_adapter(outside / "w", seed=3)
    os.symlink(outside / "w" / "drlora_adapter.safetensors", root / "half" / "drlora_adapter.safetensors")
    (root / "half" / "drlora_adapter.json").write_text((outside / "w" / "drlora_adapter.json").read_text())
    c, engine = make_client()
    for path in (str(outside / "evil"), str(root / ".." / "outside" / "evil"), str(root / "link"),
                 str(root / "half"), "/etc", "rel/../../../etc"):
        err(c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path}), 400)
    assert engine.adapters == {}
    c2, _ = make_client(lora_roots=[])
    err(c2.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(root)}), 400)
    c3, _ = make_client(allow_runtime_lora_updating=False)
    err(c3.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(root)}), 403)
    err(c3.post("/v1/unload_lora_adapter", json={"lora_name": "x"}), 403)


def test_api_key(make_client):
    c, _ = make_client(api_key="sekrit")
    err(c.get("/v1/models"), 401, "AuthenticationError")
    err(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    assert c.get("/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200
    assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_metrics_exposition(make_client):
    c, _ = make_client()
    c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
    families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:time_to_first_token_seconds",
                 "vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_success", "vllm:num_preemptions",
                 "vllm:lora_requests_info"):
        assert name in families, name
    gen = families["vllm:generation_tokens"].samples[0]
    assert gen.name == "vllm:generation_tokens_total" and gen.value >= 3 and gen.labels == {"model_name": "tiny"}
    info = families["vllm:lora_requests_info"].samples[0]
    assert set(info.labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    assert info.labels["max_lora"] == "4" and info.value > 1e9


# Issue 10.5: every option that would change the output and is not implemented is a 400 naming
# it; its no-op values are accepted. The values are the test's own (not read from the table).
CHANGING = {
    "use_beam_search": True, "length_penalty": 0.5, "best_of": 2, "guided_whitespace_pattern": "[ ]?",
    "functions": [{"name": "f"}], "function_call": {"name": "f"},
    "add_special_tokens": {"completions": False, "chat": True}, "suffix": "end",
    "prompt_embeds": "AAAA", "echo": True, "documents": [{"title": "a", "text": "b"}],
    "reasoning_effort": "high", "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"}, "web_search_options": {},
    "return_tokens_as_token_ids": True, "return_token_ids": True, "top_logprobs": 2,
}
NOOPS = {
    "use_beam_search": [False], "length_penalty": [1.0], "best_of": [1], "guided_whitespace_pattern": [None],
    "functions": [[]], "function_call": ["none", "auto"],
    "add_special_tokens": {"completions": [True], "chat": [False]},
    "suffix": ["", None], "prompt_embeds": [None], "echo": [False], "documents": [[]],
    "reasoning_effort": [None], "modalities": [["text"]], "audio": [None], "web_search_options": [None],
    "return_tokens_as_token_ids": [False], "return_token_ids": [False],
    "top_logprobs": [0, None],
}


def _body(endpoint: str, extra: dict) -> tuple[str, dict]:
    if endpoint == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    return "/v1/completions", {"prompt": "hi", "max_tokens": 2, **extra}


def _pick(table: dict, field: str, endpoint: str):
    v = table[field]
    return v[endpoint] if isinstance(v, dict) and set(v) == {"completions", "chat"} else v


def test_output_changing_options_are_refused_by_name(make_client):
    from server.protocol import UNSUPPORTED

    assert {u.field for u in UNSUPPORTED} == set(CHANGING) == set(NOOPS)
    c, _ = make_client()
    for u in UNSUPPORTED:
        for endpoint in u.endpoints:
            path, body = _body(endpoint, {u.field: _pick(CHANGING, u.field, endpoint)})
            e = err(c.post(path, json=body), 400, "BadRequestError")
            assert e["param"] == u.field and u.field in e["message"], (endpoint, e)
            for value in _pick(NOOPS, u.field, endpoint):
                path, body = _body(endpoint, {u.field: value})
                r = c.post(path, json=body)
                assert r.status_code == 200, (endpoint, u.field, value, r.text)
    # options that only make sense together: accepted together
    for endpoint, extra in (("completions", {"best_of": 3, "n": 3}), ("chat", {"top_logprobs": 2, "logprobs": True})):
        path, body = _body(endpoint, extra)
        assert c.post(path, json=body).status_code == 200
    # the tool calls of an earlier turn go to the chat template (as vLLM passes them)
    r = c.post("/v1/chat/completions", json={"messages": [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                               "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"}, {"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text


def test_error_rendering_never_fails_on_unencodable_text(make_client):
    from server.errors import APIError, error_response

    body = json.loads(error_response(APIError(404, "The model `\ud800x` does not exist.", "\udcff")).body)
    assert body["error"]["message"] == "The model `\\ud800x` does not exist." and body["error"]["param"] == "\\udcff"
    c, _ = make_client()
    raw = '{"model": "\\ud800", "prompt": "x"}'.encode()
    e = err(c.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400)
    assert e["param"] == "model"


def test_non_text_content_and_non_object_bodies_say_so(make_client):
    c, _ = make_client()
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "image_url", "image_url": {"url": "x"}}]}]}
    e = err(c.post("/v1/chat/completions", json=body), 400)
    assert e["param"] == "messages" and "image_url" in e["message"] and "text only" in e["message"]
    e = err(c.post("/v1/completions", content="prompt=x", headers={"content-type": "text/plain"}), 400)
    assert "JSON object" in e["message"]
    e = err(c.post("/v1/completions", json=["x"]), 400)
    assert "JSON object" in e["message"]


def test_request_body_limit(make_client):
    """--max-request-mb: a larger body is a 413 before it is parsed, whether its size is in
    Content-Length or only known while reading a chunked body; smaller bodies are served."""
    c, _ = make_client(max_request_bytes=1000)
    big = json.dumps({"prompt": "x" * 2000, "max_tokens": 1})
    e = err(c.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)
    assert "--max-request-mb" in e["message"] and e["type"] == "RequestTooLargeError"

    def chunks():
        for i in range(0, len(big), 100):
            yield big[i:i + 100].encode()
    e = err(c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_tokenize_detokenize_ping_and_cors(make_client, tokenizer):
    """vLLM's /tokenize (a prompt, or messages through the chat template), /detokenize, /ping,
    and its CORS defaults (a browser's preflight is answered, before any API key)."""
    c, _ = make_client(api_key="k")
    r = c.post("/tokenize", json={"model": "tiny", "prompt": "hello world", "return_token_strs": True})
    body = r.json()
    assert r.status_code == 200 and body["tokens"] == tokenizer.encode("hello world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 128 and body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    msgs = [{"role": "user", "content": "hi"}]
    r = c.post("/tokenize", json={"messages": msgs})
    want = tokenizer.encode(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)
    assert r.status_code == 200 and r.json()["tokens"] == want and r.json()["token_strs"] is None
    r = c.post("/detokenize", json={"model": "tiny", "tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": tokenizer.decode(body["tokens"])}
    err(c.post("/tokenize", json={"prompt": "x", "messages": msgs}), 400)
    err(c.post("/tokenize", json={}), 400)
    err(c.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404)
    assert err(c.post("/detokenize", json={"tokens": [10**9]}), 400)["param"] == "tokens"
    assert c.get("/ping").status_code == 200 and c.post("/ping").status_code == 200
    pre = c.options("/v1/completions", headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST",
                                                "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*"
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"Origin": "http://example.com"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"


def test_prompt_tokens_details_flag(make_client):
    """--enable-prompt-tokens-details: usage.prompt_tokens_details.cached_tokens, the prefix-cache
    hits (0 too), summed over a completions request's prompts, in non-streamed responses and the
    final streamed usage chunk (not in continuous_usage_stats chunks, as vLLM); without the flag
    usage is unchanged."""
    ids, other = list(range(10, 20)), list(range(10, 14)) + list(range(30, 36))  # 10 tokens, 1 block shared
    opts = {"include_usage": True, "continuous_usage_stats": True}
    off, _ = make_client()
    for _ in range(2):
        u = off.post("/v1/completions", json={"prompt": ids, "max_tokens": 2}).json()["usage"]
        assert list(u) == ["prompt_tokens", "completion_tokens", "total_tokens"]
    *steps, final = sse(off.post("/v1/completions", json={"prompt": ids, "max_tokens": 2, "stream": True,
                                                          "stream_options": opts}))
    assert all("prompt_tokens_details" not in ch["usage"] for ch in steps + [final])
    c, _ = make_client(enable_prompt_tokens_details=True)

    def usage(body):
        return c.post("/v1/completions", json={"max_tokens": 2, **body}).json()["usage"]

    assert usage({"prompt": ids})["prompt_tokens_details"] == {"cached_tokens": 0}  # the first
    assert usage({"prompt": ids})["prompt_tokens_details"] == {"cached_tokens": 8}  # (10 - 1) // 4 blocks
    assert usage({"prompt": [ids, other], "n": 2})["prompt_tokens_details"] == {"cached_tokens": 8 + 4}
    *steps, final = sse(c.post("/v1/completions", json={"prompt": [ids, other], "max_tokens": 2, "stream": True,
                                                        "stream_options": opts}))
    assert all("prompt_tokens_details" not in ch["usage"] for ch in steps)
    assert final["usage"]["prompt_tokens_details"] == {"cached_tokens": 8 + 8}
    msgs = [{"role": "user", "content": "a longer message of many tokens"}]
    chat = [c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2}).json()["usage"]
            for _ in range(2)]
    n = chat[0]["prompt_tokens"]
    assert chat[0]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert chat[1]["prompt_tokens_details"] == {"cached_tokens": (n - 1) // 4 * 4} and n > 4
    *steps, final = sse(c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2, "stream": True,
                                                             "stream_options": opts}))
    assert all("prompt_tokens_details" not in ch["usage"] for ch in steps)
    assert final["usage"]["prompt_tokens_details"] == {"cached_tokens": (n - 1) // 4 * 4}
    u = off.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2}).json()["usage"]
    assert list(u) == ["prompt_tokens", "completion_tokens", "total_tokens"]
    from server.cli import configure

    assert configure(["--enable-prompt-tokens-details"])[1].enable_prompt_tokens_details
    assert not configure([])[1].enable_prompt_tokens_details


def test_continuous_usage_counts_each_choice(make_client):
    """stream_options.continuous_usage_stats: each chunk's usage is its own choice's tokens so
    far and its own prompt's tokens (as vLLM), the role chunks count 0; the final usage chunk
    sums every choice."""
    c, _ = make_client()
    opts = {"include_usage": True, "continuous_usage_stats": True}
    r = c.post("/v1/completions", json={"prompt": ["a b c", "d"], "n": 2, "max_tokens": 3, "stream": True,
                                        "logprobs": 0, "stream_options": opts})
    *steps, final = sse(r)
    seen: dict[int, int] = {}
    for ch in steps:
        (choice,) = ch["choices"]
        seen[choice["index"]] = seen.get(choice["index"], 0) + len(choice["logprobs"]["tokens"])
        u = ch["usage"]
        assert u["completion_tokens"] == seen[choice["index"]], ch
        assert u["prompt_tokens"] == (3 if choice["index"] < 2 else 1)
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert final["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}
    msgs = [{"role": "user", "content": "hi"}]
    r = c.post("/v1/chat/completions", json={"messages": msgs, "n": 2, "max_tokens": 3, "stream": True,
                                             "logprobs": True, "stream_options": opts})
    *steps, final = sse(r)
    prompt = steps[0]["usage"]["prompt_tokens"]
    assert [ch["usage"]["completion_tokens"] for ch in steps[:2]] == [0, 0]  # the role chunks
    seen = {}
    for ch in steps[2:]:
        (choice,) = ch["choices"]
        seen[choice["index"]] = seen.get(choice["index"], 0) + len(choice["logprobs"]["content"])
        assert ch["usage"] == {"prompt_tokens": prompt, "completion_tokens": seen[choice["index"]],
                               "total_tokens": prompt + seen[choice["index"]]}
    assert final["usage"]["completion_tokens"] == 6


def test_echo_top_logprobs_keep_to_logprobs_with_prompt_logprobs(make_client):
    """echo + logprobs=k: every top_logprobs entry lists at most the k most likely and the
    token itself, however many prompt_logprobs the same request asks for."""
    c, _ = make_client()
    body = {"prompt": "hello world", "max_tokens": 2, "echo": True, "logprobs": 0, "prompt_logprobs": 1}
    r = c.post("/v1/completions", json=body)
    ch = r.json()["choices"][0]
    tops = ch["logprobs"]["top_logprobs"]
    assert tops[0] is None and all(len(t) == 1 for t in tops[1:]), tops
    assert all(1 <= len(e) <= 2 for e in ch["prompt_logprobs"][1:])  # prompt_logprobs keeps its own k
    streamed = [t for chunk in sse(c.post("/v1/completions", json={**body, "prompt_logprobs": None, "stream": True}))
                for t in chunk["choices"][0]["logprobs"]["top_logprobs"]]
    assert streamed[0] is None and all(len(t) == 1 for t in streamed[1:]), streamed


CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,body,param,message", [
    # no member of the union has the value's shape: what the field accepts
    ("completions", {"prompt": 5}, "prompt",
     "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"),
    ("completions", {"prompt": [True]}, "prompt",
     "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"),
    ("completions", {"prompt": "x", "stop": 5}, "stop", "stop must be a string or a list of strings"),
    ("completions", {"prompt": "x", "guided_json": 5}, "guided_json",
     "guided_json must be a JSON schema: an object, or its JSON text"),
    ("completions", {"prompt": "x", "structured_outputs": {"json": 5}}, "structured_outputs",
     "structured_outputs.json must be a JSON schema: an object, or its JSON text"),
    ("completions", {"prompt": "x", "response_format": 5}, "response_format", "response_format must be an object"),
    ("completions", {"prompt": "x", "logit_bias": [1]}, "logit_bias",
     "logit_bias must be an object mapping token ids to biases"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages",
     "messages.0.content must be a string or a list of content parts"),
    ("chat", {"messages": CHAT, "tool_choice": 5}, "tool_choice",
     'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'),
    # the value's shape picks the member: that member's error, at its place
    ("completions", {"prompt": [-1]}, "prompt", "prompt.0: Input should be greater than or equal to 0"),
    ("completions", {"prompt": [[1], []]}, "prompt", "prompt.1: List should have at least 1 item after validation, not 0"),
    ("completions", {"prompt": ["a", 1]}, "prompt", "prompt.1: Input should be a valid string"),
    ("completions", {"prompt": "x", "stop": ["a", None]}, "stop", "stop.1: Input should be a valid string"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages",
     "messages.0.content.0.text: Field required"),
    ("chat", {"messages": CHAT, "tool_choice": "sometimes"}, "tool_choice",
     "tool_choice: Input should be 'none', 'auto' or 'required'"),
    ("chat", {"messages": CHAT, "tool_choice": {"type": "function"}}, "tool_choice", "tool_choice.function: Field required"),
    # a model-level check's own words, without pydantic's "Value error, "
    ("completions", {"prompt": "x", "response_format": {"type": "json_schema"}}, "response_format",
     'response_format: response_format of type "json_schema" needs json_schema.schema'),
])
def test_union_fields_say_what_they_accept(make_client, path, body, param, message):
    """Union-typed fields: no pydantic internals (member tags, class names) in the message."""
    c, _ = make_client()
    e = err(c.post(f"/v1/{path.replace('chat', 'chat/completions')}", json=body), 400, "BadRequestError")
    assert (e["param"], e["message"]) == (param, message)


def test_lone_surrogates_still_say_so_in_union_fields(make_client):
    c, _ = make_client()
    for body, param, where in (('{"prompt": "\\ud800"}', "prompt", "prompt: "),
                               ('{"prompt": ["a", "\\ud800"]}', "prompt", "prompt.1: "),
                               ('{"prompt": "x", "stop": "\\ud800"}', "stop", "stop: "),
                               ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages", "messages.0.content: ")):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        e = err(c.post(path, content=body.encode(), headers={"content-type": "application/json"}), 400)
        assert e["param"] == param and e["message"].startswith(where + "must be valid Unicode text"), e


def test_constraint_failure_while_generating_names_its_field(make_client):
    """A constraint that cannot go on while generating (the engine's GrammarEngine.failure: a
    grammar past llguidance's limits, allowed_token_ids or bad_words excluding every token it
    allows) is a 400 whose param is the field that set the constraint, streamed or not; the
    engine does not know that field, the server does."""
    from drlora_serve.types import InvalidRequestError

    c, engine = make_client()
    engine.fail_all(InvalidRequestError("the regex constraint could not be followed: the token was refused"))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for path, body, param in (
            ("/v1/completions", {"prompt": "x", "guided_regex": "a+"}, "guided_regex"),
            ("/v1/completions", {"prompt": ["x", "y"], "structured_outputs": {"regex": "a+"}}, "structured_outputs"),
            ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format"),
            ("/v1/chat/completions", {"messages": CHAT, "tools": tools, "tool_choice": "required"}, "tools"),
            ("/v1/completions", {"prompt": "x"}, None)):  # no constraint: nothing to name
        e = err(c.post(path, json={**body, "max_tokens": 4}), 400)
        assert e["param"] == param and "could not be followed" in e["message"], (body, e)
        events = sse(c.post(path, json={**body, "max_tokens": 4, "stream": True}))
        assert events[-1]["error"]["param"] == param and events[-1]["error"]["code"] == 400, (body, events)


def test_chat_template_options(make_client, tokenizer):
    """vLLM's chat_template_kwargs and continue_final_message (chat and /tokenize), and a
    request's own chat_template only under --trust-request-chat-template."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]

    def want(**kw):
        return tokenizer.encode(tokenizer.apply_chat_template(msgs, tokenize=False, **kw), add_special_tokens=False)

    c, _ = make_client()
    r = c.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False, "continue_final_message": True})
    assert r.status_code == 200 and r.json()["tokens"] == want(continue_final_message=True)
    assert r.json()["tokens"] != want(add_generation_prompt=False)  # (the turn is left open)
    r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2, "add_generation_prompt": False,
                                             "continue_final_message": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want(continue_final_message=True))
    e = err(c.post("/v1/chat/completions", json={"messages": msgs, "continue_final_message": True}), 400)
    assert e["param"] == "continue_final_message" and "add_generation_prompt" in e["message"]
    # template variables reach the template; the template's own arguments may not be set
    r = c.post("/tokenize", json={"messages": msgs, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200 and r.json()["tokens"] == want(add_generation_prompt=True, enable_thinking=False)
    for key in ("tokenize", "chat_template", "messages"):
        e = err(c.post("/v1/chat/completions", json={"messages": msgs, "chat_template_kwargs": {key: 1}}), 400)
        assert e["param"] == "chat_template_kwargs" and key in e["message"]
    # a request's template: refused by default, rendered when the server trusts them
    tmpl = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ extra }}{% endfor %}"
    e = err(c.post("/v1/chat/completions", json={"messages": msgs, "chat_template": tmpl}), 400)
    assert e["param"] == "chat_template" and "--trust-request-chat-template" in e["message"]
    c2, _ = make_client(trust_request_chat_template=True)
    r = c2.post("/tokenize", json={"messages": msgs, "chat_template": tmpl, "chat_template_kwargs": {"extra": "!"}})
    assert r.status_code == 200 and r.json()["tokens"] == tokenizer.encode("<user>hi!<assistant>Hel!", add_special_tokens=False)
    e = err(c2.post("/v1/chat/completions", json={"messages": msgs, "chat_template": "{{ raise_exception('no') }}"}), 400)
    assert e["param"] == "messages" and "no" in e["message"]
    # the server's --chat-template replaces the tokenizer's (a request's still wins when trusted)
    c3, _ = make_client(chat_template=tmpl, trust_request_chat_template=True)
    r = c3.post("/tokenize", json={"messages": msgs, "chat_template_kwargs": {"extra": "?"}})
    assert r.json()["tokens"] == tokenizer.encode("<user>hi?<assistant>Hel?", add_special_tokens=False)
    r = c3.post("/tokenize", json={"messages": msgs, "chat_template": "{{ messages[0].content }}"})
    assert r.json()["tokens"] == tokenizer.encode("hi", add_special_tokens=False)


def test_chat_template_flag(tmp_path):
    """--chat-template takes a file or the template itself; anything else is a one-line error."""
    from server.cli import configure

    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0].content }}")
    assert configure(["--chat-template", str(f)])[1].chat_template == "{{ messages[0].content }}"
    assert configure(["--chat-template", "{% for m in messages %}{{ m.content }}{% endfor %}"])[1].chat_template
    assert configure([])[1].chat_template is None
    r = subprocess.run([sys.executable, "-m", "server.cli", "--chat-template", str(tmp_path / "missing.jinja")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "neither a file nor a template" in r.stderr
