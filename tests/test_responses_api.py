"""The Responses API over HTTP against a real server, with the openai SDK: through the fake xAI (xAI's own
/v1/responses: pass-through of server-side tool items, usage, billing), through an OpenAI-compatible upstream
(translated to chat completions) and on the local model; stored conversations, isolation, validation, money."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import TLS, Server, call, create_key, err, kill_under_load, start_server, stop_server
from tests.fakes.fake_xai import FakeXAI
from tests.inproc import AppServer, app_server

pytestmark = pytest.mark.e2e  # the real server, model and fake upstream (tests/conftest.py)

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}


def sent_bodies(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The bodies of requests the fake upstream received, oldest first."""
    return [r["body"] for r in records]


def routing_file(tmp: Path, fake_url: str, *, local: bool = True) -> Path:
    """The routing file; without `local`, no local backend (no model to load) and no `grok-local`."""
    config = tmp / "grokgate.yaml"
    local_backend = "\n  local: {kind: local}" if local else ""
    local_model = "\n  grok-local: [{backend: local}]" if local else ""
    config.write_text(f"""
backends:
  up: {{kind: xai, base_url: {fake_url}, api_key_env: XAI_KEY}}
  compat: {{kind: openai, base_url: {fake_url}, api_key_env: XAI_KEY}}{local_backend}
models:
  grok-3: [{{backend: up}}]
  grok-3-mini: [{{backend: up}}]
  grok-4: [{{backend: up, model: grok-4-0709}}]
  compat-3: [{{backend: compat, model: grok-3}}]{local_model}
""")
    return config


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeXAI]:
    with FakeXAI().start() as fake:
        yield fake


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, fake: FakeXAI) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("responses")
    srv = start_server(tmp, "--slots", "2", "--ctx-per-slot", "2048", env={
        "GROKGATE_CONFIG": str(routing_file(tmp, fake.url)), "XAI_KEY": "xai-test-key",
        "GROKGATE_KEEPALIVE_SECONDS": "0.5", "GROKGATE_RESPONSES_MEASURE_SECONDS": "0.2"}, name="responses")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def account(gw: Server) -> tuple[str, dict[str, Any]]:
    return create_key(gw, "responder", credits="100")


def sdk(gw: Server, token: str, prefix: str = "/v1") -> openai.OpenAI:
    """An SDK client as a user makes one, but for the test session's one TLS context (conftest.TLS)."""
    return openai.OpenAI(base_url=f"{gw.url}{prefix}", api_key=token, max_retries=0,
                         http_client=openai.DefaultHttpxClient(verify=TLS))


@pytest.fixture
def client(gw: Server, account: tuple[str, dict[str, Any]]) -> openai.OpenAI:
    return sdk(gw, account[0])


def admin_get(server: Server | AppServer, path: str) -> Any:
    r = call(server, "GET", path, server.token)
    assert r.status_code == 200, r.text
    return r.json()


def ledger_row(gw: Server, request_id: str) -> dict[str, Any]:
    rows = admin_get(gw, "/admin/ledger?limit=10000")["data"]
    found = [r for r in rows if r["request_id"] == request_id]
    assert len(found) == 1, (request_id, found)
    return dict(found[0])


# -- create, stream, retrieve, delete, input items -------------------------------------------------------------

@pytest.mark.parametrize("model", ["grok-3", "compat-3", "grok-local"])
def test_create_on_every_backend(client: openai.OpenAI, model: str) -> None:
    response = client.responses.create(model=model, input="Say hello in one word.", max_output_tokens=16)
    assert response.object == "response"
    assert response.id.startswith("resp_")
    assert response.model == model
    assert response.status in ("completed", "incomplete")
    assert response.output_text
    assert response.usage is not None
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.usage.output_tokens >= 1
    assert response._request_id


