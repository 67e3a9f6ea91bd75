"""Tool calls (server/tools.py) without a server: the constraint a request becomes, what each
streamed text delta becomes, the finish reason."""

from __future__ import annotations

import json

import pytest

from server.protocol import ChatCompletionRequest
from server.tools import ToolCallStream, tool_calls

TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("f", "g")]


def request(tool_choice) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS, tool_choice=tool_choice)


def test_one_entry_per_call_in_each_delta():
    """A delta holding a call's name and arguments at once (held-back text released together,
    a stop string's hold-back) is one entry for that call, not two with the same index (as
    vLLM and OpenAI send: clients may key the entries of a delta by index)."""
    req = request("required")
    text = '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}]'
    s = ToolCallStream(req)
    entries = s.feed(text)
    assert [e["index"] for e in entries] == [0, 1]
    assert entries[0]["id"].startswith("call_") and entries[0]["type"] == "function"
    assert entries[0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert entries[1]["function"] == {"name": "g", "arguments": "{}"}
    # piecewise: the header once, then argument pieces, joining to the non-streamed arguments
    for cut in range(1, len(text)):
        s = ToolCallStream(req)
        got: dict[int, dict] = {}
        for piece in (text[:cut], text[cut:]):
            delta = s.feed(piece)
            assert len({e["index"] for e in delta}) == len(delta)
            for e in delta:
                cur = got.setdefault(e["index"], {"name": None, "arguments": "", "headers": 0})
                if "id" in e:
                    cur["headers"] += 1
                    cur["name"] = e["function"]["name"]
                cur["arguments"] += e["function"].get("arguments", "")
        want = tool_calls(req, text)
        assert [(c["name"], c["arguments"], c["headers"]) for c in got.values()] == \
            [(c["function"]["name"], c["function"]["arguments"], 1) for c in want], cut
    named = ToolCallStream(request({"type": "function", "function": {"name": "g"}}))
    (entry,) = named.feed(' {"b": 2}')
    assert entry["index"] == 0 and entry["id"].startswith("call_")
    assert entry["function"] == {"name": "g", "arguments": '{"b": 2}'}
    assert named.feed("") == []


def test_parameters_that_are_not_an_object_schema_are_refused():
    """A call's arguments are a JSON object (OpenAI's contract): a constrained tool whose
    `parameters` declares another type is a 400 naming it (as OpenAI), not arguments such as
    '"text"' or '5' that clients cannot read as keyword arguments."""
    from server.errors import APIError
    from server.tools import tool_constraint

    for params in ({"type": "string"}, {"type": ["array", "null"]}):
        tools = [TOOLS[0], {"type": "function", "function": {"name": "h", "parameters": params}}]
        for choice in ("required", {"type": "function", "function": {"name": "h"}}):
            req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=tools, tool_choice=choice)
            with pytest.raises(APIError) as e:
                tool_constraint(req)
            assert e.value.status == 400 and e.value.param == "tools" and "'h'" in e.value.message
    for params in ({"type": "object"}, {"properties": {}}, None, {"type": ["object"]}):
        tools = [{"type": "function", "function": {"name": "h", "parameters": params}}]
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=tools, tool_choice="required")
        assert tool_constraint(req) is not None


def test_finish_reason_of_calls():
    """OpenAI's (and vLLM's) finish_reason for a finished output that is a complete call list:
    "tool_calls" with tool_choice "required", "stop" with a named function (a forced call);
    an output cut before its calls are complete keeps the engine's reason."""
    from server.tools import finish_reason

    required, named = request("required"), request({"type": "function", "function": {"name": "f"}})
    assert finish_reason(required, '[{"name": "f", "parameters": {}}]', "stop") == "tool_calls"
    assert finish_reason(named, '{"a": 1}', "stop") == "stop"
    assert finish_reason(required, '[{"name": "f", "parameters": {', "length") == "length"
    assert finish_reason(named, '{"a": ', "length") == "length"


# parameters as pydantic writes them: shared definitions under $defs, a recursive one, refs into them
NESTED = {"type": "object", "$defs": {
    "Unit": {"enum": ["C", "F"], "type": "string"},
    "Place": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "near": {"anyOf": [{"$ref": "#/$defs/Place"}, {"type": "null"}]}},
              "required": ["city"], "additionalProperties": False}},
    "properties": {"place": {"$ref": "#/$defs/Place"}, "unit": {"$ref": "#/$defs/Unit"}},
    "required": ["place", "unit"], "additionalProperties": False}
OTHER = {"type": "object", "definitions": {"Unit": {"type": "integer"}},  # the same name, another schema
         "properties": {"n": {"$ref": "#/definitions/Unit"}, "same": {"$ref": "#"},
                        "default": {"$ref": "#/definitions/Unit", "default": {"$ref": "#/data"}}},
         "additionalProperties": False}


