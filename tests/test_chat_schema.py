"""The chat body's JSON schema (the OpenAPI document's `ChatCompletionRequest`) states the rules the server
enforces: a body the server refuses with 400 is invalid by the schema, and a body it accepts is valid.

In-process: the server's own parsing path (api/body.py `parse_raw`, then `check_limits`, as api/chat.py runs
them) against `jsonschema` on `ChatCompletionRequest.openapi_schema`, the schema the document is built from.
tests/test_openapi_contract.py drives the real server with schemathesis; the last test here checks, in the
in-process tier, that the served document is this schema with the app's configured bounds.

One known difference, in the safe direction: JSON Schema cannot tell `1e300` (a float) from an integer, so the
document's rule "integers in free-form values fit in int64" also refuses a huge float the server accepts. A
body valid by the document is never refused for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from grokgate.api.body import parse_raw
from grokgate.core.errors import GatewayError
from grokgate.schemas.chat import INT64_MAX, INT64_MIN, ChatCompletionRequest
from tests.inproc import app_server

MAX_MESSAGES = 4
MAX_TOKENS_LIMIT = 100
OK, REFUSED = True, False
DROP = object()  # a field left out of the body

SCHEMA = ChatCompletionRequest.openapi_schema(MAX_MESSAGES, MAX_TOKENS_LIMIT, ref_template="#/$defs/{model}")
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
TEXT = [{"type": "text", "text": "hi"}]
IMAGE = [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]


def server_accepts(body: dict[str, Any]) -> tuple[bool, str]:
    """What the chat route answers before it looks the model up: accepted, or refused with 400 (its message)."""
    try:
        request = parse_raw(json.dumps(body).encode(), MAX_MESSAGES)
        request.check_limits(max_messages=MAX_MESSAGES, max_tokens_limit=MAX_TOKENS_LIMIT)
    except GatewayError as exc:
        assert exc.status == 400, exc.body()
        return False, exc.message
    return True, "accepted"


def schema_accepts(body: dict[str, Any]) -> tuple[bool, str]:
    error = jsonschema.exceptions.best_match(VALIDATOR.iter_errors(body))
    return (True, "valid") if error is None else (False, error.message)


def body_with(message: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "hi"}] if message is None else [message]
    return {"model": "grok-3", "messages": messages, **fields}


# Per role: the message, and whether the server takes it.
MESSAGES: list[tuple[str, Any, bool]] = [
    *[(f"{role}: {name}", {"role": role, **fields}, verdict) for role in ("system", "developer", "user")
      for name, fields, verdict in [
          ("text", {"content": "Be brief."}, OK),
          ("empty text", {"content": ""}, OK),
          ("text parts", {"content": TEXT}, OK),
          ("image part", {"content": IMAGE}, OK),
          ("with a name", {"content": "x", "name": "n"}, OK),
          ("an unknown field", {"content": "x", "x": 1}, OK),
          ("no content", {}, REFUSED),
          ("null content", {"content": None}, REFUSED),
          ("no parts", {"content": []}, REFUSED),
          ("an unknown part", {"content": [{"type": "audio", "audio": "x"}]}, REFUSED),
          ("a text part without text", {"content": [{"type": "text"}]}, REFUSED),
          ("tool calls instead of content", {"tool_calls": [CALL]}, REFUSED),
          ("a refusal instead of content", {"refusal": "no"}, REFUSED),
          ("content a number", {"content": 5}, REFUSED),
      ]],
    ("assistant: text", {"role": "assistant", "content": "Hello."}, OK),
    ("assistant: empty text", {"role": "assistant", "content": ""}, OK),
    ("assistant: text parts", {"role": "assistant", "content": TEXT}, OK),
    ("assistant: tool calls, no content", {"role": "assistant", "tool_calls": [CALL]}, OK),
    ("assistant: tool calls, null content", {"role": "assistant", "content": None, "tool_calls": [CALL]}, OK),
    ("assistant: text and tool calls", {"role": "assistant", "content": "x", "tool_calls": [CALL]}, OK),
    ("assistant: a refusal", {"role": "assistant", "refusal": "I can't."}, OK),
    ("assistant: a refusal, no tool calls", {"role": "assistant", "refusal": "no", "tool_calls": []}, OK),
    ("assistant: reasoning and text", {"role": "assistant", "content": "x", "reasoning_content": "r"}, OK),
    ("assistant: nothing", {"role": "assistant"}, REFUSED),
    ("assistant: null content", {"role": "assistant", "content": None}, REFUSED),
    ("assistant: no tool calls", {"role": "assistant", "tool_calls": []}, REFUSED),
    ("assistant: an empty refusal", {"role": "assistant", "refusal": ""}, REFUSED),
    ("assistant: nulls", {"role": "assistant", "content": None, "tool_calls": None, "refusal": None}, REFUSED),
    ("assistant: only reasoning", {"role": "assistant", "reasoning_content": "r"}, REFUSED),
    ("assistant: a tool call without id", {"role": "assistant", "tool_calls": [{"function": CALL["function"]}]},
     REFUSED),
    ("tool: text", {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}, OK),
    ("tool: text parts", {"role": "tool", "tool_call_id": "call_1", "content": TEXT}, OK),
    ("tool: empty text", {"role": "tool", "tool_call_id": "call_1", "content": ""}, OK),
    ("tool: nothing", {"role": "tool"}, REFUSED),  # schemathesis's find (ST202) before the schema said so
    ("tool: no content", {"role": "tool", "tool_call_id": "call_1"}, REFUSED),
    ("tool: null content", {"role": "tool", "tool_call_id": "call_1", "content": None}, REFUSED),
    ("tool: no tool_call_id", {"role": "tool", "content": "x"}, REFUSED),
    ("tool: null tool_call_id", {"role": "tool", "content": "x", "tool_call_id": None}, REFUSED),
    ("tool: empty tool_call_id", {"role": "tool", "content": "x", "tool_call_id": ""}, REFUSED),
    ("an unknown role", {"role": "bot", "content": "x"}, REFUSED),
    ("no role", {"content": "x"}, REFUSED),
    ("not an object", "hi", REFUSED),
]

# Request fields: cross-field rules, the configured bounds, types, integers in free-form values.
FIELDS: list[tuple[str, dict[str, Any], bool]] = [
    ("top_logprobs with logprobs", {"logprobs": True, "top_logprobs": 5}, OK),
    ("top_logprobs 0 with logprobs", {"logprobs": True, "top_logprobs": 0}, OK),
    ("null top_logprobs without logprobs", {"top_logprobs": None}, OK),
    ("logprobs alone", {"logprobs": True}, OK),
    ("top_logprobs without logprobs", {"top_logprobs": 5}, REFUSED),
    ("top_logprobs with logprobs false", {"logprobs": False, "top_logprobs": 0}, REFUSED),
    ("top_logprobs with null logprobs", {"logprobs": None, "top_logprobs": 2}, REFUSED),
    ("deferred", {"deferred": True}, OK),
    ("deferred false with stream", {"deferred": False, "stream": True}, OK),
    ("deferred with stream false", {"deferred": True, "stream": False}, OK),
    ("deferred with stream", {"deferred": True, "stream": True}, REFUSED),
    ("deferred not a boolean", {"deferred": "yes"}, REFUSED),
    ("max_tokens at the limit", {"max_tokens": MAX_TOKENS_LIMIT}, OK),
    ("max_tokens over the limit", {"max_tokens": MAX_TOKENS_LIMIT + 1}, REFUSED),
    ("max_completion_tokens at the limit", {"max_completion_tokens": MAX_TOKENS_LIMIT}, OK),
    ("max_completion_tokens over the limit", {"max_completion_tokens": MAX_TOKENS_LIMIT + 1}, REFUSED),
    ("max_tokens 0", {"max_tokens": 0}, REFUSED),
    ("messages at the limit", {"messages": [{"role": "user", "content": "x"}] * MAX_MESSAGES}, OK),
    ("messages over the limit", {"messages": [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)}, REFUSED),
    ("no messages", {"messages": []}, REFUSED),
    # An integer is a JSON number without a fraction (JSON Schema's `integer`, which takes 2.0 too)...
    ("n 2", {"n": 2}, OK),
    ("n 2.0", {"n": 2.0}, OK),
    ("max_tokens 10.0", {"max_tokens": 10.0}, OK),
    ("n 1.5", {"n": 1.5}, REFUSED),
    # ...and neither a boolean nor a string, which the document does not allow (pydantic's lax int took both).
    ("n true", {"n": True}, REFUSED),
    ("n as a string", {"n": "2"}, REFUSED),
    ("seed false", {"seed": False}, REFUSED),
    ("logit_bias value a boolean", {"logit_bias": {"1": False}}, REFUSED),
    ("temperature 1", {"temperature": 1}, OK),
    ("temperature 0.5", {"temperature": 0.5}, OK),
    ("temperature true", {"temperature": True}, REFUSED),
    ("temperature as a string", {"temperature": "0.5"}, REFUSED),
    ("top_p as a string", {"top_p": "1"}, REFUSED),
    ("logit_bias", {"logit_bias": {"1": 5, "50256": -100}}, OK),
    ("logit_bias key not a token id", {"logit_bias": {"x": 1}}, REFUSED),
    ("logit_bias value 101", {"logit_bias": {"1": 101}}, REFUSED),
    ("seed int64 max", {"seed": INT64_MAX}, OK),
    ("seed int64 min", {"seed": INT64_MIN}, OK),
    ("seed over int64", {"seed": INT64_MAX + 1}, REFUSED),
    ("an unknown field", {"x_custom": {"a": [1, "b", None, 1.5]}}, OK),
    ("an unknown field at int64 max", {"x_custom": INT64_MAX}, OK),
    ("an unknown field over int64", {"x_custom": INT64_MAX + 1}, REFUSED),
    ("an integer over int64 deep in an unknown field", {"x_custom": {"a": [{"b": -(2**70)}]}}, REFUSED),
    ("tool parameters", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"n": {"maximum": 10}}}}}]}, OK),
    ("an integer over int64 in tool parameters", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"maximum": 2**64}}}]}, REFUSED),
    ("an integer over int64 in a message's unknown field", {"messages": [{"role": "user", "content": "x",
                                                                         "x": 2**63}]}, REFUSED),
    ("a json_schema response format", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}}}, OK),
    ("stop: 4 strings", {"stop": ["a", "b", "c", "d"]}, OK),
    ("stop: 5 strings", {"stop": ["a", "b", "c", "d", "e"]}, REFUSED),
    ("stream as a string", {"stream": "true"}, REFUSED),
    ("no model", {"model": DROP}, REFUSED),
    ("model a number", {"model": 3}, REFUSED),
]


@pytest.mark.parametrize(("case", "message", "accepted"), MESSAGES, ids=[c[0] for c in MESSAGES])
def test_each_role_is_refused_by_the_schema_when_the_server_refuses_it(case: str, message: Any,
                                                                       accepted: bool) -> None:
    body = body_with(message)
    server, schema = server_accepts(body), schema_accepts(body)
    assert server[0] is accepted, server[1]
    assert schema[0] is accepted, f"the server says {server[1]!r}; the schema says {schema[1]!r}"


@pytest.mark.parametrize(("case", "fields", "accepted"), FIELDS, ids=[c[0] for c in FIELDS])
def test_request_rules_are_in_the_schema(case: str, fields: dict[str, Any], accepted: bool) -> None:
    body = {key: value for key, value in body_with(**fields).items() if value is not DROP}
    server, schema = server_accepts(body), schema_accepts(body)
    assert server[0] is accepted, server[1]
    assert schema[0] is accepted, f"the server says {server[1]!r}; the schema says {schema[1]!r}"


def test_error_messages_and_params_stay_as_they_were() -> None:
    """The schema's per-role shapes do not change what a refusal says (tests/test_validation.py relies on it)."""
    cases = [
        ({"role": "tool"}, "Invalid 'messages[0]': content is required for a tool message.", "messages[0]"),
        ({"role": "tool", "content": "x"}, "Invalid 'messages[0]': tool messages need tool_call_id.", "messages[0]"),
        ({"role": "assistant", "tool_calls": []}, "Invalid 'messages[0]': content is required for a assistant "
                                                  "message.", "messages[0]"),
        ({"role": "bot", "content": "x"}, None, "messages[0].role"),
    ]
    for message, text, param in cases:
        with pytest.raises(GatewayError) as caught:
            parse_raw(json.dumps(body_with(message)).encode(), MAX_MESSAGES)
        assert caught.value.param == param
        if text is not None:
            assert caught.value.message == text