def test_xai_route_calls_xais_own_responses_api(client: openai.OpenAI, fake: FakeXAI) -> None:
    before = len(sent_bodies(fake.responses_requests))
    client.responses.create(model="grok-3", input="Hi", max_output_tokens=8)
    sent = sent_bodies(fake.responses_requests)[before:]
    assert len(sent) == 1
    assert sent[0]["model"] == "grok-3"
    assert sent[0]["store"] is False  # grokgate keeps the conversation, not xAI
    assert "previous_response_id" not in sent[0]


def test_compat_route_gets_chat_completions(client: openai.OpenAI, fake: FakeXAI) -> None:
    before = len(sent_bodies(fake.chat_requests))
    client.responses.create(model="compat-3", input="Hi", instructions="Be brief.", max_output_tokens=8)
    sent = sent_bodies(fake.chat_requests)[before:]
    assert len(sent) == 1
    assert sent[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent[0]["messages"][-1]["role"] == "user"
    assert sent[0]["max_completion_tokens"] == 8 or sent[0].get("max_tokens") == 8


@pytest.mark.parametrize("model", ["grok-3", "compat-3", "grok-local"])
def test_stream_helper_assembles_what_create_returns(client: openai.OpenAI, model: str) -> None:
    deltas: list[str] = []
    types: list[str] = []
    # Room to finish: the SDK's helper wants `response.completed` (an incomplete stream ends otherwise).
    with client.responses.stream(model=model, input="Name a color. One word.", max_output_tokens=96) as stream:
        for event in stream:
            types.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert deltas and final.output_text == "".join(deltas)
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    for expected in ("response.output_item.added", "response.content_part.added", "response.output_text.done",
                     "response.content_part.done", "response.output_item.done"):
        assert expected in types
    assert final.usage is not None and final.usage.output_tokens >= 1


def test_sequence_numbers_strictly_increase(gw: Server, account: tuple[str, dict[str, Any]]) -> None:
    r = call(gw, "POST", "/grok/responses", account[0],
             json={"model": "grok-3", "input": "Hi", "stream": True, "max_output_tokens": 8})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in r.text.split("\n\n") if f.startswith("event:")]
    numbers = []
    for frame in frames:
        event_line, data_line = frame.split("\n", 1)
        payload = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {payload['type']}"
        numbers.append(payload["sequence_number"])
    assert numbers == sorted(set(numbers)) and len(numbers) >= 8


