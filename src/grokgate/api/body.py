"""The chat body: read, checked for its media type, parsed and validated straight from the raw JSON bytes.

Two guards sit around pydantic's validation; on an ordinary body each costs one pass of a C byte routine:

- **Counts before validation.** Validating costs ~3-8 us per message, content part, tool call or tool, and a
  16 MiB body can carry 480k messages (1.6 s of event loop, hundreds of MB). A list of n items needs n - 1
  commas, so a body with fewer commas than `max_messages` cannot break any list bound; only bodies with more
  get counting passes (pydantic-core over the raw bytes with skeleton schemas that keep nothing, about the
  cost of a JSON parse each), which refuse over-long lists before anything else is built.
- **Integers after validation.** JSON integers of any size become Python ints, which orjson (used to forward
  and echo bodies) and the engines cannot encode. Every integer outside int64 has at least 19 digits, so only
  a body with a run of 19 digits somewhere gets parsed once more to find the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError
from pydantic_core import SchemaValidator
from pydantic_core import core_schema as cs
from starlette.requests import Request

from grokgate.api.errors import validation_error
from grokgate.core.errors import GatewayError, bad_request
from grokgate.schemas.chat import INT64_MAX, INT64_MIN, ITEMS_PER_MESSAGE, MAX_STOP, MAX_TOOLS, ChatCompletionRequest
from grokgate.schemas.responses import ResponsesRequest

_Body = TypeVar("_Body", bound=BaseModel)

_NOT_AN_OBJECT = "The request body must be a JSON object."


def _optional(schema: cs.CoreSchema) -> cs.TypedDictField:
    return cs.typed_dict_field(schema, required=False)


def _first_of(*choices: cs.CoreSchema) -> cs.CoreSchema:
    return cs.union_schema(list(choices), mode="left_to_right")


def _dropped(_: Any) -> None:
    return None


# Any JSON value, kept as nothing: an object becomes `{}` (its members stay in pydantic-core's parsed tree), an
# array a list of Nones, a scalar itself, and each is dropped as soon as it is built. So a counting pass holds
# one None per item of the lists it counts, however large or nested the items are.
_ITEM = cs.definition_reference_schema("item")
_ITEM_DEFINITION = cs.no_info_after_validator_function(_dropped, _first_of(
    cs.str_schema(strict=True),  # first: stop sequences, and the cheapest filler of a hostile list
    cs.typed_dict_schema({}, extra_behavior="ignore"),
    cs.list_schema(_ITEM),
    cs.any_schema(),
), ref="item")


def _skeleton(schema: cs.CoreSchema) -> SchemaValidator:
    return SchemaValidator(cs.definitions_schema(schema, [_ITEM_DEFINITION]))


def _list_of(item: cs.CoreSchema) -> cs.CoreSchema:
    return _first_of(cs.list_schema(item), _ITEM)


# Two passes: the request's lists first, then (with at most max_messages messages) the lists in each message.
_LISTS = _skeleton(_first_of(
    cs.typed_dict_schema({name: _optional(_list_of(_ITEM)) for name in ("messages", "tools", "stop")},
                         extra_behavior="ignore"),
    _ITEM,
))
_MESSAGE_LISTS = _skeleton(cs.typed_dict_schema({"messages": _optional(_list_of(_first_of(
    cs.typed_dict_schema({name: _optional(_list_of(_ITEM)) for name in ("content", "tool_calls")},
                         extra_behavior="ignore"),
    _ITEM,
)))}, extra_behavior="ignore"))

# The Responses API's lists: `input` (items, each perhaps with a list of content parts) and `tools`.
_RESPONSES_LISTS = _skeleton(_first_of(
    cs.typed_dict_schema({
        "input": _optional(_first_of(cs.list_schema(_first_of(
            cs.typed_dict_schema({name: _optional(_list_of(_ITEM)) for name in ("content", "output")},
                                 extra_behavior="ignore"),
            _ITEM,
        )), _ITEM)),
        "tools": _optional(_list_of(_ITEM)),
    }, extra_behavior="ignore"),
    _ITEM,
))

# bytes.translate maps every digit to "0" and everything else to " ": a C pass, then a substring search.
_DIGITS = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
_INT64_DIGITS = b"0" * 19


async def _json_body(request: Request) -> bytes:
    content_type = request.headers.get("content-type", "")
    raw = await request.body()
    media = content_type.split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise GatewayError(400, "bad_request", "Send the body as JSON with 'Content-Type: application/json'.")
    if not raw.strip():
        raise GatewayError(400, "bad_request", "A JSON request body is required.")
    return raw


async def parse_body(request: Request) -> ChatCompletionRequest:
    return parse_raw(await _json_body(request), request.app.state.gateway.settings.max_messages)


async def parse_responses_body(request: Request) -> ResponsesRequest:
    """A Responses API body, with the same guards as chat's: its `input` items play the messages' part."""
    return parse_responses_raw(await _json_body(request), request.app.state.gateway.settings.max_messages)


def parse_responses_raw(raw: bytes, max_messages: int) -> ResponsesRequest:
    return _parse(raw, max_messages, ResponsesRequest, check_responses_counts)


def check_responses_counts(raw: bytes, max_messages: int) -> None:
    try:
        shape = _RESPONSES_LISTS.validate_json(raw)
    except ValidationError:
        return
    if not isinstance(shape, dict):
        raise GatewayError(400, "bad_request", _NOT_AN_OBJECT)
    tools = shape.get("tools")
    if isinstance(tools, list) and len(tools) > MAX_TOOLS:
        raise bad_request(f"Invalid 'tools': at most {MAX_TOOLS} items are accepted, not {len(tools)}.", "tools")
    items = shape.get("input")
    if not isinstance(items, list):
        return
    if len(items) > max_messages:
        raise bad_request(f"Too many input items: at most {max_messages} are accepted.", "input")
    limit = ITEMS_PER_MESSAGE * max_messages
    parts = 0
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        for name in ("content", "output"):  # a message's parts, a function_call_output's parts
            listed = item.get(name)
            if isinstance(listed, list) and (parts := parts + len(listed)) > limit:
                raise bad_request(f"Too many content parts: at most {limit} are accepted in all input items "
                                  "together.", f"input[{i}].{name}")


def parse_raw(raw: bytes, max_messages: int) -> ChatCompletionRequest:
    """The body's bytes to a validated request, or a GatewayError naming the field."""
    return _parse(raw, max_messages, ChatCompletionRequest, check_counts)


