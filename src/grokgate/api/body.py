"""The chat body: read, checked for its media type, parsed and validated straight from the raw JSON bytes.

Parsing is the one thing a caller gets done before admission, so a large body is parsed only for a caller that
can be served, and off the event loop:

- **Before the body is read**, a caller this process knows to be past its rpm is refused (core/admission.py
  `Gate.precheck`: no I/O), and the connection closed if the body may be large. Refused requests count against
  the rpm (api/chat.py), so a token that sends only invalid bodies soon gets 429s without its bodies being read.
- **A body over `settings.parse_offload_bytes`** is parsed only for a caller within its rpm (a read-only check of
  its bucket) and with a balance above zero (`Gate.servable`; 429 and 403 `used_up` otherwise), and then in a
  worker thread, one at a time per tenant (`Parsing`). pydantic-core holds the GIL while it parses and
  validates, so the loop still waits for it in stretches (0.2-0.6 s at a time for a 10 MB body of a million
  small items: bench/refused_bodies.py --funded); it runs between them, and one tenant's parses queue behind
  each other. What bounds that cost for a token is its rpm, which refused requests count against.

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

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError
from pydantic_core import SchemaValidator
from pydantic_core import core_schema as cs
from starlette.requests import Request

from grokgate.api.errors import validation_error
from grokgate.core.admission import Principal
from grokgate.core.errors import GatewayError, bad_request
from grokgate.core.tenancy import tenant_of
from grokgate.schemas.chat import INT64_MAX, INT64_MIN, ITEMS_PER_MESSAGE, MAX_STOP, MAX_TOOLS, ChatCompletionRequest
from grokgate.schemas.responses import ResponsesRequest

if TYPE_CHECKING:
    from grokgate.api.deps import Gateway

_Body = TypeVar("_Body", bound=BaseModel)
_T = TypeVar("_T")

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


# Parsing holds the GIL, so more threads would only take turns at it: two let one tenant's long parse not stop
# every other tenant's. Threads start on first use; one pool for the process.
_PARSERS = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="grokgate-parse")


@dataclass
class _Turn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # parses holding or waiting for the lock


class Parsing:
    """Large bodies parsed in worker threads, one at a time per tenant: a tenant's parses queue behind each
    other, not beside everyone's. A parse whose request is cancelled still holds its tenant's turn until its
    thread is done with it (a thread cannot be stopped)."""

    def __init__(self) -> None:
        self._turns: dict[str, _Turn] = {}

    async def run(self, tenant: str, parse: Callable[[], _T]) -> _T:
        turn = self._turns.get(tenant)
        if turn is None:
            turn = self._turns[tenant] = _Turn()
        turn.users += 1
        try:
            await turn.lock.acquire()
        except BaseException:
            self._leave(tenant, turn)
            raise
        loop = asyncio.get_running_loop()
        try:
            job = _PARSERS.submit(parse)
        except BaseException:
            self._done(tenant, turn)
            raise

        def finished(_: concurrent.futures.Future[_T]) -> None:
            try:
                loop.call_soon_threadsafe(self._done, tenant, turn)
            except RuntimeError:  # the loop is closed: nobody waits for this turn any more
                pass

        job.add_done_callback(finished)
        return await asyncio.wrap_future(job)

    @property
    def tenants(self) -> int:
        """Tenants with a parse running or waiting."""
        return len(self._turns)

    def _done(self, tenant: str, turn: _Turn) -> None:
        turn.lock.release()
        self._leave(tenant, turn)

    def _leave(self, tenant: str, turn: _Turn) -> None:
        turn.users -= 1
        if turn.users == 0 and self._turns.get(tenant) is turn:
            del self._turns[tenant]


async def _read(request: Request, gw: Gateway, principal: Principal) -> bytes:
    """The body's bytes, checked for a JSON media type, once the caller may have them parsed (the module
    docstring)."""
    try:
        gw.gate.precheck(principal)
    except GatewayError as error:
        raise _unread(request, error, gw.settings.parse_offload_bytes) from None
    content_type = request.headers.get("content-type", "")
    raw = await request.body()
    media = content_type.split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise GatewayError(400, "bad_request", "Send the body as JSON with 'Content-Type: application/json'.")
    if not raw.strip():
        raise GatewayError(400, "bad_request", "A JSON request body is required.")
    if len(raw) > gw.settings.parse_offload_bytes:
        await gw.gate.servable(principal)
    return raw


def _unread(request: Request, error: GatewayError, large: int) -> GatewayError:
    """`error`, answered before the body was read: with `connection: close` when the body may be large (declared
    so, or chunked), because the server would otherwise receive all of it to keep the connection (uvicorn reads
    and drops a body the app left unread), at the cost of the event loop's time for every client."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) <= large:
        return error
    return GatewayError(error.status, error.code, error.message, param=error.param,
                        headers={**error.headers, "connection": "close"})


async def parse_body(request: Request, gw: Gateway, principal: Principal) -> ChatCompletionRequest:
    raw = await _read(request, gw, principal)
    if len(raw) <= gw.settings.parse_offload_bytes:
        return parse_raw(raw, gw.settings.max_messages)
    return await gw.parsing.run(tenant_of(principal), partial(parse_raw, raw, gw.settings.max_messages))


async def parse_responses_body(request: Request, gw: Gateway, principal: Principal) -> ResponsesRequest:
    """A Responses API body, with the same guards as chat's: its `input` items play the messages' part."""
    raw = await _read(request, gw, principal)
    if len(raw) <= gw.settings.parse_offload_bytes:
        return parse_responses_raw(raw, gw.settings.max_messages)
    return await gw.parsing.run(tenant_of(principal), partial(parse_responses_raw, raw, gw.settings.max_messages))


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