def test_retrieve_delete_and_input_items(client: openai.OpenAI) -> None:
    created = client.responses.create(model="grok-3", input=[
        {"role": "user", "content": "First."}, {"role": "user", "content": [{"type": "input_text", "text": "Two"}]}],
        max_output_tokens=8)
    again = client.responses.retrieve(created.id)
    assert again.id == created.id and again.output_text == created.output_text
    items = client.responses.input_items.list(created.id, order="asc")
    assert len(items.data) == 2
    assert items.data[0].type == "message"
    first = items.data[0]
    assert first.content[0].text == "First."  # type: ignore[union-attr]
    deleted = client.responses.delete(created.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


# -- stored conversations ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["grok-3", "compat-3"])
def test_previous_response_id_rebuilds_the_conversation(client: openai.OpenAI, fake: FakeXAI, model: str) -> None:
    first = client.responses.create(model=model, input="My name is Ada.", max_output_tokens=8)
    mark = (len(sent_bodies(fake.responses_requests)), len(sent_bodies(fake.chat_requests)))
    second = client.responses.create(model=model, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=8)
    assert second.previous_response_id == first.id
    if model == "grok-3":
        sent = sent_bodies(fake.responses_requests)[mark[0]:][0]
        texts = json.dumps(sent["input"])
    else:
        sent = sent_bodies(fake.chat_requests)[mark[1]:][0]
        texts = json.dumps(sent["messages"])
    # The whole conversation went upstream: the first question, the first answer, the second question.
    assert "My name is Ada." in texts and "What is my name?" in texts
    assert json.dumps(first.output_text)[1:-1] in texts


def test_a_chain_survives_a_change_of_backend(client: openai.OpenAI, fake: FakeXAI) -> None:
    first = client.responses.create(model="grok-3", input="Remember: 42.", max_output_tokens=8)
    mark = len(sent_bodies(fake.chat_requests))
    client.responses.create(model="compat-3", input="What number?", previous_response_id=first.id,
                            max_output_tokens=8)
    assert "Remember: 42." in json.dumps(sent_bodies(fake.chat_requests)[mark:][0]["messages"])


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    response = client.responses.create(model="grok-3", input="Hi", store=False, max_output_tokens=8)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as chained:
        client.responses.create(model="grok-3", input="Again", previous_response_id=response.id)
    assert chained.value.param == "previous_response_id"


def test_isolation_between_two_tokens(gw: Server, client: openai.OpenAI) -> None:
    mine = client.responses.create(model="grok-3", input="Secret plans.", max_output_tokens=8)
    other_token, _ = create_key(gw, "other", credits="10")
    other = sdk(gw, other_token, "/grok")
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.input_items.list(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError) as chained:
        other.responses.create(model="grok-3", input="Tell me", previous_response_id=mine.id)
    assert chained.value.param == "previous_response_id"
    assert client.responses.retrieve(mine.id).id == mine.id  # still there for its owner


# -- tools and formats -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["grok-3", "compat-3"])
def test_function_call_round_trip(client: openai.OpenAI, model: str) -> None:
    first = client.responses.create(model=model, input="Weather in Paris?", tools=[WEATHER],  # type: ignore[list-item]
                                    max_output_tokens=64)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert isinstance(json.loads(calls[0].arguments), dict)
    assert calls[0].call_id
    second = client.responses.create(model=model, previous_response_id=first.id, tools=[WEATHER],  # type: ignore[list-item]
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": '{"temperature_c": 21}'}], max_output_tokens=64)
    assert second.output_text
    assert not [item for item in second.output if item.type == "function_call"]


def test_streamed_function_call_arguments(client: openai.OpenAI) -> None:
    with client.responses.stream(model="grok-3", input="Weather in Oslo?", tools=[WEATHER],  # type: ignore[list-item]
                                 max_output_tokens=64) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    call_items = [item for item in final.output if item.type == "function_call"]
    assert call_items and json.loads(call_items[0].arguments)


def test_json_schema_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    response = client.responses.create(model="grok-3", input="2+2?", max_output_tokens=64, text={
        "format": {"type": "json_schema", "name": "sum", "schema": schema, "strict": True}})
    assert isinstance(json.loads(response.output_text), dict)


def test_server_side_tools_pass_through_and_are_charged_per_call(
        gw: Server, client: openai.OpenAI, fake: FakeXAI) -> None:
    response = client.responses.create(model="grok-4", input="Latest news about Mars?",
                                       tools=[{"type": "web_search"}], max_output_tokens=64)  # type: ignore[list-item]
    kinds = [item.type for item in response.output]
    assert "web_search_call" in kinds and "message" in kinds
    row = ledger_row(gw, response._request_id or "")
    assert row["endpoint"] == "responses"
    assert row["server_tool_calls"] >= 1
    assert row["cost"] >= 25_000 * row["server_tool_calls"]  # the default per-call price
    # The request to xAI bounded what the reservation paid for.
    assert sent_bodies(fake.responses_requests)[-1]["max_tool_calls"] <= 10


def test_server_side_tools_need_a_route_to_xai(client: openai.OpenAI) -> None:
    for model in ("compat-3", "grok-local"):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model=model, input="Search the web", tools=[{"type": "web_search"}])  # type: ignore[list-item]
        assert refused.value.param == "tools"


def test_local_route_refuses_an_unknown_named_function(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="grok-local", input="Weather in Paris?", tools=[WEATHER],  # type: ignore[list-item]
                                tool_choice={"type": "function", "name": "nope"})
    assert refused.value.param == "tool_choice"


def test_reasoning_items_and_usage_from_xai(client: openai.OpenAI) -> None:
    response = client.responses.create(model="grok-3-mini", input="Think, then answer: 3*7?", max_output_tokens=256,
                                       include=["reasoning.encrypted_content"])
    assert any(item.type == "reasoning" for item in response.output)
    assert response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens >= 1
    assert response.usage.output_tokens >= response.usage.output_tokens_details.reasoning_tokens


def test_length_is_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(model="grok-local", input="Write a long story about the sea.",
                                       max_output_tokens=3)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


def test_a_stream_cut_by_its_cap_ends_incomplete(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="grok-local", input="Write a long story about the sea.",
                                          max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete"
    final = events[-1].response  # type: ignore[union-attr]
    assert final.incomplete_details is not None and final.incomplete_details.reason == "max_output_tokens"
    assert final.usage is not None and final.usage.output_tokens == 3


# -- errors ------------------------------------------------------------------------------------------------------

def test_validation_and_auth_errors(gw: Server, account: tuple[str, dict[str, Any]]) -> None:
    token = account[0]
    cases: list[tuple[dict[str, Any], int, str, str | None]] = [
        ({"model": "grok-3", "input": "x", "temperature": 5}, 400, "bad_request", "temperature"),
        ({"model": "grok-3", "input": "x", "top_p": 2}, 400, "bad_request", "top_p"),
        ({"model": "grok-3", "input": "x", "max_output_tokens": 0}, 400, "bad_request", "max_output_tokens"),
        ({"model": "grok-3"}, 400, "bad_request", "input"),
        ({"model": "nope", "input": "x"}, 404, "model_not_found", "model"),
        ({"model": "grok-3", "input": "x", "previous_response_id": "resp_missing"}, 404, "not_found",
         "previous_response_id"),
    ]
    for body, status, code, param in cases:
        error = err(call(gw, "POST", "/v1/responses", token, json=body), status, code, param)
        if code == "model_not_found":
            assert "grok-3" in error["message"]
    err(call(gw, "POST", "/v1/responses", None, json={"model": "grok-3", "input": "x"}), 400, "no_token")
    err(call(gw, "POST", "/v1/responses", "wrong", json={"model": "grok-3", "input": "x"}), 401, "invalid_token")
    err(call(gw, "GET", "/v1/responses/resp_x", "wrong"), 401, "invalid_token")
    err(call(gw, "POST", "/v1/responses", token, content=b"{not json"), 400, "bad_request")
    err(call(gw, "POST", "/v1/responses", token, json={"model": "grok-3", "input": [{"type": "nope"}]}), 400,
        "bad_request")


def test_sdk_errors(gw: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model="grok-3", input="x", temperature=5)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.AuthenticationError):
        sdk(gw, "wrong").responses.create(model="grok-3", input="x")


# -- money -------------------------------------------------------------------------------------------------------

def test_billing_and_ledger_name_the_endpoint(gw: Server, fake: FakeXAI) -> None:
    token, key = create_key(gw, "books", credits="10")
    client = sdk(gw, token)
    response = client.responses.create(model="grok-3", input="Hi", max_output_tokens=8)
    row = ledger_row(gw, response._request_id or "")
    assert row["endpoint"] == "responses" and row["status"] == "ok"
    assert response.usage is not None
    assert (row["prompt_tokens"], row["completion_tokens"]) == (response.usage.input_tokens,
                                                                 response.usage.output_tokens)
    after = admin_get(gw, f"/admin/keys/{key['id']}")
    assert after["reserved"] == 0 and 10_000_000 - after["balance"] == row["cost"] > 0


def test_a_200_way_race_never_overdraws(gw: Server) -> None:
    body = {"model": "grok-3", "input": "hi", "max_output_tokens": 1}
    from grokgate.core.accounts import format_credits

    def admitted(micro: int) -> bool:
        probe, _ = create_key(gw, "probe", credits=format_credits(micro))
        r = call(gw, "POST", "/v1/responses", probe, json=body)
        assert r.status_code in (200, 403), r.text
        return r.status_code == 200

    low, high = 1, 1_000_000  # the reservation of one request lies in (low, high]
    assert admitted(high)
    while high - low > max(high // 50, 1):
        middle = (low + high) // 2
        low, high = (low, middle) if admitted(middle) else (middle, high)
    initial = high * 10 + high // 2  # funded for about ten requests
    token, key = create_key(gw, "racer", credits=format_credits(initial))

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=gw.url, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(c.post("/v1/responses", json=body,
                                                 headers={"Authorization": f"Bearer {token}"}) for _ in range(200)))

    responses = asyncio.run(fire())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 403}, [r.text[:200] for r in responses if r.status_code not in (200, 403)]
    assert codes.count(403) > 0 and codes.count(200) >= 10  # the ten funded ones run; never an overdraft
    after = admin_get(gw, f"/admin/keys/{key['id']}")
    assert after["reserved"] == 0 and after["balance"] >= 0
    rows = [r for r in admin_get(gw, f"/admin/ledger?token={key['id']}&limit=10000")["data"] if r["kind"] == "usage"]
    assert len([r for r in rows if r["status"] == "ok"]) == codes.count(200)
    assert initial - after["balance"] == -sum(r["amount"] for r in rows)


