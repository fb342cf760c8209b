"""The Responses API's request schema, its translation to chat, and its wire format, in process (no server, no
model): src/grokgate/schemas/responses.py, src/grokgate/serving/responses.py and responses_wire.py.

The rendered stream is read by openai-python's own code: each payload parsed as a `ResponseStreamEvent` and fed
to `ResponseStreamState`, the accumulator behind `client.responses.stream()`; collected objects are parsed with
`openai.types.responses.Response.model_validate`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import jsonschema
import orjson
import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from grokgate.api.errors import validation_error
from grokgate.core.admission import Principal
from grokgate.core.errors import GatewayError
from grokgate.core.events import Delta, Event, Extra, Finish, Item, JSONObject, Usage, UsageReport
from grokgate.core.pricing import PromptShape, prompt_token_bound
from grokgate.core.responses import ChainTooLong, StoredResponse
from grokgate.core.tenancy import tenant_of
from grokgate.observability.metrics import Metrics
from grokgate.schemas.chat import ChatCompletionRequest
from grokgate.schemas.responses import ResponsesChatRequest, ResponsesRequest
from grokgate.serving import CallOptions
from grokgate.serving.responses import ResponsesService, translate, turn_item
from grokgate.serving.responses_wire import ResponsesWire

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
ALICE = Principal(key_id="a", token_id=1, account_id=1)
BOB = Principal(key_id="b", token_id=2, account_id=2)


# -- fakes -----------------------------------------------------------------------------------------------------


class FakeStore:
    """A ResponseStore in a dict (core/responses.py's contract, without expiry)."""

    def __init__(self, *, fail: bool = False) -> None:
        self.kept: dict[str, StoredResponse] = {}
        self.fail = fail

    async def save(self, response: StoredResponse, *, max_bytes: int | None = None) -> int | None:
        if self.fail:
            raise RuntimeError("database down")
        size = len(orjson.dumps(response.input_items)) + len(orjson.dumps(response.response))
        if max_bytes is not None and size > max_bytes:
            return None
        self.kept.setdefault(response.id, response)
        return size

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        found = self.kept.get(response_id)
        return found if found is not None and found.owner == owner else None

    async def delete(self, owner: str, response_id: str) -> bool:
        if await self.get(owner, response_id) is None:
            return False
        del self.kept[response_id]
        return True

    async def chain(self, owner: str, response_id: str, *, max_items: int, max_bytes: int) -> list[StoredResponse]:
        chain: list[StoredResponse] = []
        current = await self.get(owner, response_id)
        while current is not None:
            chain.insert(0, current)
            if sum(len(r.input_items) + len(r.output) for r in chain) > max_items:
                raise ChainTooLong
            if sum(len(orjson.dumps([r.input_items, r.response])) for r in chain) > max_bytes:
                raise ChainTooLong
            current = await self.get(owner, current.previous_id) if current.previous_id else None
        return chain

    async def purge(self, now_ms: int) -> int:
        return 0

    async def stats(self) -> tuple[int, int]:
        return len(self.kept), 0


class Framing:
    keepalive = b": keep-alive\n\n"
    done = b""

    @staticmethod
    def frame(payload: dict[str, Any]) -> bytes:
        return b"event: " + str(payload["type"]).encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def service(store: FakeStore | None = None, *, max_stored_bytes: int = 1 << 20, max_messages: int = 64,
            max_chain_bytes: int = 1 << 20) -> tuple[ResponsesService, FakeStore, Metrics]:
    store = store or FakeStore()
    metrics = Metrics()
    return ResponsesService(store, metrics, Framing(), retention_ms=86_400_000, max_stored_bytes=max_stored_bytes,
                            max_chain_bytes=max_chain_bytes, max_messages=max_messages), store, metrics


def body(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "grok-3", "input": "Hi", **fields})