def test_the_schema_is_a_valid_json_schema_with_every_role() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    variants = SCHEMA["$defs"]["Message"]["anyOf"]
    roles = {variant["properties"]["role"]["const"] for variant in variants}
    assert roles == {"system", "developer", "user", "assistant", "tool"}
    # The plain schema (what the document is built from without settings) has every rule but the bounds.
    plain = ChatCompletionRequest.model_json_schema()
    assert "anyOf" in plain["$defs"]["Message"] and "JsonValue" in plain["$defs"] and "then" in plain
    assert "maxItems" not in plain["properties"]["messages"]


# -- the served document ---------------------------------------------------------------------------------------

def test_the_served_document_states_the_configured_bounds(tmp_path: Path) -> None:
    """The app's /openapi.json carries this schema with its own settings' bounds, and they bite as stated."""
    with app_server(tmp_path, accounts=False, max_messages=3, max_tokens_limit=50) as srv, srv.client() as client:
        schemas = client.get("/openapi.json").json()["components"]["schemas"]
        body = schemas["ChatCompletionRequest"]
        assert body["properties"]["messages"]["maxItems"] == 3
        for name in ("max_tokens", "max_completion_tokens"):
            assert {"type": "integer", "minimum": 1, "maximum": 50} in body["properties"][name]["anyOf"]
        assert body["then"] == {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}
        assert "anyOf" in schemas["Message"] and "JsonValue" in schemas
        over = [{"role": "user", "content": "x"}] * 4
        for fields, param in (({"messages": over}, "messages"), ({"max_tokens": 51}, "max_tokens")):
            answer = srv.chat(body_with(**fields), path="/v1/chat/completions")
            assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