def test_sigkill_under_responses_load_loses_no_completed_request(
        tmp_path_factory: pytest.TempPathFactory, fake: FakeXAI) -> None:
    tmp = tmp_path_factory.mktemp("responses-crash")
    # Only the fake upstream is used: no local backend, so no model loads in the process about to be killed.
    env = {"GROKGATE_CONFIG": str(routing_file(tmp, fake.url, local=False)), "XAI_KEY": "xai-test-key",
           "GROKGATE_INSTANCE_ID": "responses-crash"}
    srv = start_server(tmp, env=env, name="crash", wait_ready=False)
    token, key = create_key(srv, "victim", credits="50")

    def send(i: int, c: httpx.Client) -> str | None:
        body = {"model": "grok-3", "input": f"Count to {i + 3}.", "max_output_tokens": 4 + i % 6,
                "stream": i % 2 == 0}
        r = c.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {token}"})
        done = ("event: response.completed" in r.text if body["stream"]
                else r.status_code == 200 and r.json().get("status") == "completed")
        return r.headers["x-request-id"] if r.status_code == 200 and done else None

    completed = kill_under_load(srv, send, 20)
    assert len(completed) >= 20
    # The restart: the app on the killed process's data dir, with its instance id (so it releases what the crash
    # left reserved), here in process: what it shows is the ledger and the balances the crash left behind.
    with app_server(tmp / "again", data_dir=tmp / "crash-data", instance_id="responses-crash") as again:
        rows = admin_get(again, f"/admin/ledger?token={key['id']}&limit=10000")["data"]
        in_ledger = {r["request_id"]: r for r in rows}
        missing = [rid for rid in completed if rid not in in_ledger]
        assert not missing, f"completed requests missing from the ledger: {missing}"
        assert all(in_ledger[rid]["endpoint"] == "responses" for rid in completed)
        after = admin_get(again, f"/admin/keys/{key['id']}")
        usage = [r for r in rows if r["kind"] == "usage"]
        assert after["reserved"] == 0
        assert 50_000_000 - after["balance"] == -sum(r["amount"] for r in usage)


