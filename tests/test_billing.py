"""Money under stress: concurrent overdraw, replicas, disconnects, crashes, and limits across replicas.

The servers this module starts itself serve grok-3 from the fake xAI upstream (`upstream_env`), not the local
model: what they show (the books, locks, crashes, shared limits) does not depend on the backend, and a fake
answer in milliseconds leaves the test's time to the money path instead of CPU generation. The shared `server`
(the local engine) keeps the race and the disconnect on the model path.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import (
    Server,
    create_key,
    raw_request,
    read_until,
    start_server,
    start_servers,
    stop_server,
    user,
)
from tests.fakes.fake_xai import FakeXAI

pytestmark = pytest.mark.e2e  # the real server, model or databases (tests/conftest.py)

CHEAP = {"model": "grok-3", "messages": user("hi"), "max_tokens": 1}
RPM_REDIS_DB = 12
FAKE_KEY = "xai-billing-key"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeXAI]:
    with FakeXAI(api_keys=[FAKE_KEY]).start() as upstream:
        yield upstream


def upstream_env(tmp: Path, fake: FakeXAI, **env: str) -> dict[str, str | None]:
    """A routing file that sends grok-3 to the fake upstream: a server without the local model."""
    path = tmp / "routing.yaml"
    path.write_text(f"""
backends:
  fake: {{kind: xai, base_url: "{fake.url}", api_key_env: XAI_FAKE}}
models:
  grok-3: [{{backend: fake}}]
