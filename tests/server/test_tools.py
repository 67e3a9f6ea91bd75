"""Tool calls (server/tools.py) without a server: the constraint a request becomes, what each
streamed text delta becomes, the finish reason."""

from __future__ import annotations

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