def test_the_bootstrap_admin_token_keeps_its_own_responses(gw: Server, client: openai.OpenAI) -> None:
    """A static (bootstrap) token has no account, but its stored responses are scoped to it like an account's."""
    admin = sdk(gw, gw.token)
    mine = admin.responses.create(model="grok-3", input="hi", max_output_tokens=2)
    assert admin.responses.retrieve(mine.id).id == mine.id
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(mine.id)


def test_metrics_name_the_endpoint_and_count_what_is_stored(gw: Server, client: openai.OpenAI) -> None:
    def scrape() -> dict[str, float]:
        values: dict[str, float] = {}
        for line in httpx.get(f"{gw.url}/metrics", verify=TLS).text.splitlines():
            if line.startswith(("grokgate_requests_total{", "grokgate_responses_stored")):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    served = 'grokgate_requests_total{backend="up",endpoint="responses",model="grok-3",status="200"}'
    before = scrape()
    client.responses.create(model="grok-3", input="Hi", max_output_tokens=4)
    client.responses.create(model="grok-3", input="Hi", max_output_tokens=4, store=False)
    after = scrape()
    assert after[served] - before.get(served, 0) == 2
    assert after["grokgate_responses_stored_total"] - before.get("grokgate_responses_stored_total", 0) == 1
    grew = after["grokgate_responses_stored_bytes_total"] - before.get("grokgate_responses_stored_bytes_total", 0)
    assert grew > 0


