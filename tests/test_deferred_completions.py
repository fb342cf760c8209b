"""Deferred chat completions (xAI's `deferred: true` and `GET /v1/chat/deferred-completion/{request_id}`), on the
in-process tier over real HTTP, with the OpenAI client where it is natural.

What must hold (serving/deferred.py): the request is admitted when it starts (a refusal is answered then, never
deferred); it is answered `{"request_id"}` at once and polled to 202 then 200 with what the same request answers
undeferred; it is settled once (one ledger row, endpoint chat); only its own tenant can read it; a failure of the
backend is answered on the poll; results expire; a tenant's pending requests are capped; a shutdown settles what
is pending once and keeps its failure for the next start.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from grokgate.core.errors import GatewayError
from grokgate.core.events import Delta, Event, Finish, Usage, UsageReport
from grokgate.providers.recording import canonical_of
from grokgate.schemas.chat import ChatCompletionRequest
from tests.conftest import TOKEN, create_key, err, user
from tests.inproc import AppServer, ScriptedProvider, app_server, scripted_models

MODEL = "grok-3"
GATES: dict[str, threading.Event] = {}  # "hold:<key>" prompts wait for their gate (set from the test's thread)
FAILURE = GatewayError(502, "upstream_error", "The upstream failed: scripted.")


async def script(request: ChatCompletionRequest, model: str) -> AsyncGenerator[Event]:
    """"fail..." fails before any output; "hold:<key>" says "Partial" (1 token, reported) then waits for its
    gate; every prompt then says "Hello deferred" (2 tokens more)."""
    text = request.messages[-1].content
    assert isinstance(text, str)
    if text.startswith("fail"):
        raise FAILURE
    completion = 2
    if text.startswith("hold:"):
        yield Delta(0, "Partial ")
        completion += 1
        yield UsageReport(Usage(prompt_tokens=7, completion_tokens=1))  # what a cut-short request is billed
        gate = GATES[text]
        while not gate.is_set():  # noqa: ASYNC110 (a threading.Event: the test's thread sets it, not this loop)
            await asyncio.sleep(0.005)
    yield Delta(0, "Hello")
    yield Delta(0, " deferred")
    yield Finish(0, "stop")
    yield UsageReport(Usage(prompt_tokens=7, completion_tokens=completion))


def hold() -> tuple[str, threading.Event]:
    prompt = f"hold:{uuid.uuid4().hex}"
    GATES[prompt] = threading.Event()
    return prompt, GATES[prompt]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    provider = ScriptedProvider(script=script)
    with app_server(tmp_path_factory.mktemp("deferred"), scripted_models(provider),
                    deferred_max_pending=2) as server:
        server.extra["provider"] = provider
        yield server
    for gate in GATES.values():
        gate.set()


def token(srv: AppServer, credits: str = "100") -> tuple[str, int]:
    secret, key = create_key(srv, f"d-{uuid.uuid4().hex[:10]}", credits)
    return secret, int(key["id"])


def sdk(srv: AppServer, secret: str, prefix: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}{prefix}", api_key=secret, max_retries=0)


def start(srv: AppServer, secret: str, text: str = "Say hello", path: str = "/v1/chat/completions",
          **fields: Any) -> httpx.Response:
    return srv.chat({"model": MODEL, "messages": user(text), "deferred": True, **fields}, token=secret, path=path)


def fetch(srv: AppServer, secret: str, request_id: str, prefix: str = "/v1") -> httpx.Response:
    with srv.client() as c:
        return c.get(f"{prefix}/chat/deferred-completion/{request_id}", headers={"Authorization": f"Bearer {secret}"})


def poll(srv: AppServer, secret: str, request_id: str, prefix: str = "/v1") -> httpx.Response:
    """Poll until the answer is not 202 (30 s at most: a bound on a hang, not a timing assertion)."""
    deadline = time.monotonic() + 30
    while True:
        r = fetch(srv, secret, request_id, prefix)
        if r.status_code != 202 or time.monotonic() > deadline:
            return r
        time.sleep(0.01)


def ledger(srv: AppServer, token_id: int) -> list[dict[str, Any]]:
    with srv.client() as c:
        r = c.get(f"/admin/ledger?token={token_id}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    rows: list[dict[str, Any]] = r.json()["data"]
    return [row for row in rows if row.get("kind", "usage") == "usage"]


def same_answer(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two chat completions say the same (ids and times differ per response)."""
    def strip(c: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in c.items() if k not in ("id", "created")}
    assert strip(a) == strip(b)


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


