"""Chat tool calls by structured outputs: `tool_choice` "required" or a named function
constrains the output to the tools' JSON schemas, and the output becomes OpenAI `tool_calls`.

- a named function (`{"type": "function", "function": {"name": "f"}}`): the output is the
  function's arguments, an object following its `parameters` schema; one call of `f`.
- "required": the output is a JSON array of at least one call (exactly one with
  `parallel_tool_calls: false`), each `{"name": <one of the tools>, "parameters": <that tool's
  arguments>}` (vLLM's format).
- "none": the tools go to the chat template, the output is plain text.
- "auto" (OpenAI's default when tools are given) is refused: it needs a parser of the model's
  own tool-call syntax, which this server does not have.

The arguments of a call are the raw JSON text of the model's output (as generated, whitespace
included), so that the arguments streamed in pieces join to exactly the non-streamed ones.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from drlora_serve.types import StructuredOutputsParams
from server.errors import bad_request

ANY_OBJECT = {"type": "object"}


def tool_constraint(req) -> tuple[StructuredOutputsParams, str] | None:
    """(structured outputs, "tools") for the request's tool_choice, or None (plain text)."""
    choice, tools = req.tool_choice, req.tools or []
    if choice is None:
        if tools:
            raise bad_request('tool_choice "auto" (the default with tools) needs a tool-call parser, which this '
                              'server does not have; use "required", a named function, or "none"', "tool_choice")
        return None
    if choice == "none":
        return None
    if choice == "auto":
        if tools:
            raise bad_request('tool_choice "auto" needs a tool-call parser, which this server does not have; '
                              'use "required", a named function, or "none"', "tool_choice")
        return None
    if not tools:
        # vLLM refuses `tools: []` whatever tool_choice says (as OpenAI); here only beside a
        # choice that constrains the output: elsewhere an empty list changes nothing
        what = 'tool_choice "required"' if choice == "required" else \
            f"tool_choice naming the function {choice.function.name!r}"
        if req.tools is not None:
            raise bad_request(f"{what} needs at least one tool, and tools is an empty array: give at least "
                              "one tool, or omit tool_choice", "tools")
        raise bad_request(f"{what} needs tools: give at least one tool", "tool_choice")
    for other in ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                  "guided_grammar"):
        v = getattr(req, other)
        if v is not None and not (other == "response_format" and v.type == "text"):
            raise bad_request(f"tool_choice and {other} both constrain the output; give one of them", other)
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tool names must be unique", "tools")
    for t in tools:  # the arguments of a call are an object (OpenAI refuses other schemas too)
        kind = (t.function.parameters or {}).get("type", "object")
        if kind != "object" and kind != ["object"]:
            raise bad_request(f"the parameters of function {t.function.name!r} must be a JSON schema of "
                              f'"type": "object", not {json.dumps(kind)}', "tools")
    if choice == "required":
        defs: dict[str, dict] = {}  # tools whose parameters hold local $refs, moved under the root
        calls = []
        for i, t in enumerate(tools):
            params = t.function.parameters or ANY_OBJECT
            if _has_local_ref(params):
                defs[f"drlora_tool_{i}"] = _rebased(params, f"#/$defs/drlora_tool_{i}")
                params = {"$ref": f"#/$defs/drlora_tool_{i}"}
            calls.append({"type": "object", "properties": {"name": {"const": t.function.name}, "parameters": params},
                          "required": ["name", "parameters"], "additionalProperties": False})
        schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
        if defs:
            schema["$defs"] = defs
        if not req.parallel_tool_calls:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema), "tools"
    tool = next((t for t in tools if t.function.name == choice.function.name), None)
    if tool is None:
        raise bad_request(f"tool_choice names the function {choice.function.name!r}, which is not among the tools",
                          "tool_choice")
    return StructuredOutputsParams(json=tool.function.parameters or ANY_OBJECT), "tools"


# keywords whose values are data, not schemas (a "$ref" inside them is no reference), and those
# whose values map names (which may be spelled like keywords: a property "default") to schemas
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def _local_ref(k: str, v) -> bool:
    return k == "$ref" and isinstance(v, str) and (v == "#" or v.startswith("#/"))


def _has_local_ref(schema) -> bool:
    if isinstance(schema, list):
        return any(_has_local_ref(x) for x in schema)
    if not isinstance(schema, dict):
        return False
    for k, v in schema.items():
        if _local_ref(k, v):
            return True
        if k in _SCHEMA_MAPS and isinstance(v, dict):
            if any(_has_local_ref(sub) for sub in v.values()):
                return True
        elif k not in _DATA_KEYWORDS and _has_local_ref(v):
            return True
    return False