def test_stored_bytes_are_gauged(gw: Server, client: openai.OpenAI) -> None:
    client.responses.create(model="grok-3", input="Keep me.", max_output_tokens=4)
    # The gauges move within GROKGATE_RESPONSES_MEASURE_SECONDS (before: the SQL store's counts came from a
    # cache up to 10 s old whatever that setting said).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{gw.url}/metrics", verify=TLS).text
        gauges = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
                  if line.startswith("grokgate_responses_kept")}
        if gauges.get("grokgate_responses_kept", 0) >= 1 and gauges.get("grokgate_responses_kept_bytes", 0) > 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"the stored-responses gauges never moved: {gauges}")


def test_a_deleted_tokens_conversations_go_with_it(gw: Server) -> None:
    """A token created after another was deleted never gets its id (migration 0004), nor its conversations."""
    token, key = create_key(gw, "leaver", credits="1")
    kept = sdk(gw, token).responses.create(model="grok-3", input="my secret is 1234", max_output_tokens=4)
    assert call(gw, "DELETE", f"/admin/keys/{key['id']}", gw.token).status_code in (200, 204)
    heir_token, heir = create_key(gw, "heir", credits="1")
    assert heir["id"] > key["id"]  # before: SQLite handed the highest id out again
    with pytest.raises(openai.NotFoundError):
        sdk(gw, heir_token).responses.input_items.list(kept.id)
    with pytest.raises(openai.NotFoundError):
        sdk(gw, heir_token).responses.create(model="grok-3", input="go on", previous_response_id=kept.id)


def stored_total(gw: Server) -> float:
    return sum(float(line.split(" ")[1]) for line in httpx.get(f"{gw.url}/metrics", verify=TLS).text.splitlines()
               if line.startswith("grokgate_responses_stored_total "))


def test_a_client_leaving_mid_stream_is_billed_what_was_generated(gw: Server) -> None:
    token, key = create_key(gw, "leaving", credits="10")
    stored_before = stored_total(gw)
    with httpx.Client(base_url=gw.url, timeout=60) as c, c.stream(
            "POST", "/v1/responses", headers={"Authorization": f"Bearer {token}"},
            json={"model": "grok-local", "input": "Write a long story about the sea.", "max_output_tokens": 400,
                  "stream": True}) as r:
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        deltas = 0
        for line in r.iter_lines():
            deltas += line == "event: response.output_text.delta"
            if deltas >= 3:
                break  # and close the connection mid-stream
    deadline = time.monotonic() + 30
    while True:
        rows = [row for row in admin_get(gw, f"/admin/ledger?token={key['id']}")["data"]
                if row["request_id"] == request_id]
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(rows) == 1, "settled exactly once"
    row = rows[0]
    assert row["status"] == "client_disconnected" and row["endpoint"] == "responses"
    assert 3 <= row["completion_tokens"] < 400 and row["cost"] > 0  # what was generated, not the reservation
    after = admin_get(gw, f"/admin/keys/{key['id']}")
    assert after["reserved"] == 0 and 10_000_000 - after["balance"] == row["cost"]
    assert stored_total(gw) == stored_before  # an answer nobody received is not stored