# -- the flow ----------------------------------------------------------------------------------------------------


def test_start_answers_an_id_then_the_same_completion_as_undeferred(srv: AppServer) -> None:
    secret, token_id = token(srv)
    client = sdk(srv, secret)
    started = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], extra_body={"deferred": True})
    assert started.http_response.status_code == 200
    body = started.http_response.json()
    assert set(body) == {"request_id"} and len(body["request_id"]) == 36, body
    trace = started.http_response.headers["x-request-id"]
    done = client.get(f"/chat/deferred-completion/{body['request_id']}", cast_to=httpx.Response)
    while done.status_code == 202:
        assert done.json() == {"request_id": body["request_id"], "status": "pending"}
        done = client.get(f"/chat/deferred-completion/{body['request_id']}", cast_to=httpx.Response)
    assert done.status_code == 200, done.text
    completion = done.json()
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == "Hello deferred"
    undeferred = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}])
    same_answer(completion, undeferred.http_response.json())
    # `deferred` is grokgate's: the backend is never given it (upstream bodies, cassettes and cache keys are dumps).
    provider: ScriptedProvider = srv.extra["provider"]
    sent = [call.request for call in provider.calls if call.request_id == trace]
    assert len(sent) == 1 and sent[0].deferred is True and "deferred" not in sent[0].model_dump()
    assert canonical_of(sent[0]) == canonical_of(provider.calls[-1].request)
    # Polled again: the same answer, and still one charge for it (the undeferred request is the other row).
    assert fetch(srv, secret, body["request_id"]).json() == completion
    rows = ledger(srv, token_id)
    mine = [row for row in rows if row["request_id"] == trace]
    assert len(mine) == 1 and len(rows) == 2, rows
    assert mine[0]["endpoint"] == "chat" and mine[0]["status"] == "ok", mine


def test_pending_answers_202_until_done_under_both_prefixes(srv: AppServer) -> None:
    secret, token_id = token(srv)
    prompt, gate = hold()
    started = start(srv, secret, prompt, path="/grok/chat/completions")
    assert started.status_code == 200, started.text
    request_id = started.json()["request_id"]
    for prefix in ("/v1", "/grok"):
        pending = fetch(srv, secret, request_id, prefix)
        assert pending.status_code == 202 and pending.json() == {"request_id": request_id, "status": "pending"}
    assert ledger(srv, token_id) == []  # not settled while it runs
    gate.set()
    done = poll(srv, secret, request_id, "/grok")
    assert done.status_code == 200, done.text
    assert done.json()["choices"][0]["message"]["content"] == "Partial Hello deferred"
    assert [row["status"] for row in ledger(srv, token_id)] == ["ok"]


def test_another_token_cannot_see_it_pending_or_done(srv: AppServer) -> None:
    secret, _ = token(srv)
    other, _ = token(srv)
    prompt, gate = hold()
    request_id = start(srv, secret, prompt).json()["request_id"]
    for who in (other, TOKEN):  # another account, and the admin's static key: other tenants
        err(fetch(srv, who, request_id), 404, "not_found", "request_id")
    gate.set()
    assert poll(srv, secret, request_id).status_code == 200
    for who in (other, TOKEN):
        err(fetch(srv, who, request_id), 404, "not_found", "request_id")
    with pytest.raises(openai.NotFoundError):
        sdk(srv, other).get(f"/chat/deferred-completion/{request_id}", cast_to=httpx.Response)


