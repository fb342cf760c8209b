"""xAI's Chat service as xai-sdk calls it (sync `Client` and async `AsyncClient`, plaintext on `localhost:<port>`)
on the in-process app (accounts on, SQLite): grok-3 and grok-3-mini routed to the fake xAI (tests/fakes/fake_xai.py
speaks xAI's REST chat), grok-4 to a scripted provider that streams tool calls in OpenAI's fragments. The same
lifecycle as HTTP: the ledger row, the refusals, the statuses the SDK surfaces."""

from __future__ import annotations

import asyncio
import datetime
import json
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import xai_sdk
from pydantic import BaseModel
from xai_sdk.chat import required_tool, system, tool, tool_result, user
from xai_sdk.proto.v6 import chat_pb2, chat_pb2_grpc, deferred_pb2

from grokgate.core.budgets import Hold, Reserved
from grokgate.core.events import Delta, Event, Finish, Usage, UsageReport
from grokgate.providers import base
from grokgate.providers.base import ModelTable, Route
from grokgate.providers.router import Candidate, RoutedModel
from grokgate.schemas.chat import ChatCompletionRequest
from tests.conftest import TOKEN, create_key, free_port
from tests.fakes.fake_xai import REASONING_TEXT, TOOL_ARGUMENTS, FakeXAI, words
from tests.inproc import AppServer, ScriptedProvider, app_server

XAI_KEY = "xai-test-key"
FAKE_TEXT = "Hello from fake xAI"
WEATHER = tool("get_weather", "The weather in a city.", {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})


