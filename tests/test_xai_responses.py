"""XAIBackend over xAI's own /v1/responses (providers/xai.py), against the fake xAI server: the events a
Responses request becomes, its usage, retries before the first byte, and the refusal of server-side tools by
backends that cannot run them (openai_compat, the local engine, and a routed model choosing among them)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grokgate.core.errors import GatewayError
from grokgate.core.events import Delta, Event, Extra, Finish, Item, UsageReport
from grokgate.core.usage import normalise_responses_usage
from grokgate.providers.base import Call
from grokgate.providers.local import LocalEngine
from grokgate.providers.openai_compat import BackendConfig, OpenAICompatBackend
from grokgate.providers.router import Candidate, RoutedModel
from grokgate.providers.xai import XAIBackend, responses_payload
from grokgate.schemas.chat import ChatCompletionRequest
from tests.fakes.fake_xai import CITATIONS, DEFAULT_CONTENT, REASONING_TEXT, TOOL_CALL_ID, FakeXAI
from tests.fakes.fake_xai_responses import ENCRYPTED

WEATHER = {"type": "function", "name": "get_weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


class ResponsesRequest(ChatCompletionRequest):
    """A Responses request as the serving layer hands it to a backend: chat fields plus the native body."""

    native: dict[str, Any] | None = None

    @property
    def responses_body(self) -> dict[str, Any] | None:
        return self.native

    @property
    def server_tools(self) -> list[str]:
        tools = (self.native or {}).get("tools") or []
        return [t["type"] for t in tools if t.get("type") != "function"]


def make(body: dict[str, Any], stream: bool = False, model: str = "grok-4", max_tokens: int | None = None
         ) -> ResponsesRequest:
    return ResponsesRequest(model=model, messages=[{"role": "user", "content": "hi"}], stream=stream,
                            max_tokens=max_tokens, native={"model": model, **body})


@pytest.fixture(scope="module")
def server() -> Iterator[FakeXAI]:
    with FakeXAI(api_keys=["key-a", "key-b"], chunks=3).start() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeXAI) -> FakeXAI:
    server.reset()
    return server


def backend(fake: FakeXAI, **extra: Any) -> XAIBackend:
    return XAIBackend(BackendConfig(name="xai", base_url=fake.url, api_keys=["key-a", "key-b"], cooldown=30,
                                    read_timeout=5, **extra))


def run(provider: Any, request: ChatCompletionRequest, model: str = "grok-4-0709") -> list[Event]:
    async def go() -> list[Event]:
        try:
            generation = provider.generate(Call(request, "key:test"), model)
            try:
                return [event async for event in generation]
            finally:
                await generation.aclose()
        finally:
            await provider.close()

    return asyncio.run(go())


def text(events: list[Event]) -> str:
    return "".join(e.content or "" for e in events if isinstance(e, Delta))


def usage(events: list[Event]) -> UsageReport:
    assert isinstance(events[-1], UsageReport), events[-1]
    return events[-1]


@pytest.mark.parametrize("stream", [False, True])
def test_text_goes_to_responses_with_store_false_and_the_held_cap(fake: FakeXAI, stream: bool) -> None:
    request = make({"input": "hello there", "previous_response_id": "resp_x", "store": True}, stream=stream,
                   max_tokens=50)
    events = run(backend(fake), request)
    assert text(events) == DEFAULT_CONTENT
    assert [e.reason for e in events if isinstance(e, Finish)] == ["stop"]
    report = usage(events).usage
    assert (report.prompt_tokens, report.completion_tokens, report.reasoning_tokens) == (12, 4 + 7, 7)
    assert not report.estimated and report.server_tool_calls == 0
    sent = fake.responses_requests[-1]
    assert sent["path"] == "/v1/responses" and not fake.chat_requests
    body = sent["body"]
    assert body["model"] == "grok-4-0709" and body["stream"] is stream and body["store"] is False
    assert "previous_response_id" not in body and body["max_output_tokens"] == 50 and "max_tool_calls" not in body
    assert not fake.stored  # store: false reached xAI
    assert request.native is not None and request.native["store"] is True  # the request's body is left alone
    if stream:
        assert sum(1 for e in events if isinstance(e, Delta) and e.content) == 3  # deltas pass through as they come


def test_chat_requests_still_go_to_chat_completions(fake: FakeXAI) -> None:
    request = ChatCompletionRequest(model="grok-3", messages=[{"role": "user", "content": "hi"}])
    assert text(run(backend(fake), request, "grok-3")) == DEFAULT_CONTENT
    assert len(fake.chat_requests) == 1 and not fake.responses_requests


@pytest.mark.parametrize("stream", [False, True])
def test_function_call_becomes_tool_call_fragments(fake: FakeXAI, stream: bool) -> None:
    events = run(backend(fake), make({"input": "weather?", "tools": [WEATHER]}, stream=stream))
    calls = [c for e in events if isinstance(e, Delta) for c in e.tool_calls or ()]
    assert calls == [{"index": 0, "id": TOOL_CALL_ID, "type": "function",
                      "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    assert [e.reason for e in events if isinstance(e, Finish)] == ["tool_calls"]
    # After the tool's output: text.
    follow = [{"type": "function_call", "call_id": TOOL_CALL_ID, "name": "get_weather", "arguments": "{}"},
              {"type": "function_call_output", "call_id": TOOL_CALL_ID, "output": "sunny"}]
    events = run(backend(fake), make({"input": follow, "tools": [WEATHER]}, stream=stream))
    assert text(events) == DEFAULT_CONTENT and [e.reason for e in events if isinstance(e, Finish)] == ["stop"]


@pytest.mark.parametrize("stream", [False, True])
def test_server_side_tools_pass_through_as_items_and_are_counted(fake: FakeXAI, stream: bool) -> None:
    tools = [{"type": "web_search"}, {"type": "x_search"}]
    events = run(backend(fake, max_server_tool_calls=5), make({"input": "news", "tools": tools}, stream=stream))
    items = [e.item for e in events if isinstance(e, Item)]
    assert [i["type"] for i in items] == ["web_search_call", "custom_tool_call"]
    assert items[0]["action"] == {"type": "search", "query": "news", "sources": []}
    extras = [e.fields for e in events if isinstance(e, Extra)]
    assert extras and extras[0]["citations"] == CITATIONS
    assert [a["url"] for a in extras[0]["annotations"]] == CITATIONS  # type: ignore[index,union-attr]
    assert text(events) == DEFAULT_CONTENT
    assert usage(events).usage.server_tool_calls == 2
    assert fake.responses_requests[-1]["body"]["max_tool_calls"] == 5  # what the reservation paid for


def test_max_tool_calls_is_bounded_by_the_reservation(fake: FakeXAI) -> None:
    tools = [{"type": "web_search"}, {"type": "x_search"}]
    events = run(backend(fake, max_server_tool_calls=1), make({"input": "news", "tools": tools, "max_tool_calls": 9}))
    assert fake.responses_requests[-1]["body"]["max_tool_calls"] == 1
    assert usage(events).usage.server_tool_calls == 1
    run(backend(fake, max_server_tool_calls=4), make({"input": "news", "tools": tools, "max_tool_calls": 2}))
    assert fake.responses_requests[-1]["body"]["max_tool_calls"] == 2  # a smaller bound of the client's is kept


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_item_passes_through_with_its_encrypted_content(fake: FakeXAI, stream: bool) -> None:
    body = {"input": "think", "include": ["reasoning.encrypted_content"], "reasoning": {"effort": "high"}}
    events = run(backend(fake), make(body, stream=stream, model="grok-3-mini"), "grok-3-mini")
    items = [e.item for e in events if isinstance(e, Item)]
    assert len(items) == 1 and items[0]["type"] == "reasoning" and items[0]["encrypted_content"] == ENCRYPTED
    assert "".join(e.reasoning_content or "" for e in events if isinstance(e, Delta)) == REASONING_TEXT
    assert fake.responses_requests[-1]["body"]["reasoning"] == {"effort": "high"}
    # grok-4 does not take reasoning.effort: it is dropped, not refused.
    run(backend(fake), make({"input": "x", "reasoning": {"effort": "low"}}))
    assert fake.responses_requests[-1]["body"]["reasoning"] == {}


@pytest.mark.parametrize("stream", [False, True])
def test_max_output_tokens_reached_is_length(fake: FakeXAI, stream: bool) -> None:
    events = run(backend(fake), make({"input": "hi"}, stream=stream, model="grok-3", max_tokens=2), "grok-3")
    assert text(events) == "Hello from"
    assert [e.reason for e in events if isinstance(e, Finish)] == ["length"]
    assert usage(events).usage.completion_tokens == 2


@pytest.mark.parametrize("fault", ["429", "500"])
def test_refusals_are_retried_on_the_other_key_before_the_first_byte(fake: FakeXAI, fault: str) -> None:
    fake.fail_next(fault)
    events = run(backend(fake), make({"input": "hi"}, stream=True))
    assert text(events) == DEFAULT_CONTENT
    keys = [r["headers"]["authorization"] for r in fake.responses_requests]
    assert len(keys) == 2 and keys[0] != keys[1]


def test_failed_stream_before_output_is_retried_and_after_both_keys_fails(fake: FakeXAI) -> None:
    fake.fail_next("failed")
    assert text(run(backend(fake), make({"input": "hi"}, stream=True))) == DEFAULT_CONTENT
    fake.fail_next("failed", "failed")
    with pytest.raises(GatewayError) as caught:
        run(backend(fake), make({"input": "hi"}, stream=True))
    assert caught.value.status == 502 and "fake xAI fault failed" in caught.value.message


def test_usage_normalisation_counts_each_token_class_once() -> None:
    # xAI's recorded x_search reply: output includes reasoning (total = input + output); the billable tool count
    # is server_side_tool_usage_details, num_server_side_tools_used counts attempts.
    usage_ = normalise_responses_usage({
        "input_tokens": 27236, "input_tokens_details": {"cached_tokens": 4585}, "output_tokens": 3077,
        "output_tokens_details": {"reasoning_tokens": 1091}, "total_tokens": 30313, "num_server_side_tools_used": 6,
        "server_side_tool_usage_details": {"web_search_calls": 0, "x_search_calls": 1}})
    assert (usage_.prompt_tokens, usage_.cached_tokens, usage_.completion_tokens, usage_.reasoning_tokens,
            usage_.server_tool_calls) == (27236, 4585, 3077, 1091, 1)
    outside = normalise_responses_usage({"input_tokens": 10, "output_tokens": 5, "total_tokens": 22,
                                         "output_tokens_details": {"reasoning_tokens": 7},
                                         "num_server_side_tools_used": 3})
    assert (outside.completion_tokens, outside.reasoning_tokens, outside.server_tool_calls) == (12, 7, 3)


def test_payload_leaves_the_client_bound_when_no_server_tools() -> None:
    request = make({"input": "x", "max_tool_calls": 3, "tools": [WEATHER]})
    assert responses_payload(Call(request, "key:test"), request.responses_body or {}, "grok-4-0709", 10)[
        "max_tool_calls"] == 3


def test_server_tools_are_refused_by_openai_compatible_and_local_backends(fake: FakeXAI, tmp_path: Path) -> None:
    request = make({"input": "news", "tools": [{"type": "web_search"}]})
    openai_backend = OpenAICompatBackend(BackendConfig(name="vllm", base_url=fake.url))
    local = LocalEngine(model_path=None, cache_dir=tmp_path)
    for provider in (openai_backend, local):
        with pytest.raises(GatewayError) as caught:
            provider.check(request)
        assert caught.value.status == 400 and caught.value.param == "tools"
        assert "web_search" in caught.value.message and "xAI" in caught.value.message
    backend(fake).check(request)  # xAI takes it
    plain = make({"input": "hi", "tools": [WEATHER]})
    openai_backend.check(plain)  # function tools are not server-side tools


def test_routed_model_picks_the_xai_route_for_server_tools(fake: FakeXAI) -> None:
    openai_backend = OpenAICompatBackend(BackendConfig(name="vllm", base_url=fake.url, api_keys=["key-a"]))
    xai = backend(fake)
    routed = RoutedModel("grok-4", [Candidate(openai_backend, "grok-4-0709", priority=0),
                                    Candidate(xai, "grok-4-0709", priority=1)])
    request = make({"input": "news", "tools": [{"type": "web_search"}]}, stream=True)
    routed.check(request)
    assert [c.backend.name for c in routed.usable(request)[0]] == ["xai"]

    async def go() -> list[Event]:
        generation = routed.generate(Call(request, "key:test"), "grok-4")
        try:
            return [event async for event in generation]
        finally:
            await generation.aclose()
            await xai.close()
            await openai_backend.close()

    events = asyncio.run(go())
    assert [e.item["type"] for e in events if isinstance(e, Item)] == ["web_search_call"]
    assert not fake.chat_requests and len(fake.responses_requests) == 1
    only_openai = RoutedModel("grok-4", [Candidate(openai_backend, "grok-4-0709")])
    with pytest.raises(GatewayError) as caught:
        only_openai.check(request)
    assert caught.value.param == "tools"


def test_openai_style_argument_fragments_and_error_events_are_read() -> None:
    from grokgate.providers.xai import _Reply

    reply = _Reply()
    added = {"type": "response.output_item.added",
             "item": {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": ""}}
    events = reply.stream_event(added)
    events += reply.stream_event({"type": "response.function_call_arguments.delta", "item_id": "fc_1", "delta": "{}"})
    events += reply.stream_event({"type": "response.output_item.done", "item": {**added["item"], "arguments": "{}"}})
    assert [c for e in events if isinstance(e, Delta) for c in e.tool_calls or ()] == [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"index": 0, "function": {"arguments": "{}"}}]  # the done item repeats nothing already sent
    with pytest.raises(GatewayError) as caught:
        reply.stream_event({"type": "error", "code": "overloaded", "message": "busy now", "sequence_number": 9})
    assert caught.value.status == 502 and "busy now" in caught.value.message