def test_required_keeps_each_tools_refs():
    """tool_choice "required" nests every tool's parameters in one array schema: their local
    $refs ("#/$defs/...", "#/definitions/...", "#") still mean the tool's own schema (pydantic
    models write $defs), even when two tools define the same name differently."""
    import jsonschema

    from drlora_serve.structured import GrammarValidator
    from server.tools import tool_constraint

    tools = [{"type": "function", "function": {"name": "f", "parameters": NESTED}},
             {"type": "function", "function": {"name": "g", "parameters": OTHER}}]
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=tools, tool_choice="required")
    so, _ = tool_constraint(req)
    GrammarValidator().check(so)  # compiles (a ref resolved from the wrapper's root did not)
    good = [{"name": "f", "parameters": {"place": {"city": "Paris", "near": {"city": "Lyon", "near": None}},
                                         "unit": "C"}},
            {"name": "g", "parameters": {"n": 3, "same": {"n": 4}, "default": 5}}]
    jsonschema.validate(good, so.json)
    for bad in ([{"name": "f", "parameters": {"place": {"city": "Paris"}, "unit": "K"}}],
                [{"name": "f", "parameters": {"place": {"near": None}, "unit": "C"}}],
                [{"name": "g", "parameters": {"n": "C"}}], [{"name": "g", "parameters": {"default": "x"}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, so.json)
    assert "$defs" in NESTED and NESTED["properties"]["place"] == {"$ref": "#/$defs/Place"}  # not mutated
    assert so.json["$defs"]["drlora_tool_1"]["properties"]["default"]["default"] == {"$ref": "#/data"}  # data


def _stream_chunks(req: ChatCompletionRequest, pieces: list[str], finish: str = "stop") -> list[dict]:
    """chat._stream's chunks for a tool-constrained request whose one choice's deltas are
    `pieces` (one token each; the last finishes with `finish`)."""
    import asyncio

    from drlora_serve.types import CompletionOutput, RequestOutput, TokenLogprob
    from server.chat import _stream

    from server.state import ServerConfig

    class State:  # what _stream reads of the server state (logprobs, the usage options)
        config = ServerConfig()

        def token_text(self, tid: int) -> str:
            return f"t{tid}"

    async def outputs():
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            lp = [TokenLogprob(i, -1.0, {i: -1.0})] if req.logprobs else None
            yield 0, RequestOutput("r", [1, 2], [CompletionOutput(0, piece, [i], finish if last else None, lp)], last)

    async def collect() -> list[str]:
        return [s async for s in _stream(State(), req, "r", "tiny", [1, 2], outputs(), tools=True)]

    sent = asyncio.run(collect())
    assert sent[-1] == "data: [DONE]\n\n"
    return [json.loads(s[len("data: "):]) for s in sent[:-1]]


@pytest.mark.parametrize("tool_choice,pieces", [
    ("required", ['[{"', 'name": "', 'f', '", "parameters": ', '{"a"', ': 1', '}', '}', ']']),
    # (a token with no text yet: a partial UTF-8 character, a stop string's hold-back)
    ({"type": "function", "function": {"name": "g"}}, ["", " ", "", '{"b"', ": ", "", "2", "}"]),
])
def test_streamed_calls_skip_empty_deltas(tool_choice, pieces):
    """Tokens that add no call text (the JSON around the calls, a name not yet complete) send
    no chunk, as vLLM: only the role, the call deltas, the finish chunk and the usage. Continuous
    usage still counts the skipped tokens (the next chunk's usage includes them), and with
    logprobs the chunks stay (each carries its tokens' logprobs)."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS, tool_choice=tool_choice,
                                stream=True, stream_options=opts)
    role, *steps, usage = _stream_chunks(req, pieces)
    assert role["choices"][0]["delta"]["role"] == "assistant" and usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == len(pieces)
    *calls, last = steps
    assert calls and all(ch["choices"][0]["delta"].get("tool_calls") for ch in calls), steps
    assert last["choices"][0]["finish_reason"] == ("tool_calls" if tool_choice == "required" else "stop")
    assert last["usage"]["completion_tokens"] == len(pieces)
    assert len(steps) < len(pieces)  # some tokens added no call text
    # the usage of a chunk counts the tokens of the skipped ones before it
    counts = [ch["usage"]["completion_tokens"] for ch in steps]
    assert counts == sorted(counts) and any(b - a > 1 for a, b in zip([0, *counts], counts)), counts
    args = "".join(e["function"].get("arguments", "") for ch in steps
                   for e in ch["choices"][0]["delta"].get("tool_calls", []))
    assert json.loads(args) == ({"a": 1} if tool_choice == "required" else {"b": 2})
    with_lp = _stream_chunks(req.model_copy(update={"logprobs": True}), pieces)
    assert len(with_lp) == len(pieces) + 2  # the role, one chunk a token, the usage


def test_streamed_calls_cut_short_keep_their_finish_chunk():
    """An output cut before any call text (max_tokens) still ends with its finish chunk."""
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS, tool_choice="required",
                                stream=True)
    role, *steps = _stream_chunks(req, ['[', '{"'], finish="length")
    assert [(ch["choices"][0]["delta"], ch["choices"][0]["finish_reason"]) for ch in steps] == [({}, "length")]


def test_constraining_tool_choice_without_tools_says_what_is_missing():
    """tool_choice "required" or a named function with `tools: []` is a 400 naming tools (as
    vLLM, which refuses an empty tools array outright); with no tools at all, a 400 naming
    tool_choice. Each message says what to give."""
    from server.errors import APIError
    from server.tools import tool_constraint

    for choice, what in (("required", 'tool_choice "required"'),
                         ({"type": "function", "function": {"name": "f"}}, "tool_choice naming the function 'f'")):
        for tools, param in (([], "tools"), (None, "tool_choice")):
            req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=tools, tool_choice=choice)
            with pytest.raises(APIError) as e:
                tool_constraint(req)
            assert (e.value.status, e.value.param) == (400, param)
            assert e.value.message.startswith(what) and "at least one tool" in e.value.message, e.value.message
            assert ("empty" in e.value.message) == (tools == [])
    # tools: [] beside no constraining choice changes nothing: plain text, as with no tools
    for choice in (None, "none", "auto"):
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=[], tool_choice=choice)
        assert tool_constraint(req) is None