def _rebased(schema, base: str):
    """A copy of a schema placed at the JSON pointer `base` of a larger one: its local $refs
    ("#", "#/$defs/X", "#/properties/...") were relative to its own root and now point into
    `base` (nested in "required"'s array, a tool's "#/$defs/..." would resolve at the array's
    root, where nothing is: pydantic's models write such refs)."""
    if isinstance(schema, list):
        return [_rebased(x, base) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if _local_ref(k, v):
            out[k] = base + v[1:]
        elif k in _SCHEMA_MAPS and isinstance(v, dict):
            out[k] = {name: _rebased(sub, base) for name, sub in v.items()}
        elif k in _DATA_KEYWORDS:
            out[k] = v
        else:
            out[k] = _rebased(v, base)
    return out


@dataclass
class Call:
    name: str | None  # None until its name is complete
    args: str  # the arguments' JSON text so far
    done: bool  # the arguments are complete


def scan_required(text: str) -> list[Call]:
    """The calls of a (possibly partial) `[{"name": ..., "parameters": ...}, ...]` text."""
    calls: list[Call] = []
    depth, i, n = 0, 0, len(text)
    key = None
    cur: Call | None = None
    while i < n:
        c = text[i]
        if c == '"':
            end = _string_end(text, i)
            if end is None:
                break
            s = json.loads(text[i:end])
            if depth == 2 and key is None:
                key = s
            elif depth == 2 and key == "name" and cur is not None:
                cur.name, key = s, None
            i = end
            continue
        if c in "[{":
            depth += 1
            if depth == 2 and c == "{":
                cur = Call(None, "", False)
                calls.append(cur)
        elif c in "]}":
            depth -= 1
        elif c == ":" and depth == 2 and key == "parameters" and cur is not None:
            j = i + 1
            while j < n and text[j] in " \t\r\n":
                j += 1
            end = _value_end(text, j)
            cur.args = text[j:end if end is not None else n]
            cur.done = end is not None
            key = None
            i = end if end is not None else n
            continue
        elif c == "," and depth == 2:
            key = None
        i += 1
    return calls


def _string_end(text: str, i: int) -> int | None:
    """Index after the JSON string starting at text[i] == '"', None if it is not complete."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
        elif text[j] == '"':
            return j + 1
        else:
            j += 1
    return None


def _value_end(text: str, i: int) -> int | None:
    """Index after the JSON value starting at text[i], None if it is not complete yet."""
    if i >= len(text):
        return None
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] in "[{":
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == '"':
                end = _string_end(text, j)
                if end is None:
                    return None
                j = end
                continue
            depth += c in "[{"
            depth -= c in "]}"
            j += 1
            if depth == 0:
                return j
        return None
    j = i  # a number, true, false or null: complete once a delimiter follows
    while j < len(text) and text[j] not in ",}] \t\r\n":
        j += 1
    return j if j < len(text) else None


def scan(req, text: str) -> list[Call]:
    """The tool calls in a (possibly partial) output of a tool-constrained request."""
    if req.tool_choice == "required":
        return scan_required(text)
    args = text.lstrip()
    return [Call(req.tool_choice.function.name, args, _value_end(args, 0) is not None)]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls(req, text: str) -> list[dict] | None:
    """OpenAI tool_calls of a finished output; None when it is not a complete call list (the
    output was cut by max_tokens)."""
    calls = scan(req, text)
    if not calls or not all(c.done and c.name is not None for c in calls):
        return None
    try:
        for c in calls:
            json.loads(c.args)
    except (ValueError, RecursionError):
        return None
    return [{"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.args}}
            for c in calls]


def finish_reason(req, text: str, finish: str | None) -> str | None:
    """The choice's finish_reason: for a complete call list, "tool_calls" with "required" and
    "stop" with a named function (a forced call), as OpenAI and vLLM; else the engine's."""
    if finish == "stop" and req.tool_choice == "required" and tool_calls(req, text) is not None:
        return "tool_calls"
    return finish


class ToolCallStream:
    """Streamed tool calls of one choice: the OpenAI delta entries for the text so far."""

    def __init__(self, req):
        self.req = req
        self.text = ""
        self.sent: list[int] = []  # argument characters sent per call (-1: header not sent)

    def feed(self, delta: str) -> list[dict]:
        """At most one entry per call: its header (first time) and its new argument text
        together, as vLLM sends them (clients may key a delta's entries by index)."""
        self.text += delta
        out = []
        for i, c in enumerate(scan(self.req, self.text)):
            if c.name is None:
                break
            entry: dict = {"index": i, "function": {}}
            if i >= len(self.sent):
                self.sent.append(0)
                entry.update(id=new_call_id(), type="function", function={"name": c.name, "arguments": ""})
            if len(c.args) > self.sent[i]:
                entry["function"]["arguments"] = c.args[self.sent[i]:]
                self.sent[i] = len(c.args)
            if entry["function"]:
                out.append(entry)
        return out