def prepare(svc: ResponsesService, principal: Principal = ALICE, **fields: Any) -> tuple[Any, ResponsesWire]:
    return asyncio.run(svc.prepare(body(**fields), CallOptions(tenant_of(principal), "req-1", 0.0)))


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def stream(wire: ResponsesWire, events: Sequence[Event], *, commit: bool = True) -> list[dict[str, Any]]:
    """The payloads of a complete stream, in the lifecycle's order (serving/lifecycle.py `_stream`)."""
    renderer = wire.renderer(ResponsesChatRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "x"}]}), "fp")
    payloads = list(renderer.opening())
    for event in events:
        payloads += renderer.on_event(event)
    if commit:
        asyncio.run(renderer.commit())
    payloads += renderer.closing()
    return payloads


def collect(wire: ResponsesWire, events: Sequence[Event], *, commit: bool = True) -> dict[str, Any]:
    collector = wire.collector(ResponsesChatRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "x"}]}), "fp")
    for event in events:
        collector.on_event(event)
    result = collector.result()
    if commit:
        asyncio.run(collector.commit())
    return result


def sdk_read(payloads: list[dict[str, Any]]) -> tuple[list[Any], ResponseStreamState[Any]]:
    """Each payload through openai-python's event types and its stream accumulator; sequence numbers checked."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    events = []
    for payload in payloads:
        event = EVENTS.validate_python(orjson.loads(orjson.dumps(payload)))  # what the wire carries
        events += state.handle_event(event)
    numbers = [p["sequence_number"] for p in payloads]
    assert numbers == sorted(set(numbers)) and numbers[0] == 0
    return events, state


TEXT: list[Event] = [Delta(0, content="Hel"), Delta(0, content="lo"), Finish(0, "stop"),
        UsageReport(Usage(prompt_tokens=7, completion_tokens=3, cached_tokens=2, reasoning_tokens=1))]


# -- the request: validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "param"), [
    ({"input": [{"role": "bot", "content": "x"}]}, "input[0].role"),
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": ["x"]}, "input[0]"),
    ({"input": [{"role": "user", "content": []}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
    ({"input": [{"type": "function_call_output", "call_id": "", "output": "x"}]}, "input[0].call_id"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": True}, "max_output_tokens"),
    ({"store": "yes"}, "store"),
    ({"tools": [{"type": "function"}]}, "tools[0].name"),
    ({"tools": [{"type": "computer_use"}]}, "tools[0]"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"type": "function"}}, "tool_choice.name"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format"),
    ({"reasoning": {"effort": "huge"}}, "reasoning.effort"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    ({"truncation": "sometimes"}, "truncation"),
])
def test_invalid_bodies_name_their_param(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(ValidationError) as caught:
        body(**fields)
    error = validation_error([dict(e) for e in caught.value.errors(include_url=False, include_input=False)])
    assert (error.status, error.code) == (400, "bad_request")
    assert error.param is not None and error.param.startswith(param), error.param


def test_refusals_say_why() -> None:
    for fields, words in (({"input": [{"type": "item_reference", "id": "x"}]}, "previous_response_id"),
                          ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
                           "file_id"),
                          ({"tools": [{"type": "computer_use"}]}, "computer_use")):
        with pytest.raises(ValidationError) as caught:
            body(**fields)
        assert words in str(caught.value)


def test_check_limits_names_the_field() -> None:
    items = [{"role": "user", "content": "x"}] * 3
    with pytest.raises(GatewayError) as caught:
        body(input=items).check_limits(max_messages=2, max_tokens_limit=100)
    assert (caught.value.status, caught.value.param) == (400, "input")
    parts = [{"type": "input_text", "text": "x"}] * 5
    with pytest.raises(GatewayError) as caught:
        body(input=[{"role": "user", "content": parts}, {"role": "user", "content": parts}]).check_limits(
            max_messages=2, max_tokens_limit=100)
    assert caught.value.param == "input[1].content"
    with pytest.raises(GatewayError) as caught:
        body(max_output_tokens=101).check_limits(max_messages=2, max_tokens_limit=100)
    assert caught.value.param == "max_output_tokens"
    body(input=items[:2], max_output_tokens=100).check_limits(max_messages=2, max_tokens_limit=100)


def test_unknown_fields_and_pass_through_items_are_accepted() -> None:
    request = body(input=[{"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "e"},
                          {"role": "user", "content": "q", "phase": "x"}], service_tier="auto", prompt_cache_key="k")
    assert request.model_extra == {"service_tier": "auto", "prompt_cache_key": "k"}
    assert request.keep and body(store=None).keep and not body(store=False).keep


GOOD_BODIES: list[dict[str, Any]] = [
    {"model": "m", "input": "hi"},
    {"model": "m", "input": [{"role": "developer", "content": [{"type": "input_text", "text": "x"},
                                                              {"type": "input_image", "image_url": "http://i"}]}],
     "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}, {"type": "x_search"}],
     "tool_choice": {"type": "function", "name": "f"}, "text": {"format": {"type": "json_schema", "name": "n",
                                                                            "schema": {"type": "object"}}}},
    {"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                             {"type": "function_call_output", "call_id": "c", "output": "ok"},
                             {"type": "web_search_call", "id": "ws", "status": "completed"}],
     "metadata": {"a": "b"}, "reasoning": {"effort": "xhigh"}, "max_output_tokens": 5, "store": False},
]
BAD_BODIES: list[dict[str, Any]] = [
    {"model": "m", "input": [{"type": "item_reference", "id": "x"}]},
    {"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
    {"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
    {"model": "m", "input": "hi", "tools": [{"type": "computer_use"}]},
    {"model": "m", "input": "hi", "max_output_tokens": 101},
    {"model": "m", "input": [{"role": "user", "content": "x"}] * 4},
    {"model": "m", "input": "hi", "temperature": 3},
    {"model": "m"},
]


def test_openapi_schema_is_true_to_the_validation() -> None:
    """What the published schema accepts, the model and check_limits accept, and the other way round."""
    schema = ResponsesRequest.openapi_schema(3, 100, ref_template="#/$defs/{model}")
    assert not [name for name in schema["$defs"] if name.startswith("Unsupported")]
    assert "Unsupported" not in orjson.dumps(schema).decode()
    validator = jsonschema.Draft202012Validator(schema)

    def accepted(data: dict[str, Any]) -> bool:
        try:
            ResponsesRequest.model_validate(data).check_limits(max_messages=3, max_tokens_limit=100)
        except (ValidationError, GatewayError):
            return False
        return True

    for data in GOOD_BODIES:
        assert validator.is_valid(data) and accepted(data), data
    for data in BAD_BODIES:
        assert not validator.is_valid(data) and not accepted(data), data


def test_schema_names_do_not_clash_with_chats() -> None:
    """Both bodies' models share the OpenAPI document's components (api/openapi.py): only JsonValue, the same."""
    chat = ChatCompletionRequest.openapi_schema(3, 100)["$defs"]
    responses = ResponsesRequest.openapi_schema(3, 100)["$defs"]
    assert set(chat) & set(responses) == {"JsonValue"} and chat["JsonValue"] == responses["JsonValue"]


# -- the translation -------------------------------------------------------------------------------------------


def chat_of(request: ResponsesRequest, history: list[JSONObject] | None = None) -> ResponsesChatRequest:
    return translate(request, history or [], [turn_item(item) for item in request.input])


def test_string_input_and_instructions() -> None:
    chat = chat_of(body(instructions="Be brief.", max_output_tokens=9, temperature=0.5, top_p=0.9, user="u",
                        parallel_tool_calls=False, metadata={"k": "v"}, stream=True))
    messages = [m.model_dump(exclude_none=True) for m in chat.messages]
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (chat.max_completion_tokens, chat.temperature, chat.top_p, chat.user) == (9, 0.5, 0.9, "u")
    assert chat.parallel_tool_calls is False and chat.stream is True and chat.metadata is None
    assert chat.choices == 1 and chat.server_tools == []


def test_each_item_kind() -> None:
    request = body(input=[
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "input_text", "text": "look"},
                                     {"type": "input_image", "image_url": "data:image/png;base64,AA",
                                      "detail": "low"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "secret"},
        {"type": "message", "role": "assistant", "id": "msg_9", "status": "completed",
         "content": [{"type": "output_text", "text": "I see ", "annotations": []},
                     {"type": "output_text", "text": "a cat"}]},
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{\"c\":1}"},
        {"type": "function_call", "call_id": "call_2", "name": "time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "noon"}, {"type": "input_image", "image_url": "http://x/i.png"}]},
        {"type": "function_call", "call_id": "call_3", "name": "again", "arguments": "{}"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
    ])
    messages = [m.model_dump(exclude_none=True, exclude_defaults=False) for m in chat_of(request).messages]
    assert messages[0] == {"role": "developer", "content": "rules"}
    assert messages[1]["content"] == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA", "detail": "low"}}]
    # The reasoning item is not a chat message; the assistant's text joins its two function calls.
    assert messages[2]["role"] == "assistant" and messages[2]["content"] == "I see a cat"
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in messages[2]["tool_calls"]] == [
        ("call_1", "weather", "{\"c\":1}"), ("call_2", "time", "{}")]
    assert messages[3] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    assert messages[4]["role"] == "tool" and messages[4]["content"][1]["image_url"]["url"] == "http://x/i.png"
    # A function call after tool outputs starts an assistant message of its own.
    assert messages[5]["role"] == "assistant" and "content" not in messages[5]
    assert messages[5]["tool_calls"][0]["id"] == "call_3"
    assert messages[6] == {"role": "assistant", "content": "", "refusal": "no"}
    assert len(messages) == 7


def test_tools_tool_choice_and_formats() -> None:
    chat = chat_of(body(
        tools=[{"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"},
                "strict": True}, {"type": "web_search"}, {"type": "x_search", "allowed_x_handles": ["a"]}],
        tool_choice={"type": "function", "name": "f"},
        text={"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": True}},
        reasoning={"effort": "xhigh"}))
    assert [t.model_dump(exclude_none=True) for t in chat.tools or ()] == [
        {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"},
                                          "strict": True}}]
    assert chat.server_tools == ["web_search", "x_search"]
    assert chat.tool_choice is not None and chat.tool_choice.model_dump() == {
        "type": "function", "function": {"name": "f"}}
    assert chat.response_format is not None and chat.response_format.model_dump(by_alias=True, exclude_none=True) == {
        "type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True}}
    assert chat.reasoning_effort == "high"
    # Only server-side tools: no chat tools, no chat tool_choice; effort "none" leaves reasoning_effort unset.
    chat = chat_of(body(tools=[{"type": "web_search"}], tool_choice="required", reasoning={"effort": "none"},
                        text={"format": {"type": "json_object"}}))
    assert chat.tools is None and chat.tool_choice is None and chat.reasoning_effort is None
    assert chat.response_format is not None and chat.response_format.type == "json_object"


def test_turn_items_get_ids_and_parts() -> None:
    request = body(input=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                          {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                          {"type": "function_call_output", "call_id": "c", "output": "o", "id": "mine"},
                          {"type": "reasoning", "summary": []}])
    items = [turn_item(item) for item in request.input]
    assert [str(i["id"]).split("_")[0] for i in items[:3]] == ["msg", "msg", "fc"]
    assert items[3]["id"] == "mine" and str(items[4]["id"]).startswith("item_")
    assert items[0]["content"] == [{"type": "input_text", "text": "q"}] and items[0]["type"] == "message"
    assert items[1]["content"] == [{"type": "output_text", "text": "a", "annotations": []}]


def test_native_body_is_the_whole_conversation() -> None:
    svc, _, _ = service()
    _, wire = prepare(svc, input="first")
    collect(wire, [Delta(0, reasoning_content="hm"),
                   Item(0, {"type": "reasoning", "id": "rs_x", "summary": [], "encrypted_content": "E"}),
                   Delta(0, content="one"), Finish(0, "stop")])
    call, _ = prepare(svc, input=[{"role": "user", "content": "second", "phase": "p"}], previous_response_id=wire.id,
                      instructions="Sys", tools=[{"type": "x_search"}], service_tier="auto")
    native = call.request.responses_body
    assert native is not None
    assert "previous_response_id" not in native and "instructions" not in native and native["store"] is False
    assert native["service_tier"] == "auto" and native["tools"] == [{"type": "x_search"}]
    kinds = [(i.get("type"), i.get("role")) for i in native["input"]]
    assert kinds == [("message", "system"), ("message", "user"), ("reasoning", None), ("message", "assistant"),
                     ("message", "user")]
    assert native["input"][0]["content"] == "Sys"
    assert native["input"][2]["encrypted_content"] == "E"  # xAI's reasoning goes back as it came
    assert native["input"][3] == {"type": "message", "role": "assistant", "content": "one"}
    assert "id" not in native["input"][1] and native["input"][4]["phase"] == "p"
    # The chat side: the chain's turns, then this one; the reasoning item is left out.
    assert [(m.role, m.content) for m in call.request.messages] == [
        ("system", "Sys"), ("user", "first"), ("assistant", "one"), ("user", "second")]
    assert call.request.server_tools == ["x_search"]
    # The prompt's bound: the whole conversation as the backend gets it (core/pricing.py), 4 chat messages.
    assert call.prompt_tokens == prompt_token_bound(orjson.dumps(native), PromptShape(messages=4))
    assert call.prompt_tokens > len(orjson.dumps([m.model_dump() for m in call.request.messages]))
    # A reasoning item without encrypted content (made from reasoning text) is not sent back: nothing could read it.
    _, wire = prepare(svc, input="think")
    collect(wire, [Delta(0, reasoning_content="hm"), Delta(0, content="ok")])
    call, _ = prepare(svc, input="next", previous_response_id=wire.id)
    assert [i["type"] for i in call.request.responses_body["input"]] == ["message", "message", "message"]


# -- the service: chains and stored responses ------------------------------------------------------------------


def test_previous_response_id_of_nobody_or_another_owner_is_404() -> None:
    svc, _, _ = service()
    with pytest.raises(GatewayError) as caught:
        prepare(svc, previous_response_id="resp_nope")
    assert (caught.value.status, caught.value.param) == (404, "previous_response_id")
    _, wire = prepare(svc)
    collect(wire, TEXT)
    with pytest.raises(GatewayError) as caught:
        prepare(svc, BOB, previous_response_id=wire.id)
    assert caught.value.status == 404
    for call in (svc.retrieve(BOB, wire.id), svc.delete(BOB, wire.id), svc.input_items(BOB, wire.id)):
        with pytest.raises(GatewayError) as caught:
            asyncio.run(call)
        assert (caught.value.status, caught.value.code) == (404, "not_found")


def test_chain_too_long_is_400() -> None:
    svc, _, _ = service(max_messages=4)
    _, wire = prepare(svc, input=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    collect(wire, TEXT)
    prepare(svc, previous_response_id=wire.id)  # 3 stored items + 1 = 4: fits
    with pytest.raises(GatewayError) as caught:
        prepare(svc, previous_response_id=wire.id, input=[{"role": "user", "content": "x"}] * 2)
    assert (caught.value.status, caught.value.param) == (400, "previous_response_id")


def test_a_chain_of_three_turns() -> None:
    svc, _, _ = service()
    previous = None
    for turn in ("one", "two", "three"):
        call, wire = prepare(svc, input=turn, previous_response_id=previous)
        collect(wire, [Delta(0, content=turn.upper()), Finish(0, "stop")])
        previous = wire.id
    assert [(m.role, m.content) for m in call.request.messages] == [
        ("user", "one"), ("assistant", "ONE"), ("user", "two"), ("assistant", "TWO"), ("user", "three")]


def test_retrieve_delete_and_input_items() -> None:
    svc, _, _ = service()
    _, wire = prepare(svc, input=[{"role": "user", "content": str(i)} for i in range(5)])
    sent = collect(wire, TEXT)
    got = asyncio.run(svc.retrieve(ALICE, wire.id))
    assert got == sent and Response.model_validate(got).output_text == "Hello"
    ids = [str(item["id"]) for item in wire.input_items]
    page = asyncio.run(svc.input_items(ALICE, wire.id, limit=2))
    assert [i["id"] for i in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    assert (page["object"], page["first_id"], page["last_id"]) == ("list", ids[4], ids[3])
    page = asyncio.run(svc.input_items(ALICE, wire.id, order="asc", after=ids[1], before=ids[4]))
    assert [i["id"] for i in page["data"]] == ids[2:4] and page["has_more"] is False
    empty = asyncio.run(svc.input_items(ALICE, wire.id, after=ids[0]))
    assert empty == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    with pytest.raises(GatewayError) as caught:
        asyncio.run(svc.input_items(ALICE, wire.id, after="nope"))
    assert caught.value.param == "after"
    with pytest.raises(GatewayError) as caught:
        asyncio.run(svc.input_items(ALICE, wire.id, limit=0))
    assert caught.value.param == "limit"
    assert asyncio.run(svc.delete(ALICE, wire.id)) == {"id": wire.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(GatewayError):
        asyncio.run(svc.retrieve(ALICE, wire.id))


# -- the response object and the stream ------------------------------------------------------------------------


def test_collected_object_parses_as_the_sdks_response() -> None:
    svc, _, _ = service()
    _, wire = prepare(svc, instructions="I", max_output_tokens=50, temperature=0.2, metadata={"k": "v"},
                      tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}}], user="u")
    sent = collect(wire, TEXT)
    response = Response.model_validate(sent)
    assert response.id == wire.id and response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.model == "grok-3" and response.output_text == "Hello"
    assert response.output[0].type == "message" and response.output[0].id.startswith("msg_")
    assert response.usage is not None and (response.usage.input_tokens, response.usage.output_tokens,
                                           response.usage.total_tokens) == (7, 3, 10)
    assert response.usage.input_tokens_details.cached_tokens == 2
    assert response.usage.output_tokens_details.reasoning_tokens == 1
    assert (response.instructions, response.max_output_tokens, response.temperature, response.user) == (
        "I", 50, 0.2, "u")
    assert response.metadata == {"k": "v"} and sent["store"] is True and response.tools[0].type == "function"
    assert isinstance(response.created_at, float | int) and response.created_at > 1_600_000_000


def test_stream_is_read_by_the_sdk() -> None:
    svc, _, _ = service()
    _, wire = prepare(svc, stream=True)
    payloads = stream(wire, TEXT)
    events, state = sdk_read(payloads)
    assert [p["type"] for p in payloads] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e.snapshot for e in events if e.type == "response.output_text.delta"] == ["Hel", "Hello"]
    final = state._completed_response
    assert final is not None and final.output_text == "Hello" and final.id == wire.id
    assert final.usage is not None and final.usage.total_tokens == 10
    assert all(Framing.frame(p).startswith(b"event: " + p["type"].encode()) for p in payloads)


def test_function_calls_streamed_as_fragments() -> None:
    svc, _, _ = service()
    _, wire = prepare(svc, stream=True, tools=[{"type": "function", "name": "a"}, {"type": "function", "name": "b"}])
    events: list[Event] = [
        Delta(0, content="Let me check."),
        Delta(0, tool_calls=[{"index": 0, "id": "call_A", "type": "function",
                              "function": {"name": "a", "arguments": ""}}]),
        Delta(0, tool_calls=[{"index": 0, "function": {"arguments": "{\"x\":"}}]),
        Delta(0, tool_calls=[{"index": 1, "id": "call_B", "function": {"name": "b", "arguments": "{}"}}]),
        Delta(0, tool_calls=[{"index": 0, "function": {"arguments": "1}"}}]),  # interleaved with call B
        Finish(0, "tool_calls"), UsageReport(Usage(prompt_tokens=1, completion_tokens=2)),
    ]
    payloads = stream(wire, events)
    sdk_events, state = sdk_read(payloads)
    final = state._completed_response
    assert final is not None and final.status == "completed"
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments, c.status) for c in calls] == [
        ("call_A", "a", "{\"x\":1}", "completed"), ("call_B", "b", "{}", "completed")]
    assert all(c.id and c.id.startswith("fc_") for c in calls)
    done = [p for p in payloads if p["type"] == "response.function_call_arguments.done"]
    assert [(p["arguments"], p["name"]) for p in done] == [("{\"x\":1}", "a"), ("{}", "b")]
    deltas = [p["delta"] for p in payloads if p["type"] == "response.function_call_arguments.delta"]
    assert deltas == ["{\"x\":", "{}", "1}"]
    assert [e.snapshot for e in sdk_events if e.type == "response.function_call_arguments.delta"][-1] == "{\"x\":1}"
    # The collected object holds the same items.
    _, wire = prepare(svc)
    collected = Response.model_validate(collect(wire, events))
    assert [(o.type, getattr(o, "arguments", None)) for o in collected.output] == [
        ("message", None), ("function_call", "{\"x\":1}"), ("function_call", "{}")]


def test_a_call_without_an_id_gets_one() -> None:
    svc, _, _ = service()
    _, wire = prepare(svc)
    result = collect(wire, [Delta(0, tool_calls=[{"index": 0, "function": {"name": "f", "arguments": "{}"}}])])
    assert str(result["output"][0]["call_id"]).startswith("call_")


def test_incomplete_on_length_and_content_filter() -> None:
    svc, _, _ = service()
    for reason, why in (("length", "max_output_tokens"), ("content_filter", "content_filter")):
        _, wire = prepare(svc, stream=True)
        payloads = stream(wire, [Delta(0, content="cut"), Finish(0, reason)])
        _, state = sdk_read(payloads)
        last = payloads[-1]
        assert last["type"] == "response.incomplete" and state._completed_response is None
        response = Response.model_validate(last["response"])
        assert response.status == "incomplete" and response.incomplete_details is not None
        assert response.incomplete_details.reason == why
        assert response.output[0].type == "message" and response.output[0].status == "incomplete"
        _, wire = prepare(svc)
        assert collect(wire, [Delta(0, content="cut"), Finish(0, reason)])["status"] == "incomplete"


def test_failed_stream_sends_error_then_response_failed() -> None:
    svc, store, _ = service()
    _, wire = prepare(svc, stream=True)
    renderer = wire.renderer(ResponsesChatRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "x"}]}), "fp")
    payloads = [*renderer.opening(), *renderer.on_event(Delta(0, content="part"))]
    payloads += renderer.failed(GatewayError(504, "timeout", "The upstream went silent."), "trace-1")
    events, _ = sdk_read(payloads)
    error, failed = payloads[-2], payloads[-1]
    assert error["type"] == "error" and (error["code"], error["trace_id"]) == ("timeout", "trace-1")
    assert "error" not in error  # openai-python raises on a top-level `error` key before reading the event
    assert failed["type"] == "response.failed"
    response = Response.model_validate(failed["response"])
    assert response.status == "failed" and response.error is not None and response.error.code == "server_error"
    assert response.error.message == "The upstream went silent."
    assert response.output[0].type == "message" and response.output[0].status == "incomplete"
    assert events[-1].type == "response.failed" and not store.kept  # a failed response is never stored
    assert renderer.failed(GatewayError(429, "too_many_requests", "slow"), "t")[-1]["response"]["error"][
        "code"] == "rate_limit_exceeded"


def test_reasoning_deltas_then_the_backends_item_make_one_item() -> None:
    svc, _, _ = service()
    _, wire = prepare(svc, stream=True)
    xai_item: JSONObject = {"type": "reasoning", "id": "rs_xai", "status": "completed", "encrypted_content": "ENC",
                            "summary": [{"type": "summary_text", "text": "thinking"}]}
    search: JSONObject = {"type": "web_search_call", "id": "ws_1", "status": "completed",
                          "action": {"type": "search", "query": "q"}}
    events: list[Event] = [
        Delta(0, reasoning_content="think"), Delta(0, reasoning_content="ing"), Item(0, xai_item),
        Item(0, search), Delta(0, content="Answer"),
        Extra({"annotations": [{"type": "url_citation", "url": "https://x.ai", "title": "x", "start_index": 0,
                                "end_index": 6}], "citations": ["https://x.ai"]}),
        Item(1, {"type": "web_search_call", "id": "other-choice"}), Finish(0, "stop")]
    payloads = stream(wire, events)
    _, state = sdk_read(payloads)
    final = state._completed_response
    assert final is not None
    assert [o.type for o in final.output] == ["reasoning", "web_search_call", "message"]
    reasoning = final.output[0]
    assert reasoning.type == "reasoning" and reasoning.encrypted_content == "ENC" and reasoning.id.startswith("rs_")
    assert reasoning.id != "rs_xai"  # the id announced in output_item.added stays
    summary_deltas = [p["delta"] for p in payloads if p["type"] == "response.reasoning_summary_text.delta"]
    assert summary_deltas == ["think", "ing"]
    message = final.output[2]
    assert message.type == "message" and message.content[0].type == "output_text"
    assert message.content[0].annotations[0].type == "url_citation"
    assert payloads[-1]["response"]["citations"] == ["https://x.ai"]
    # Reasoning deltas alone make a summary item.
    _, wire = prepare(svc)
    output = collect(wire, [Delta(0, reasoning_content="why"), Delta(0, content="so")])["output"]
    assert output[0]["summary"] == [{"type": "summary_text", "text": "why"}] and output[1]["type"] == "message"


def test_no_output_is_an_empty_message() -> None:
    svc, _, _ = service()
    _, wire = prepare(svc, stream=True)
    payloads = stream(wire, [Finish(0, "stop")])
    _, state = sdk_read(payloads)
    assert state._completed_response is not None and state._completed_response.output_text == ""
    assert "response.output_text.delta" not in [p["type"] for p in payloads]


# -- commit: storing -------------------------------------------------------------------------------------------


def test_commit_stores_input_items_and_the_response() -> None:
    svc, store, metrics = service()
    _, wire = prepare(svc, input=[{"role": "user", "content": "q"}])
    result = collect(wire, TEXT)
    stored = store.kept[wire.id]
    assert stored.owner == "account:1" and stored.response is result and stored.previous_id is None
    assert stored.input_items == wire.input_items and str(stored.input_items[0]["id"]).startswith("msg_")
    assert stored.expires_at - stored.created_at >= 86_400_000 - 5_000
    assert counter(metrics, "grokgate_responses_stored_total") == 1
    assert counter(metrics, "grokgate_responses_stored_bytes_total") > 100
    # A stream stores before its final event, which carries the stored object.
    _, wire = prepare(svc, stream=True, previous_response_id=wire.id)
    payloads = stream(wire, TEXT)
    assert store.kept[wire.id].response is payloads[-1]["response"]
    assert store.kept[wire.id].previous_id == stored.id
    assert Principal(key_id="k").token_id is None and prepare(svc, Principal(key_id="k"))[1].owner == "key:k"


def test_store_false_keeps_nothing() -> None:
    svc, store, metrics = service()
    _, wire = prepare(svc, store=False)
    assert collect(wire, TEXT)["store"] is False and not store.kept
    _, wire = prepare(svc, store=False, stream=True)
    assert stream(wire, TEXT)[-1]["response"]["store"] is False and not store.kept
    assert counter(metrics, "grokgate_responses_stored_total") == 0


def test_too_large_is_answered_but_not_stored() -> None:
    svc, store, metrics = service(max_stored_bytes=2048)
    _, wire = prepare(svc, stream=True)
    payloads = stream(wire, [Delta(0, content="x" * 4096), Finish(0, "stop")])
    assert payloads[0]["response"]["store"] is True  # announced before the answer existed
    assert payloads[-1]["type"] == "response.completed" and payloads[-1]["response"]["store"] is False
    assert not store.kept
    assert counter(metrics, "grokgate_responses_not_stored_total", reason="too_large") == 1
    _, wire = prepare(svc)
    assert collect(wire, [Delta(0, content="x" * 4096)])["store"] is False


def test_a_store_failure_is_not_the_clients() -> None:
    svc, _, metrics = service(FakeStore(fail=True))
    _, wire = prepare(svc)
    result = collect(wire, TEXT)  # commit did not raise
    assert result["store"] is False and result["status"] == "completed"
    assert counter(metrics, "grokgate_responses_not_stored_total", reason="error") == 1


def test_wire_format_names() -> None:
    svc, _, _ = service()
    _, wire = prepare(svc)
    assert (wire.label, wire.endpoint) == ("response", "responses") and wire.framing.done == b""