def test_the_responses_api_never_reads_a_deferred_result(srv: AppServer) -> None:
    """Results share the Responses store's table, under the tenant's own deferred scope: none of the Responses
    API's reads (retrieve, continue, delete) finds one, by the request id or the row's id."""
    secret, _ = token(srv)
    request_id = start(srv, secret).json()["request_id"]
    assert poll(srv, secret, request_id).status_code == 200
    with srv.client(headers={"Authorization": f"Bearer {secret}"}) as c:
        for rid in (request_id, f"deferred:{request_id}", f"deferred-pending:{request_id}"):
            err(c.get(f"/v1/responses/{rid}"), 404, "not_found")
            err(c.post("/v1/responses", json={"model": MODEL, "input": "hi", "previous_response_id": rid}), 404,
                "not_found", "previous_response_id")
            err(c.delete(f"/v1/responses/{rid}"), 404, "not_found")
    assert fetch(srv, secret, request_id).status_code == 200


def test_an_unknown_id_is_not_found(srv: AppServer) -> None:
    secret, _ = token(srv)
    err(fetch(srv, secret, str(uuid.uuid4())), 404, "not_found", "request_id")
    err(fetch(srv, secret, "resp_" + uuid.uuid4().hex), 404, "not_found", "request_id")
    assert fetch(srv, "not-a-token", str(uuid.uuid4())).status_code == 401


# -- refusals and failures ---------------------------------------------------------------------------------------


def test_a_refused_request_is_refused_at_start(srv: AppServer) -> None:
    broke, token_id = token(srv, credits="0")
    err(start(srv, broke), 403, "used_up")
    secret, _ = token(srv)
    err(start(srv, secret, model="no-such-model"), 404, "model_not_found", "model")
    err(start(srv, secret, stream=True), 400, "bad_request", "deferred")
    assert ledger(srv, token_id) == []


def test_a_backend_failure_is_answered_on_the_poll(srv: AppServer) -> None:
    secret, token_id = token(srv)
    undeferred = err(srv.chat({"model": MODEL, "messages": user("fail now")}, token=secret), FAILURE.status,
                     FAILURE.code)
    started = start(srv, secret, "fail now")
    assert started.status_code == 200, started.text  # admitted: the failure comes after, on the poll
    failed = err(poll(srv, secret, started.json()["request_id"]), FAILURE.status, FAILURE.code)
    assert failed == undeferred
    rows = [row for row in ledger(srv, token_id) if row["request_id"] == started.headers["x-request-id"]]
    assert [row["status"] for row in rows] == ["error"], rows


def test_a_tenants_pending_requests_are_capped(srv: AppServer) -> None:
    secret, _ = token(srv)
    other, _ = token(srv)
    gates = []
    ids = []
    for _ in range(2):  # deferred_max_pending=2
        prompt, gate = hold()
        gates.append(gate)
        ids.append(start(srv, secret, prompt).json()["request_id"])
    err(start(srv, secret), 429, "too_many_requests", "deferred")
    with pytest.raises(openai.RateLimitError):
        sdk(srv, secret).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                 extra_body={"deferred": True})
    assert start(srv, other).status_code == 200  # another tenant's cap is its own
    gates[0].set()
    assert poll(srv, secret, ids[0]).status_code == 200
    again = start(srv, secret)
    assert again.status_code == 200, again.text
    assert poll(srv, secret, again.json()["request_id"]).status_code == 200
    gates[1].set()
    assert poll(srv, secret, ids[1]).status_code == 200


def test_a_result_expires_after_the_retention(srv: AppServer) -> None:
    secret, _ = token(srv)
    request_id = start(srv, secret).json()["request_id"]
    assert poll(srv, secret, request_id).status_code == 200
    deferred = srv.app.state.gateway.deferred
    real = deferred.clock
    assert deferred.retention_ms == 86_400_000  # xAI's 24 h, the default
    try:
        deferred.clock = lambda: real() + deferred.retention_ms - 60_000
        assert fetch(srv, secret, request_id).status_code == 200
        deferred.clock = lambda: real() + deferred.retention_ms + 1
        err(fetch(srv, secret, request_id), 404, "not_found", "request_id")
    finally:
        deferred.clock = real