def _parse(raw: bytes, max_messages: int, model: type[_Body], counts: Callable[[bytes, int], None]) -> _Body:
    """Both APIs' bodies: lists counted first when the body could hold too many items, then validated, then
    integers checked when a 19-digit run exists."""
    if raw.count(b",") >= max_messages:
        counts(raw, max_messages)
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        # include_input=False: the offending values are not needed, and copying them is what costs.
        raise validation_error([dict(e) for e in exc.errors(include_url=False, include_input=False)]) from None
    if _INT64_DIGITS in raw.translate(_DIGITS):
        check_integers(raw)
    return body


def check_counts(raw: bytes, max_messages: int) -> None:
    """Refuse over-long lists from skeletons of the body, before the full validation builds them."""
    try:
        shape = _LISTS.validate_json(raw)
    except ValidationError:
        return  # not JSON: the full validation says so, at the same cost (the parse stops at the error)
    if not isinstance(shape, dict):
        raise GatewayError(400, "bad_request", _NOT_AN_OBJECT)
    for name, most in (("tools", MAX_TOOLS), ("stop", MAX_STOP)):
        items = shape.get(name)
        if isinstance(items, list) and len(items) > most:
            raise bad_request(f"Invalid '{name}': at most {most} items are accepted, not {len(items)}.", name)
    messages = shape.get("messages")
    if not isinstance(messages, list):
        return
    if len(messages) > max_messages:
        raise bad_request(f"Too many messages: at most {max_messages} are accepted.", "messages")
    limit = ITEMS_PER_MESSAGE * max_messages
    parts = calls = 0
    for i, message in enumerate(_MESSAGE_LISTS.validate_json(raw)["messages"]):
        if not isinstance(message, dict):
            continue
        content, tool_calls = message.get("content"), message.get("tool_calls")
        if isinstance(content, list) and (parts := parts + len(content)) > limit:
            raise bad_request(f"Too many content parts: at most {limit} are accepted in all messages together.",
                              f"messages[{i}].content")
        if isinstance(tool_calls, list) and (calls := calls + len(tool_calls)) > limit:
            raise bad_request(f"Too many tool calls: at most {limit} are accepted in all messages together.",
                              f"messages[{i}].tool_calls")


def check_integers(raw: bytes) -> None:
    """Refuse the first integer outside int64, naming where it is (the body is valid JSON by now)."""
    path = _wide_integer(pydantic_core.from_json(raw), "")
    if path is not None:
        raise bad_request(f"Invalid '{path}': integers must be between {INT64_MIN} and {INT64_MAX}.", path)


def _wide_integer(value: Any, path: str) -> str | None:
    if type(value) is int:
        return path if not INT64_MIN <= value <= INT64_MAX else None
    if isinstance(value, dict):
        for key, item in value.items():
            if (found := _wide_integer(item, f"{path}.{key}" if path else str(key))) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _wide_integer(item, f"{path}[{i}]")) is not None:
                return found
    return None
