"""Streamed tool calls (server/tools.py) without a server: what each text delta becomes."""

from __future__ import annotations

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