""")
    return {"GROKGATE_CONFIG": str(path), "XAI_FAKE": FAKE_KEY, **env}


def admin_get(server: Server, path: str) -> Any:
    with server.client() as c:
        r = c.get(path, headers={"Authorization": f"Bearer {server.token}"})
    assert r.status_code == 200, r.text
    return r.json()


def reservation_of(server: Server, body: dict[str, Any]) -> int:
    """What admission reserves for `body` at the current grok-3 price (mirrors core.pricing)."""
    from grokgate.core.pricing import Price, max_cost, prompt_token_bound
    from grokgate.providers.router import prompt_shape
    from grokgate.schemas.chat import ChatCompletionRequest

    current = {p["model"]: p for p in admin_get(server, "/admin/prices")["current"]}["grok-3"]
    price = Price("grok-3", current["input"], current["cached_input"], current["output"])
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()  # the bytes httpx sends
    request = ChatCompletionRequest.model_validate_json(raw)
    return max_cost(prompt_token_bound(raw, prompt_shape(request)), request.choices, request.output_limit or 0,
                    price)


def fire(servers: list[Server], token: str, count: int, body: dict[str, Any]) -> list[httpx.Response]:
    """`count` requests at once, spread over the replicas, each on its own connection."""
    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
        clients = [httpx.AsyncClient(base_url=s.url, timeout=300, limits=limits) for s in servers]
        try:
            return await asyncio.gather(*(
                clients[i % len(clients)].post("/grok/chat/completions", json=body,
                                                headers={"Authorization": f"Bearer {token}"})
                for i in range(count)
            ))
        finally:
            for c in clients:
                await c.aclose()

    return asyncio.run(run())


def check_books(server: Server, key_id: int, initial: int, served: int) -> dict[str, Any]:
    key = admin_get(server, f"/admin/keys/{key_id}")
    assert key["reserved"] == 0, "every reservation was settled"
    assert key["balance"] >= 0
    usage = admin_get(server, f"/admin/usage?token={key_id}&by=model")["data"]
    charged = sum(r["cost"] for r in usage)
    assert sum(r["requests"] for r in usage) == served, "one ledger row per served request"
    assert initial - key["balance"] == charged, "the ledger's sum equals the balance moved"
    rows = admin_get(server, f"/admin/ledger?token={key_id}&limit=10000")["data"]
    assert -sum(r["amount"] for r in rows if r["kind"] == "usage") == charged
    return key


def race(servers: list[Server]) -> None:
    reservation = reservation_of(servers[0], CHEAP)
    initial = reservation * 10 + reservation // 2  # funded for about 10 requests
    from grokgate.core.accounts import format_credits

    token, key = create_key(servers[0], "racer", credits=format_credits(initial))
    responses = fire(servers, token, 200, CHEAP)
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 403}, codes
    refused = [r for r in responses if r.status_code == 403]
    assert all(r.json()["error"]["code"] == "used_up" for r in refused)
    served = codes.count(200)
    # Reservations cover the worst case, so at least the 10 funded ones run; refunds of what they did not
    # use may let a few more through, never an overdraft.
    assert served >= 10 and refused, (served, len(refused))
    check_books(servers[0], key["id"], initial, served)


def test_concurrent_requests_cannot_overdraw(server: Server) -> None:
    race([server])


def test_concurrent_requests_across_two_processes_cannot_overdraw(
        tmp_path_factory: pytest.TempPathFactory, pg_url: str, fake: FakeXAI) -> None:
    tmp = tmp_path_factory.mktemp("race-pg")
    env = upstream_env(tmp, fake, GROKGATE_DATABASE_URL=pg_url)
    a, b = start_servers(tmp, ("replica-a", ("--slots", "2"), env), ("replica-b", ("--slots", "2"), env))
    try:
        race([a, b])
    finally:
        stop_server(a)
        stop_server(b)


def test_rpm_limit_holds_across_replicas(tmp_path_factory: pytest.TempPathFactory, pg_url: str,
                                         redis_url: str, fake: FakeXAI) -> None:
    tmp = tmp_path_factory.mktemp("limits")
    # The servers' buckets are `grokgate:rl:{tok-<id>}` and a fresh database numbers tokens from 1: a Redis
    # database of this test's own, emptied of those keys first, so neither another test nor a run a minute
    # ago counts against this token (test_burst.py uses database 13 the same way).
    url = f"{redis_url.rsplit('/', 1)[0]}/{RPM_REDIS_DB}"
    with redis.Redis.from_url(url) as r:
        for key in r.scan_iter(match="grokgate:rl:*"):
            r.delete(key)
    env = upstream_env(tmp, fake, GROKGATE_DATABASE_URL=pg_url, GROKGATE_REDIS_URL=url)
    a, b = start_servers(tmp, ("limits-a", ("--slots", "2"), env), ("limits-b", ("--slots", "2"), env))
    try:
        token, _ = create_key(a, "limited", credits="10", rpm=5)
        codes = []
        limited: list[httpx.Response] = []
        for i in range(12):
            r = (a if i % 2 == 0 else b).chat(CHEAP, token=token)
            codes.append(r.status_code)
            if r.status_code == 429:
                limited.append(r)
        assert codes.count(200) == 5, codes
        assert codes.count(429) == 7
        for r in limited:
            assert r.json()["error"]["code"] == "too_many_requests"
            assert int(r.headers["retry-after"]) >= 1
            assert r.headers["x-ratelimit-limit-requests"] == "5"
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
    finally:
        stop_server(a)
        stop_server(b)


def test_unreachable_redis_fails_closed_or_open_as_configured(tmp_path_factory: pytest.TempPathFactory,
                                                              fake: FakeXAI) -> None:
    tmp = tmp_path_factory.mktemp("redis-down")
    dead = upstream_env(tmp, fake, GROKGATE_REDIS_URL="redis://127.0.0.1:1/0")
    closed, opened = start_servers(
        tmp, ("fail-closed", ("--slots", "1"), {**dead, "GROKGATE_RATE_LIMIT_STORE_ERROR": "fail_closed"}),
        ("fail-open", ("--slots", "1"), {**dead, "GROKGATE_RATE_LIMIT_STORE_ERROR": "fail_open"}))
    try:
        token, _ = create_key(closed, "k", credits="1", rpm=100)
        r = closed.chat(CHEAP, token=token)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "rate_limiter_unavailable"
        assert "retry-after" in r.headers
        token, _ = create_key(opened, "k", credits="1", rpm=100)
        assert opened.chat(CHEAP, token=token).status_code == 200
        assert "grokgate.limits" in opened.log(), "degraded decisions are logged, never silent"
    finally:
        stop_server(closed)
        stop_server(opened)


def test_disconnect_mid_stream_bills_prompt_and_generated_tokens(server: Server) -> None:
    token, key = create_key(server, "streamer", credits="1")
    body = {"model": "grok-3", "messages": user("Write a long essay about the sea."), "max_tokens": 300,
            "stream": True}
    with raw_request(server, body, token) as sock:
        received = read_until(sock, b'"content":"', 6)  # the role delta's "" does not match: 5+ tokens
        request_id = received.split(b"x-request-id: ", 1)[1].split(b"\r\n", 1)[0].decode()
    deadline = time.monotonic() + 10
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not rows:
        rows = [r for r in admin_get(server, f"/admin/ledger?token={key['id']}")["data"] if r["kind"] == "usage"]
        time.sleep(0.1)
    assert len(rows) == 1
    row = rows[0]
    assert row["request_id"] == request_id
    assert row["status"] == "client_disconnected"
    assert row["estimated"] is True
    assert row["prompt_tokens"] > 0
    assert 5 <= row["completion_tokens"] < 100, row
    assert row["cost"] > 0 and row["amount"] == -row["cost"]
    after = admin_get(server, f"/admin/keys/{key['id']}")
    assert after["reserved"] == 0, "the reservation was released"
    assert after["balance"] == 1_000_000 - row["cost"]


def test_backend_error_before_output_is_not_billed(server: Server) -> None:
    token, key = create_key(server, "too-long", credits="1")
    r = server.chat({"model": "grok-3", "messages": user("hello " * 3000), "max_tokens": 5}, token=token)
    assert r.status_code == 400
    rows = admin_get(server, f"/admin/ledger?token={key['id']}")["data"]
    usage = [row for row in rows if row["kind"] == "usage"]
    assert len(usage) == 1 and usage[0]["status"] == "error" and usage[0]["amount"] == 0
    after = admin_get(server, f"/admin/keys/{key['id']}")
    assert (after["balance"], after["reserved"]) == (1_000_000, 0)


def test_sigkill_loses_no_completed_request(tmp_path_factory: pytest.TempPathFactory, fake: FakeXAI) -> None:
    tmp = tmp_path_factory.mktemp("crash")
    env = upstream_env(tmp, fake, GROKGATE_INSTANCE_ID="crash-test")
    srv = start_server(tmp, "--slots", "4", env=env, name="crash")
    token, key = create_key(srv, "victim", credits="5")
    completed: list[str] = []
    stop = threading.Event()

    def client(i: int) -> None:
        body = {"model": "grok-3", "messages": user(f"Count to {i + 3}."), "max_tokens": 2 + i % 6,
                "stream": i % 2 == 0}
        while not stop.is_set():
            try:
                with httpx.Client(base_url=srv.url, timeout=30) as c:
                    r = c.post("/grok/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})
                if r.status_code == 200 and (r.text.endswith("data: [DONE]\n\n") if body["stream"]
                                             else "choices" in r.json()):
                    completed.append(r.headers["x-request-id"])
            except (httpx.HTTPError, json.JSONDecodeError):
                return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(completed) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    srv.process.send_signal(signal.SIGKILL)
    srv.process.wait()
    stop.set()
    for t in threads:
        t.join()
    assert len(completed) >= 6
    data_env = {**env}
    again = start_server(tmp, "--slots", "2", env=data_env, name="crash")  # same data dir, same instance id
    try:
        rows = admin_get(again, f"/admin/ledger?token={key['id']}&limit=10000")["data"]
        in_ledger = {r["request_id"] for r in rows}
        missing = [rid for rid in completed if rid not in in_ledger]
        assert not missing, f"completed requests missing from the ledger: {missing}"
        usage_rows = [r for r in rows if r["kind"] == "usage"]
        check_books(again, key["id"], 5_000_000, len(usage_rows))
    finally:
        stop_server(again)


def test_one_serving_process_per_sqlite_file(tmp_path_factory: pytest.TempPathFactory, fake: FakeXAI) -> None:
    """Reservations on SQLite live in the serving process's memory, so a second one must not start on it."""
    tmp = tmp_path_factory.mktemp("sqlite-lock")
    env = upstream_env(tmp, fake, GROKGATE_DATA_DIR=str(tmp / "shared-data"))
    first = start_server(tmp, "--slots", "1", env=env, name="first")
    try:
        with pytest.raises(RuntimeError, match="several processes need PostgreSQL"):
            start_server(tmp, "--slots", "1", env=env, name="second")
    finally:
        stop_server(first)