def test_a_request_past_the_deferred_timeout_fails_with_504_billed_what_it_used(tmp_path: Path) -> None:
    prompt, _gate = hold()  # never opened: only the deadline ends it
    with app_server(tmp_path, scripted_models(ScriptedProvider(script=script)),
                    deferred_timeout_seconds=0.2) as server:
        secret, token_id = token(server)
        started = start(server, secret, prompt)
        assert started.status_code == 200, started.text
        err(poll(server, secret, started.json()["request_id"]), 504, "timeout")
        rows = ledger(server, token_id)
        assert [(row["status"], row["completion_tokens"]) for row in rows] == [("client_disconnected", 1)], rows


# -- without accounts, and across a shutdown -----------------------------------------------------------------------


def test_without_accounts_results_live_in_memory(tmp_path: Path) -> None:
    with app_server(tmp_path, scripted_models(ScriptedProvider(script=script)), accounts=False) as server:
        request_id = start(server, TOKEN).json()["request_id"]
        done = poll(server, TOKEN, request_id)
        assert done.status_code == 200 and done.json()["choices"][0]["message"]["content"] == "Hello deferred"


def test_a_shutdown_settles_what_is_pending_once_and_keeps_its_failure(tmp_path: Path) -> None:
    prompt, _gate = hold()  # never opened: only the shutdown ends it
    models = scripted_models(ScriptedProvider(script=script))
    with app_server(tmp_path, models) as first:
        secret, token_id = token(first)
        started = start(first, secret, prompt)
        assert started.status_code == 200, started.text
        request_id = started.json()["request_id"]
        trace = started.headers["x-request-id"]
        assert fetch(first, secret, request_id).status_code == 202
        deferred = first.app.state.gateway.deferred
        until(lambda: deferred.pending() == 1, "the request runs")
    assert deferred.pending() == 0
    with app_server(tmp_path, scripted_models(ScriptedProvider(script=script))) as second:
        failed = err(fetch(second, secret, request_id), 503, "service_unavailable")
        assert "shut down" in failed["message"]
        rows = [row for row in ledger(second, token_id) if row["request_id"] == trace]
        assert len(rows) == 1, rows
        assert rows[0]["status"] == "client_disconnected" and rows[0]["endpoint"] == "chat", rows
        # Billed what it generated before the shutdown: "Partial", 1 token.
        assert rows[0]["completion_tokens"] == 1 and int(rows[0]["cost"]) > 0, rows
        # And a restart refuses nothing: new deferred requests run.
        again = start(second, secret)
        assert poll(second, secret, again.json()["request_id"]).status_code == 200


def test_an_answer_too_large_to_keep_is_refused_as_such_not_as_a_server_error(tmp_path: Path) -> None:
    with app_server(tmp_path, scripted_models(ScriptedProvider(text="word " * 600)),
                    max_stored_response_bytes=1024) as server:
        secret, _ = token(server)
        started = start(server, secret, max_tokens=600)  # ~3.6 KB of answer, past the 1 KiB a result may be
        assert started.status_code == 200, started.text
        err(poll(server, secret, started.json()["request_id"]), 507, "result_too_large")


def test_settings_keep_a_deferred_request_within_its_reservation_and_its_result_past_its_pending_row() -> None:
    from pydantic import ValidationError

    from grokgate.settings import Settings

    with pytest.raises(ValidationError, match="DEFERRED_TIMEOUT"):
        Settings(deferred_timeout_seconds=7200, reservation_lease_seconds=3600)
    with pytest.raises(ValidationError, match="DEFERRED_RETENTION"):
        Settings(deferred_timeout_seconds=600, deferred_retention_seconds=600)
    assert Settings().deferred_timeout_seconds < Settings().reservation_lease_seconds