async def fragments(request: ChatCompletionRequest, model: str) -> AsyncGenerator[Event]:
    """Two tool calls, each in OpenAI's streaming fragments (id and name first, then pieces of the arguments),
    interleaved; then a third call cut short (its arguments are not JSON), as an output cap cuts one."""
    yield Delta(0, tool_calls=[{"index": 0, "id": "call_a", "type": "function",
                                "function": {"name": "get_weather", "arguments": ""}}])
    yield Delta(0, tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}])
    yield Delta(0, tool_calls=[{"index": 1, "id": "call_b", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city"'}}])
    yield Delta(0, tool_calls=[{"index": 0, "function": {"arguments": '"Paris"}'}}])
    yield Delta(0, tool_calls=[{"index": 1, "function": {"arguments": ': "Oslo"}'}}])
    yield Delta(0, tool_calls=[{"index": 2, "id": "call_c", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"ci'}}])
    yield Finish(0, "tool_calls")
    yield UsageReport(Usage(prompt_tokens=12, completion_tokens=30))


@dataclass
class Gateway:
    http: AppServer
    port: int
    fake: FakeXAI
    scripted: ScriptedProvider

    @property
    def host(self) -> str:
        return f"localhost:{self.port}"

    def client(self, key: str = TOKEN, timeout: float = 30, **kwargs: Any) -> xai_sdk.Client:
        return xai_sdk.Client(api_key=key, api_host=self.host, timeout=timeout, **kwargs)

    def ledger(self, key_id: int) -> list[dict[str, Any]]:
        with self.http.client() as c:
            rows = c.get(f"/admin/ledger?token={key_id}", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        return [r for r in rows["data"] if r["kind"] == "usage"]

    def balance(self, key: str) -> str:
        with self.http.client() as c:
            body = c.get("/v1/balance", headers={"Authorization": f"Bearer {key}"}).json()
        return str(body["balance"])


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with FakeXAI().start() as fake:
        scripted = ScriptedProvider(script=fragments)
        xai = base.create("xai", name="xai", base_url=fake.url, api_keys=[XAI_KEY])
        # A backend of its own for the failure tests: its breaker opening leaves the others serving.
        failing = base.create("xai", name="xai-failing", base_url=fake.url, api_keys=[XAI_KEY])
        routes = [Route("grok-4-1-fast", RoutedModel("grok-4-1-fast", [Candidate(failing, "grok-3")]), "grok-3"),
                  Route("grok-3", RoutedModel("grok-3", [Candidate(xai, "grok-3")]), "grok-3"),
                  Route("grok-3-mini", RoutedModel("grok-3-mini", [Candidate(xai, "grok-3-mini")]), "grok-3-mini"),
                  Route("grok-4", scripted, "grok-4")]
        port = free_port()
        with app_server(tmp_path_factory.mktemp("xai-chat"), ModelTable(routes, backends=[xai, failing, scripted]),
                        grpc_port=port) as http:
            yield Gateway(http, port, fake, scripted)


def key(gw: Gateway, name: str, credits: str | None = "100", **fields: Any) -> tuple[str, dict[str, Any]]:
    return create_key(gw.http, name, credits, **fields)  # type: ignore[arg-type]  (an AppServer serves the same)


def streamed(chat: Any) -> tuple[Any, list[Any]]:
    """A stream's last (whole) response and its chunks."""
    response, chunks = None, []
    for response, chunk in chat.stream():  # noqa: B007  (the response grows with each chunk: the last is whole)
        chunks.append(chunk)
    return response, chunks


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


# -- sample, stream, n ----------------------------------------------------------------------------------------------


def test_sample_answers_through_the_gateway_and_is_billed_once_as_grpc(gw: Gateway) -> None:
    secret, record = key(gw, "sampler")
    chat = gw.client(secret).chat.create(model="grok-3", messages=[system("Be brief."), user("Say hello")])
    response = chat.sample()
    assert response.content == FAKE_TEXT
    assert response.role == "ROLE_ASSISTANT" and response.finish_reason == "REASON_STOP"
    sent = gw.fake.chat_requests[-1]["body"]
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    prompt = 10 + words("Be brief.") + words("Say hello")
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt, words(FAKE_TEXT))
    assert response.usage.total_tokens == prompt + words(FAKE_TEXT)
    assert response.id.startswith("chatcmpl-")
    [row] = gw.ledger(record["id"])
    assert (row["endpoint"], row["model"], row["status"]) == ("grpc", "grok-3", "ok")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, words(FAKE_TEXT))
    assert row["cost"] > 0


def test_stream_yields_the_text_in_chunks_and_usage_at_the_end(gw: Gateway) -> None:
    secret, record = key(gw, "streamer")
    chat = gw.client(secret).chat.create(model="grok-3", messages=[user("Say hello")])
    gw.fake.header_defaults["x-fake-chunk-delay-ms"] = "20"  # what has come meanwhile goes out in one message
    try:
        response, chunks = streamed(chat)
    finally:
        gw.fake.header_defaults.pop("x-fake-chunk-delay-ms")
    pieces = [chunk.content for chunk in chunks]
    assert len([p for p in pieces if p]) > 1  # streamed, not one piece
    assert "".join(pieces) == FAKE_TEXT == response.content
    assert response.usage.completion_tokens == words(FAKE_TEXT)
    assert response.finish_reason == "REASON_STOP"
    [row] = gw.ledger(record["id"])
    assert (row["endpoint"], row["status"], row["completion_tokens"]) == ("grpc", "ok", words(FAKE_TEXT))


def test_sample_batch_and_stream_batch_answer_n_choices(gw: Gateway) -> None:
    chat = gw.client().chat.create(model="grok-3", messages=[user("Say hello")])
    batch = chat.sample_batch(3)
    assert [r.content for r in batch] == [FAKE_TEXT, f"{FAKE_TEXT} #1", f"{FAKE_TEXT} #2"]
    assert gw.fake.chat_requests[-1]["body"]["n"] == 3
    batch = None
    for batch, _chunks in chat.stream_batch(2):  # noqa: B007  (the last is whole)
        pass
    assert batch is not None and [r.content for r in batch] == [FAKE_TEXT, f"{FAKE_TEXT} #1"]


def test_reasoning_passes_through_in_both_shapes(gw: Gateway) -> None:
    chat = gw.client().chat.create(model="grok-3-mini", messages=[user("Think")])
    response = chat.sample()
    assert response.reasoning_content == REASONING_TEXT and response.content == FAKE_TEXT
    assert response.usage.reasoning_tokens == 7
    response, _ = streamed(chat)
    assert response.reasoning_content == REASONING_TEXT and response.content == FAKE_TEXT


def test_sampling_settings_reach_the_backend_as_chat_fields(gw: Gateway) -> None:
    chat = gw.client().chat.create(model="grok-3", messages=[user("hi")], max_tokens=50, temperature=0.5, top_p=0.9,
                                   seed=7, stop=["END"], frequency_penalty=0.5, presence_penalty=-0.5)
    chat.sample()
    sent = gw.fake.chat_requests[-1]["body"]
    assert (sent["temperature"], sent["top_p"], sent["seed"], sent["stop"]) == (0.5, pytest.approx(0.9), 7, ["END"])
    assert sent["frequency_penalty"] == 0.5  # presence_penalty: grok-3 refuses it, providers/xai.py drops it
    assert sent.get("max_completion_tokens", sent.get("max_tokens")) == 50


def test_the_async_client_samples_and_streams(gw: Gateway) -> None:
    async def main() -> tuple[str, str]:
        client = xai_sdk.AsyncClient(api_key=TOKEN, api_host=gw.host, timeout=30)
        chat = client.chat.create(model="grok-3", messages=[user("Say hello")])
        sampled = await chat.sample()
        text = ""
        async for _response, chunk in chat.stream():
            text += chunk.content
        return sampled.content, text

    assert asyncio.run(main()) == (FAKE_TEXT, FAKE_TEXT)


# -- tools and structured output ---------------------------------------------------------------------------------


def test_a_tool_call_and_its_result_make_a_round_trip(gw: Gateway) -> None:
    chat = gw.client().chat.create(model="grok-3", messages=[user("Weather in Paris?")], tools=[WEATHER])
    response = chat.sample()
    [call] = response.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == json.loads(TOOL_ARGUMENTS)
    assert response.finish_reason == "REASON_TOOL_CALLS"
    sent = gw.fake.chat_requests[-1]["body"]
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["tools"][0]["function"]["parameters"]["required"] == ["city"]
    chat.append(response)
    chat.append(tool_result('{"sky": "clear"}', tool_call_id=call.id))
    answer = chat.sample()
    assert answer.content and not answer.tool_calls
    history = gw.fake.chat_requests[-1]["body"]["messages"]
    assert history[1]["role"] == "assistant" and history[1]["tool_calls"][0]["id"] == call.id
    assert history[2] == {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'}


def test_a_streamed_tool_call_arrives_whole(gw: Gateway) -> None:
    chat = gw.client().chat.create(model="grok-3", messages=[user("Weather?")], tools=[WEATHER],
                                   tool_choice=required_tool("get_weather"))
    response, chunks = streamed(chat)
    calls = [call for chunk in chunks for call in chunk.tool_calls]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == json.loads(TOOL_ARGUMENTS)
    assert len(response.tool_calls) == 1
    assert gw.fake.chat_requests[-1]["body"]["tool_choice"] == {"type": "function",
                                                                 "function": {"name": "get_weather"}}


def test_fragments_are_joined_into_whole_calls_and_a_cut_call_is_left_out(gw: Gateway) -> None:
    """OpenAI-shaped fragments from a backend become whole calls for the SDK (which appends each chunk's calls as
    new calls and parses their arguments); a call whose arguments are not JSON ends the choice as `length`."""
    chat = gw.client().chat.create(model="grok-4", messages=[user("Weather?")], tools=[WEATHER])
    response, _ = streamed(chat)
    assert [(c.id, json.loads(c.function.arguments)) for c in response.tool_calls] == [
        ("call_a", {"city": "Paris"}), ("call_b", {"city": "Oslo"})]
    assert response.finish_reason == "REASON_MAX_LEN"
    sampled = chat.sample()
    assert [c.id for c in sampled.tool_calls] == ["call_a", "call_b"]
    assert sampled.finish_reason == "REASON_MAX_LEN"


def test_parse_sends_the_models_json_schema(gw: Gateway) -> None:
    class City(BaseModel):
        name: str
        population: int

    chat = gw.client().chat.create(model="grok-3", messages=[user("A city?")])
    with pytest.raises(Exception):  # noqa: B017  the fake answers prose, which is not a City
        chat.parse(City)
    form = gw.fake.chat_requests[-1]["body"]["response_format"]
    assert form["type"] == "json_schema"
    assert form["json_schema"]["schema"]["properties"]["population"]["type"] == "integer"


# -- errors ------------------------------------------------------------------------------------------------------


def test_errors_are_the_statuses_the_sdk_surfaces(gw: Gateway) -> None:
    client = gw.client()
    unknown = rpc_error(lambda: client.chat.create(model="grok-9", messages=[user("hi")]).sample())
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and "grok-9" in unknown.details()
    hot = rpc_error(lambda: client.chat.create(model="grok-3", messages=[user("hi")], temperature=5).sample())
    assert hot.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in hot.details()
    many = rpc_error(lambda: client.chat.create(model="grok-3", messages=[user("hi")]).sample_batch(500))
    assert many.code() == grpc.StatusCode.INVALID_ARGUMENT and "'n'" in many.details()
    bad = chat_pb2.GetCompletionsRequest(model="grok-3", messages=[chat_pb2.Message(content=[chat_pb2.Content(
        text="no role")])])
    with grpc.insecure_channel(gw.host) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetCompletion(bad, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages[0].role" in raised.value.details()
    stranger = rpc_error(lambda: gw.client("gg-nobody").chat.create(model="grok-3", messages=[user("hi")]).sample())
    assert stranger.code() == grpc.StatusCode.UNAUTHENTICATED


def test_an_empty_balance_is_permission_denied_with_acedatas_message(gw: Gateway) -> None:
    secret, _ = key(gw, "broke", credits="0")
    error = rpc_error(lambda: gw.client(secret).chat.create(model="grok-3", messages=[user("hi")]).sample())
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "used_up" in error.details()


def test_a_rate_limit_is_resource_exhausted_with_the_retry_delay(gw: Gateway) -> None:
    secret, _ = key(gw, "limited", rpm=1)
    chat = gw.client(secret).chat.create(model="grok-3", messages=[user("hi")])
    chat.sample()
    error = rpc_error(chat.sample)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = dict(error.trailing_metadata() or ()).get("retry-after")
    assert retry is not None and int(retry) >= 1


def test_upstream_trouble_is_unavailable_and_settles_nothing(gw: Gateway) -> None:
    secret, record = key(gw, "unlucky")
    gw.fake.fail_next("500", "500", "500", "500", "500")
    chat = gw.client(secret).chat.create(model="grok-4-1-fast", messages=[user("hi")])
    error = rpc_error(chat.sample)
    gw.fake.reset()
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert all(row["cost"] == 0 for row in gw.ledger(record["id"]))


def test_a_cancelled_stream_is_billed_what_was_generated(gw: Gateway) -> None:
    secret, record = key(gw, "canceller")
    before = gw.balance(secret)
    gw.fake.header_defaults["x-fake-chunk-delay-ms"] = "300"  # 5 chunks: ~1.5 s, the cancel comes after the first
    with grpc.insecure_channel(gw.host) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        request = chat_pb2.GetCompletionsRequest(model="grok-3", messages=[chat_pb2.Message(
            role=chat_pb2.ROLE_USER, content=[chat_pb2.Content(text="hi")])])
        stream = stub.GetCompletionChunk(request, metadata=(("authorization", f"Bearer {secret}"),))
        try:
            first = next(stream)
            assert first.outputs[0].delta.content
            stream.cancel()
        finally:
            gw.fake.header_defaults.pop("x-fake-chunk-delay-ms")
    deadline = time.monotonic() + 10
    while not (rows := gw.ledger(record["id"])) and time.monotonic() < deadline:
        time.sleep(0.05)
    [row] = rows
    assert row["status"] == "client_disconnected"
    assert 0 < row["completion_tokens"] <= words(FAKE_TEXT) and row["cost"] > 0
    assert gw.balance(secret) != before


def test_the_answer_carries_the_request_id_and_the_tickets_metadata(gw: Gateway) -> None:
    secret, _ = key(gw, "headers")
    with grpc.insecure_channel(gw.host) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        request = chat_pb2.GetCompletionsRequest(model="grok-3", messages=[chat_pb2.Message(
            role=chat_pb2.ROLE_USER, content=[chat_pb2.Content(text="hi")])])
        _, call = stub.GetCompletion.with_call(request, metadata=(("authorization", f"Bearer {secret}"),))
    metadata = dict(call.trailing_metadata())
    assert len(metadata["x-request-id"]) == 32


def test_http_and_grpc_are_billed_alike(gw: Gateway) -> None:
    secret_a, a = key(gw, "over-http")
    secret_b, b = key(gw, "over-grpc")
    r = httpx.post(f"{gw.http.url}/v1/chat/completions", headers={"Authorization": f"Bearer {secret_a}"},
                   json={"model": "grok-3", "messages": [{"role": "user", "content": "Say hello"}]}, timeout=30)
    assert r.status_code == 200, r.text
    gw.client(secret_b).chat.create(model="grok-3", messages=[user("Say hello")]).sample()
    [http_row], [grpc_row] = gw.ledger(a["id"]), gw.ledger(b["id"])
    assert (http_row["endpoint"], grpc_row["endpoint"]) == ("chat", "grpc")
    for field in ("prompt_tokens", "completion_tokens", "cost"):
        assert http_row[field] == grpc_row[field], field


# -- stored completions ------------------------------------------------------------------------------------------


def test_a_stored_conversation_continues_over_grpc_then_http_then_grpc(gw: Gateway) -> None:
    secret, _ = key(gw, "storer")
    client = gw.client(secret)
    first = client.chat.create(model="grok-3", messages=[user("My name is Ada.")], store_messages=True).sample()
    assert first.id.startswith("resp_")
    [stored] = client.chat.get_stored_completion(first.id)
    assert (stored.id, stored.content) == (first.id, FAKE_TEXT)
    second = client.chat.create(model="grok-3", messages=[user("What is my name?")], previous_response_id=first.id,
                                store_messages=True).sample()
    assert gw.fake.chat_requests[-1]["body"]["messages"] == [
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": FAKE_TEXT},
        {"role": "user", "content": "What is my name?"}]
    # Over the Responses API: the gRPC conversation is a stored response like any other.
    headers = {"Authorization": f"Bearer {secret}"}
    with gw.http.client() as c:
        got = c.get(f"/v1/responses/{second.id}", headers=headers)
        assert got.status_code == 200, got.text
        assert got.json()["previous_response_id"] == first.id
        r = c.post("/v1/responses", headers=headers, json={"model": "grok-3", "input": "And my age?",
                                                            "previous_response_id": second.id})
        assert r.status_code == 200, r.text
        third = r.json()["id"]
    # ... and back over gRPC, streamed this time.
    chat = client.chat.create(model="grok-3", messages=[user("Thanks")], previous_response_id=third,
                              store_messages=True)
    response, _ = streamed(chat)
    texts = [m.get("content") for m in gw.fake.chat_requests[-1]["body"]["messages"]]
    assert texts[0] == "My name is Ada." and texts[2] == "What is my name?" and texts[-1] == "Thanks"
    assert len(texts) == 7  # three turns of two, and this one
    [kept] = client.chat.get_stored_completion(response.id)
    assert kept.content == response.content == FAKE_TEXT


def test_another_token_cannot_read_continue_or_delete_a_stored_completion(gw: Gateway) -> None:
    owner, _ = key(gw, "owner")
    thief, _ = key(gw, "thief")
    mine = gw.client(owner).chat.create(model="grok-3", messages=[user("secret")], store_messages=True).sample()
    other = gw.client(thief)
    for call in (lambda: other.chat.get_stored_completion(mine.id),
                 lambda: other.chat.delete_stored_completion(mine.id),
                 lambda: other.chat.create(model="grok-3", messages=[user("hi")],
                                           previous_response_id=mine.id).sample()):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    assert gw.client(owner).chat.get_stored_completion(mine.id)[0].content == FAKE_TEXT


def test_a_deleted_completion_is_gone_and_an_unstored_one_was_never_kept(gw: Gateway) -> None:
    client = gw.client()
    kept = client.chat.create(model="grok-3", messages=[user("hi")], store_messages=True).sample()
    assert client.chat.delete_stored_completion(kept.id) == kept.id
    assert rpc_error(lambda: client.chat.get_stored_completion(kept.id)).code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(lambda: client.chat.delete_stored_completion(kept.id)).code() == grpc.StatusCode.NOT_FOUND
    plain = client.chat.create(model="grok-3", messages=[user("hi")]).sample()
    assert rpc_error(lambda: client.chat.get_stored_completion(plain.id)).code() == grpc.StatusCode.NOT_FOUND


def test_a_stored_batch_keeps_every_choice(gw: Gateway) -> None:
    client = gw.client()
    batch = client.chat.create(model="grok-3", messages=[user("hi")], store_messages=True).sample_batch(2)
    assert len({r.id for r in batch}) == 1
    stored = client.chat.get_stored_completion(batch[0].id)
    assert [r.content for r in stored] == [FAKE_TEXT, f"{FAKE_TEXT} #1"]


# -- deferred completions ----------------------------------------------------------------------------------------


def test_defer_polls_until_the_answer_and_bills_it_once(gw: Gateway) -> None:
    secret, record = key(gw, "deferrer")
    chat = gw.client(secret).chat.create(model="grok-3", messages=[user("Say hello")])
    response = chat.defer(interval=datetime.timedelta(milliseconds=50))
    assert response.content == FAKE_TEXT and response.usage.completion_tokens == words(FAKE_TEXT)
    batch = chat.defer_batch(2, interval=datetime.timedelta(milliseconds=50))
    assert [r.content for r in batch] == [FAKE_TEXT, f"{FAKE_TEXT} #1"]
    rows = gw.ledger(record["id"])
    assert len(rows) == 2 and all(r["endpoint"] == "grpc" and r["status"] == "ok" for r in rows)


def test_a_deferred_completion_is_its_tenants_and_readable_over_rest(gw: Gateway) -> None:
    owner, _ = key(gw, "defer-owner")
    thief, _ = key(gw, "defer-thief")
    with grpc.insecure_channel(gw.host) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        request = chat_pb2.GetCompletionsRequest(model="grok-3", messages=[chat_pb2.Message(
            role=chat_pb2.ROLE_USER, content=[chat_pb2.Content(text="hi")])])
        started = stub.StartDeferredCompletion(request, metadata=(("authorization", f"Bearer {owner}"),))
        poll = deferred_pb2.GetDeferredRequest(request_id=started.request_id)
        deadline = time.monotonic() + 10
        while (got := stub.GetDeferredCompletion(poll, metadata=(("authorization", f"Bearer {owner}"),))).status \
                == deferred_pb2.PENDING and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got.status == deferred_pb2.DONE and got.response.outputs[0].message.content == FAKE_TEXT
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetDeferredCompletion(poll, metadata=(("authorization", f"Bearer {thief}"),))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with gw.http.client() as c:
        rest = c.get(f"/v1/chat/deferred-completion/{started.request_id}", headers={"Authorization": f"Bearer {owner}"})
        assert rest.status_code == 200 and rest.json()["choices"][0]["message"]["content"] == FAKE_TEXT
        stolen = c.get(f"/v1/chat/deferred-completion/{started.request_id}",
                       headers={"Authorization": f"Bearer {thief}"})
        assert stolen.status_code == 404


def test_a_deferred_start_is_refused_at_once_and_a_failure_is_the_polls_status(gw: Gateway) -> None:
    broke, _ = key(gw, "defer-broke", credits="0")
    error = rpc_error(lambda: gw.client(broke).chat.create(model="grok-3", messages=[user("hi")]).defer())
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "used_up" in error.details()
    gw.fake.fail_next("500", "500", "500", "500", "500")
    try:
        with grpc.insecure_channel(gw.host) as channel:
            stub = chat_pb2_grpc.ChatStub(channel)
            auth = (("authorization", f"Bearer {TOKEN}"),)
            request = chat_pb2.GetCompletionsRequest(model="grok-4-1-fast", messages=[chat_pb2.Message(
                role=chat_pb2.ROLE_USER, content=[chat_pb2.Content(text="hi")])])
            started = stub.StartDeferredCompletion(request, metadata=auth)  # admitted: the failure comes later
            poll = deferred_pb2.GetDeferredRequest(request_id=started.request_id)
            deadline = time.monotonic() + 10
            while True:
                try:
                    got = stub.GetDeferredCompletion(poll, metadata=auth)
                except grpc.RpcError as failed:
                    assert failed.code() == grpc.StatusCode.UNAVAILABLE, failed.details()
                    break
                assert got.status == deferred_pb2.PENDING and time.monotonic() < deadline
                time.sleep(0.02)
    finally:
        gw.fake.reset()


def test_a_client_deadline_stops_a_collected_answer_and_settles_it_as_a_disconnect(gw: Gateway) -> None:
    secret, record = key(gw, "impatient")
    asked = len(gw.fake.chat_requests)
    gw.fake.header_defaults["x-fake-fault"] = "stall;seconds=30"  # the deadline comes first, however busy the host
    try:
        client = gw.client(secret, timeout=2)
        error = rpc_error(lambda: client.chat.create(model="grok-3", messages=[user("hi")]).sample())
    finally:
        gw.fake.header_defaults.pop("x-fake-fault")
        gw.fake.release_stalls()
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(gw.fake.chat_requests) > asked  # admitted and sent upstream before the deadline
    deadline = time.monotonic() + 10
    while not (rows := gw.ledger(record["id"])) and time.monotonic() < deadline:
        time.sleep(0.05)
    [row] = rows
    assert row["status"] == "client_disconnected", row


@pytest.mark.parametrize("rpc", ["GetCompletionChunk", "StartDeferredCompletion", "GetCompletion"])
def test_a_cancel_during_admission_leaves_no_reservation_held(gw: Gateway, rpc: str) -> None:
    """The client cancels while its reservation is being written (a slow database, as PostgreSQL under load): the
    request is settled as a disconnect, never left holding the credits with nobody to settle them."""
    secret, record = key(gw, f"slow-reserve-{rpc}")
    store = gw.http.app.state.gateway.admission.store
    reserve = store.reserve
    writing = threading.Event()

    async def slow_reserve(hold: Hold) -> Reserved:
        reserved: Reserved = await reserve(hold)  # written: the credits are held from here
        writing.set()
        await asyncio.sleep(0.8)
        return reserved

    store.reserve = slow_reserve
    try:
        with grpc.insecure_channel(gw.host) as channel:
            method = getattr(chat_pb2_grpc.ChatStub(channel), rpc)
            request = chat_pb2.GetCompletionsRequest(model="grok-3", messages=[chat_pb2.Message(
                role=chat_pb2.ROLE_USER, content=[chat_pb2.Content(text="hi")])])
            auth = (("authorization", f"Bearer {secret}"),)
            call = method(request, metadata=auth) if rpc == "GetCompletionChunk" else method.future(request,
                                                                                                  metadata=auth)
            assert writing.wait(10)
            assert call.cancel()
            if rpc == "GetCompletionChunk":
                with pytest.raises(grpc.RpcError) as raised:
                    list(call)
                assert raised.value.code() == grpc.StatusCode.CANCELLED
            else:
                with pytest.raises(grpc.FutureCancelledError):
                    call.result()
        deadline = time.monotonic() + 10
        while not (rows := gw.ledger(record["id"])) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        store.reserve = reserve
    [row] = rows
    assert row["status"] == "client_disconnected", row
    with gw.http.client() as c:
        keys = c.get("/admin/keys", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    [mine] = [k for k in keys["data"] if k["id"] == record["id"]]
    assert mine["reserved"] == 0


def test_lists_and_nesting_are_bounded_before_anything_is_built(gw: Gateway) -> None:
    auth = (("authorization", f"Bearer {TOKEN}"),)
    deep = "[" * 300 + "]" * 300
    cases = {
        "tools": chat_pb2.GetCompletionsRequest(model="grok-3", messages=[chat_pb2.Message(
            role=chat_pb2.ROLE_USER, content=[chat_pb2.Content(text="hi")])], tools=[WEATHER] * 129),
        "messages[0].content": chat_pb2.GetCompletionsRequest(model="grok-3", messages=[chat_pb2.Message(
            role=chat_pb2.ROLE_USER, content=[chat_pb2.Content(text="x")] * 10_000)]),
        "tools[0].function.parameters": chat_pb2.GetCompletionsRequest(model="grok-3", messages=[chat_pb2.Message(
            role=chat_pb2.ROLE_USER, content=[chat_pb2.Content(text="hi")])], tools=[chat_pb2.Tool(
                function=chat_pb2.Function(name="f", parameters='{"a": ' + deep + "}"))]),
        "response_format.schema": chat_pb2.GetCompletionsRequest(model="grok-3", messages=[chat_pb2.Message(
            role=chat_pb2.ROLE_USER, content=[chat_pb2.Content(text="hi")])], response_format=chat_pb2.ResponseFormat(
                format_type=chat_pb2.FORMAT_TYPE_JSON_SCHEMA, schema='{"a": ' + deep + "}")),
    }
    with grpc.insecure_channel(gw.host) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        for param, request in cases.items():
            with pytest.raises(grpc.RpcError) as raised:
                stub.GetCompletion(request, metadata=auth)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (param, raised.value.details())
            assert f"(param: {param})" in raised.value.details(), raised.value.details()


def test_a_large_message_of_a_caller_without_credit_is_refused_before_it_is_parsed(gw: Gateway) -> None:
    broke, _ = key(gw, "broke-large", credits="0")
    text = "word " * (gw.http.app.state.gateway.settings.parse_offload_bytes // 4)
    request = chat_pb2.GetCompletionsRequest(model="grok-3", temperature=9, messages=[chat_pb2.Message(
        role=chat_pb2.ROLE_USER, content=[chat_pb2.Content(text=text)])])
    with grpc.insecure_channel(gw.host) as channel, pytest.raises(grpc.RpcError) as raised:
        chat_pb2_grpc.ChatStub(channel).GetCompletion(request, metadata=(("authorization", f"Bearer {broke}"),))
    # Not the temperature's INVALID_ARGUMENT: the message was never converted.
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED and "used_up" in raised.value.details()


def test_an_internal_failure_mid_stream_leaves_nothing_behind(gw: Gateway) -> None:
    from grokgate.serving.lifecycle import INTERNAL_ERROR

    async def breaks(request: ChatCompletionRequest, model: str) -> AsyncGenerator[Event]:
        yield Delta(0, content="partial")
        raise RuntimeError("a bug")

    gw.scripted.script = breaks
    try:
        for _ in range(3):
            chat = gw.client().chat.create(model="grok-4", messages=[user("hi")])
            error = rpc_error(lambda chat=chat: streamed(chat))
            assert error.code() == grpc.StatusCode.INTERNAL and "api_error" in error.details()
    finally:
        gw.scripted.script = fragments
    assert INTERNAL_ERROR.__traceback__ is None and INTERNAL_ERROR.__context__ is None
