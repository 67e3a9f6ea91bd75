"""The options of structured outputs (disable_any_whitespace, disable_additional_properties)
apply to the constraint whichever field gives it, over --structured-outputs-config."""

from __future__ import annotations

from server.generation import structured_of
from server.protocol import ChatCompletionRequest, CompletionRequest

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def options(so) -> tuple[bool, bool]:
    return so.disable_any_whitespace, so.disable_additional_properties


def test_options_beside_another_constraint_apply_to_it():
    for extra in ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
                  {"response_format": {"type": "json_object"}}, {"guided_json": SCHEMA}, {"guided_regex": "a+"}):
        req = CompletionRequest(prompt="x", structured_outputs={"disable_any_whitespace": True}, **extra)
        so, field = structured_of(req)
        assert field == next(iter(extra)) and options(so) == (True, False), extra
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], guided_json=SCHEMA,
                                structured_outputs={"disable_additional_properties": True})
    assert options(structured_of(req)[0]) == (False, True)


def test_request_options_override_the_server_defaults():
    defaults = {"disable_any_whitespace": True}
    req = CompletionRequest(prompt="x", guided_json=SCHEMA)
    assert options(structured_of(req, defaults)[0]) == (True, False)
    req = CompletionRequest(prompt="x", structured_outputs={"json": SCHEMA, "disable_any_whitespace": False})
    assert options(structured_of(req, defaults)[0]) == (False, False)  # an explicit false wins
    req = CompletionRequest(prompt="x", structured_outputs={"json": SCHEMA})
    assert options(structured_of(req, defaults)[0]) == (True, False)
    req = CompletionRequest(prompt="x", structured_outputs={"disable_any_whitespace": True})
    assert structured_of(req, defaults) == (None, None)  # options alone constrain nothing
