"""Refused requests count against a token's limits, and a large body is parsed only for a token that can be
served, off the event loop (api/body.py, core/billing.py `AccountAdmission`'s gate, the limiters'
`count_refusal` and `peek`).

The app runs in process (tests/inproc.py) with accounts on (SQLite) and a scripted provider; the limiter is the
in-process one, or Redis for the tests marked e2e. Which thread parsed a body, and whether it was parsed at all,
is seen by wrapping api/body.py's parsers (the server runs in a thread of this process).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis

from grokgate.api import body as body_module
from grokgate.core.admission import Principal
from grokgate.core.billing import AccountAdmission
from grokgate.core.errors import GatewayError
from grokgate.core.events import Delta, Event, Finish, Usage, UsageReport
from grokgate.core.limits import Decision, Limits, RateLimiter
from grokgate.schemas.chat import ChatCompletionRequest
from grokgate.store.limits_memory import MemoryRateLimiter
from grokgate.store.limits_redis import RedisRateLimiter
from tests.conftest import E2E, REDIS_URL, TOKEN, create_key, err, ok, user
from tests.inproc import AppServer, ScriptedProvider, app_server, scripted_models

FAST = "grok-4-1-fast"
MAX_JSON_DEPTH = 200  # api/errors.py: what pydantic-core's JSON parser takes
OFFLOAD = 16 * 1024  # the apps' parse_offload_bytes: bodies above it are "large"
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def invalid(size: int = 0) -> dict[str, Any]:
    """A body refused by validation (`max_tokens: -1`, item 12's), padded with an unknown field to about `size`
    bytes (unknown fields are kept, so the whole of it is parsed)."""
    return {"model": FAST, "messages": user("hi"), "max_tokens": -1, "x": [1] * (size // 2)}


def large_valid(marker: str = "") -> dict[str, Any]:
    return {"model": FAST, "messages": user(f"{marker} " + "word " * (OFFLOAD // 4)), "max_tokens": 2}


def post(srv: AppServer, body: dict[str, Any], token: str, path: str = "/v1/chat/completions") -> httpx.Response:
    return srv.chat(body, token=token, path=path)


# -- the app -------------------------------------------------------------------------------------------------

async def script(request: ChatCompletionRequest, model: str) -> AsyncGenerator[Event]:
    """Model "grok-3" is refused by its upstream after admission (a 400 before any output); the others answer."""
    if model == "grok-3":
        raise GatewayError(400, "bad_request", "The upstream refused the request.")
    yield Delta(0, "Hello")
    yield Finish(0, "stop")
    yield UsageReport(Usage(prompt_tokens=7, completion_tokens=1))


@pytest.fixture(scope="module", params=["memory", pytest.param("redis", marks=E2E)])
def srv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    settings: dict[str, Any] = {"parse_offload_bytes": OFFLOAD}
    prefix = f"grokgate-test:{uuid.uuid4().hex}:"
    if request.param == "redis":
        try:
            redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            pytest.skip(f"Redis is not reachable at {REDIS_URL}: {exc}")
        settings.update(redis_url=REDIS_URL, redis_key_prefix=prefix)
    try:
        with app_server(tmp_path_factory.mktemp(f"refused-{request.param}"),
                        scripted_models(ScriptedProvider(script=script)), **settings) as server:
            yield server
    finally:
        if request.param == "redis":
            with redis.Redis.from_url(REDIS_URL) as r:
                for key in r.scan_iter(match=f"{prefix}*"):
                    r.delete(key)


def token(srv: AppServer, credits: str | None = None, **fields: Any) -> str:
    secret, _ = create_key(srv, f"t-{uuid.uuid4().hex[:10]}", credits, **fields)  # type: ignore[arg-type]
    return secret


@dataclass
class Parses:
    """Every call of api/body.py's parsers: the thread it ran in, and the body's first bytes."""

    threads: list[str] = field(default_factory=list)
    hook: Callable[[bytes], None] | None = None

    def wrap(self, real: Callable[[bytes, int], Any]) -> Callable[[bytes, int], Any]:
        def parse(raw: bytes, max_messages: int) -> Any:
            self.threads.append(threading.current_thread().name)
            if self.hook is not None:
                self.hook(raw)
            return real(raw, max_messages)
        return parse


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Parses:
    seen = Parses()
    monkeypatch.setattr(body_module, "parse_raw", seen.wrap(body_module.parse_raw))
    monkeypatch.setattr(body_module, "parse_responses_raw", seen.wrap(body_module.parse_responses_raw))
    return seen


# -- refused requests count against the rpm ------------------------------------------------------------------

REFUSALS: dict[str, tuple[dict[str, Any], int, str]] = {
    "invalid body": (invalid(), 400, "bad_request"),
    "unknown model": ({"model": "no-such-model", "messages": user("hi")}, 404, "model_not_found"),
    "model not allowed": ({"model": "grok-3", "messages": user("hi"), "max_tokens": 1}, 403, "model_not_allowed"),
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_refused_requests_count_against_the_rpm(srv: AppServer, kind: str) -> None:
    body, status, code = REFUSALS[kind]
    limited = token(srv, rpm=5, allowed_models=[FAST])  # no credits, as in the issue
    for _ in range(5):
        err(post(srv, body, limited), status, code)
    refused = post(srv, body, limited)
    assert err(refused, 429, "too_many_requests")["message"] == "You have exceeded the rate limit."
    assert 1 <= int(refused.headers["retry-after"]) <= 12  # one request back every 12 s at rpm 5
    assert refused.headers["x-ratelimit-limit-requests"] == "5"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # Another token of the same limits is not touched.
    err(post(srv, body, token(srv, rpm=5, allowed_models=[FAST])), status, code)


def test_refused_responses_requests_count_against_the_rpm(srv: AppServer) -> None:
    limited = token(srv, rpm=2)
    body = {"model": FAST, "input": "hi", "max_output_tokens": -1}
    for _ in range(2):
        err(post(srv, body, limited, "/v1/responses"), 400, "bad_request")
    err(post(srv, body, limited, "/v1/responses"), 429, "too_many_requests")
    # The rpm is the token's, whichever API its requests came through.
    err(post(srv, invalid(), limited), 429, "too_many_requests")


def test_a_token_past_its_rpm_is_refused_before_its_body_is_parsed(srv: AppServer, parses: Parses) -> None:
    limited = token(srv, rpm=2)
    assert [post(srv, invalid(), limited).status_code for _ in range(3)] == [400, 400, 429]
    assert len(parses.threads) == 3  # the third was parsed, refused, and found past the rpm
    for _ in range(3):
        refused = post(srv, invalid(), limited)
        err(refused, 429, "too_many_requests")
        assert refused.headers.get("connection") != "close"  # a small body: the connection is kept
    refused = post(srv, invalid(OFFLOAD * 4), limited)
    err(refused, 429, "too_many_requests")
    assert refused.headers["connection"] == "close"  # rather than receiving a large body only to drop it
    assert len(parses.threads) == 3


def test_a_request_the_limiter_counted_is_not_counted_again(srv: AppServer) -> None:
    # Admitted, then refused upstream before any output: the admission counted it, its error does not again.
    funded = token(srv, "100", rpm=2)
    for _ in range(2):
        err(post(srv, {"model": "grok-3", "messages": user("hi"), "max_tokens": 1}, funded), 400, "bad_request")
    err(post(srv, {"model": "grok-3", "messages": user("hi"), "max_tokens": 1}, funded), 429, "too_many_requests")
    # Refused for credits after the limiter let it through: counted once too.
    broke = token(srv, rpm=2)
    for _ in range(2):
        err(post(srv, {"model": FAST, "messages": user("hi"), "max_tokens": 1}, broke), 403, "used_up")
    err(post(srv, {"model": FAST, "messages": user("hi"), "max_tokens": 1}, broke), 429, "too_many_requests")


def test_tokens_without_an_rpm_and_the_admin_are_not_limited_by_refusals(srv: AppServer) -> None:
    unlimited = token(srv)
    for who in (unlimited, TOKEN):
        for _ in range(8):
            err(post(srv, invalid(), who), 400, "bad_request")


# -- large bodies: parsed only for a token that can be served, off the event loop ----------------------------

def test_a_large_body_of_a_token_without_credits_is_refused_unparsed(srv: AppServer, parses: Parses) -> None:
    broke = token(srv)
    for path, body in (("/v1/chat/completions", invalid(OFFLOAD * 4)),
                       ("/v1/responses", {"model": FAST, "input": "hi " * OFFLOAD, "max_output_tokens": 1})):
        refused = post(srv, body, broke, path)
        assert err(refused, 403, "used_up")["message"].startswith("Your balance is not sufficient")
    assert parses.threads == []
    # A small body of the same token is parsed (and refused by validation); the admin's large body is parsed.
    err(post(srv, invalid(), broke), 400, "bad_request")
    err(post(srv, invalid(OFFLOAD * 4), TOKEN), 400, "bad_request")
    assert len(parses.threads) == 2


def test_large_bodies_of_a_token_without_credits_count_against_its_rpm(srv: AppServer, parses: Parses) -> None:
    broke = token(srv, rpm=3)
    for _ in range(3):
        err(post(srv, invalid(OFFLOAD * 4), broke), 403, "used_up")
    err(post(srv, invalid(OFFLOAD * 4), broke), 429, "too_many_requests")
    assert parses.threads == []


def test_a_large_body_is_parsed_off_the_event_loop(srv: AppServer, parses: Parses) -> None:
    funded = token(srv, "100000", rpm=100)
    answer = ok(post(srv, large_valid(), funded))
    assert answer["choices"][0]["message"]["content"]
    err(post(srv, invalid(OFFLOAD * 4), funded), 400, "bad_request")  # a large invalid body: the same way
    ok(post(srv, {"model": FAST, "input": "hi " * OFFLOAD, "max_output_tokens": 16}, funded, "/v1/responses"))
    ok(post(srv, {"model": FAST, "messages": user("hi"), "max_tokens": 2}, funded))  # small: on the loop
    large, small = parses.threads[:3], parses.threads[3]
    assert all(name.startswith("grokgate-parse") for name in large), parses.threads
    assert small.startswith("in-process-app"), parses.threads


def test_one_tenants_large_bodies_are_parsed_one_at_a_time(srv: AppServer, parses: Parses) -> None:
    """Two large bodies of tenant A at once, then one of B: A's second waits for A's first, B's does not."""
    a, b = token(srv, "100000"), token(srv, "100000")
    release = threading.Event()
    entered: list[str] = []
    lock = threading.Lock()

    def hold(raw: bytes) -> None:
        marker = next(m for m in ("A1", "A2", "B1") if m.encode() in raw)
        with lock:
            entered.append(marker)
        assert release.wait(30), "the test never released the parsers"

    def until(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 20
        while not condition():
            assert time.monotonic() < deadline, f"{what}: entered {entered}"
            time.sleep(0.01)

    parses.hook = hold
    with ThreadPoolExecutor(3) as pool:
        try:
            first = [pool.submit(post, srv, large_valid("A1"), a), pool.submit(post, srv, large_valid("A2"), a)]
            until(lambda: len(entered) >= 1, "no parse of A started")
            later = pool.submit(post, srv, large_valid("B1"), b)
            until(lambda: "B1" in entered, "B's parse did not start beside A's")
            assert sorted(entered) in (["A1", "B1"], ["A2", "B1"])  # one of A's, not both
        finally:
            release.set()
        for done in [*first, later]:
            ok(done.result())
    assert sorted(entered) == ["A1", "A2", "B1"]


# -- JSON nested too deeply ----------------------------------------------------------------------------------

def test_json_nested_too_deeply_is_called_so(srv: AppServer) -> None:
    def nested(depth: int) -> bytes:
        return (b'{"model":"' + FAST.encode() + b'","messages":[{"role":"user","content":"hi"}],"max_tokens":1,'
                b'"x":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}")

    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    with srv.client() as c:
        ok(c.post("/v1/chat/completions", content=nested(MAX_JSON_DEPTH - 1), headers=headers))
        for depth in (MAX_JSON_DEPTH + 1, 5000):
            error = err(c.post("/v1/chat/completions", content=nested(depth), headers=headers), 400, "bad_request")
            assert error["message"] == ("The request body is nested too deeply: at most 200 levels of arrays and "
                                        "objects are accepted.")
        error = err(c.post("/v1/chat/completions", content=b'{"model": [', headers=headers), 400, "bad_request")
        assert error["message"] == "The request body is not valid JSON."


# -- the limiters' new operations ----------------------------------------------------------------------------

@pytest.fixture(params=["memory", pytest.param("redis", marks=E2E)])
def make(request: pytest.FixtureRequest) -> Iterator[Callable[[], RateLimiter]]:
    if request.param == "memory":
        yield MemoryRateLimiter
        return
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        pytest.skip(f"Redis is not reachable at {REDIS_URL}: {exc}")
    prefix = f"grokgate-test:{uuid.uuid4().hex}:"
    yield lambda: RedisRateLimiter(REDIS_URL, key_prefix=prefix)
    with redis.Redis.from_url(REDIS_URL) as r:
        for key in r.scan_iter(match=f"{prefix}*"):
            r.delete(key)


def test_a_refusal_takes_one_request_of_the_rpm_and_nothing_else(make: Callable[[], RateLimiter]) -> None:
    limits = Limits(rpm=2, tpm=100, concurrency=1)

    async def run() -> list[Decision]:
        lim = make()
        try:
            return [await lim.count_refusal("k", limits), await lim.acquire("k", "r1", limits, 100),
                    await lim.count_refusal("k", limits), await lim.peek("k", limits)]
        finally:
            await lim.close()

    refusal, admitted, past, peeked = asyncio.run(run())
    assert (refusal.allowed, refusal.reason) == (True, None)
    # The whole tpm and the one concurrency slot were still free; the rpm had one request left.
    assert (admitted.allowed, admitted.headers["x-ratelimit-remaining-requests"]) == (True, "0")
    assert (past.allowed, past.reason, past.headers["retry-after"]) == (False, "rpm", "30")
    assert not any("tokens" in h for h in past.headers)
    assert (peeked.allowed, peeked.reason) == (False, "rpm")


def test_peek_records_nothing(make: Callable[[], RateLimiter]) -> None:
    limits = Limits(rpm=1)

    async def run() -> list[Decision]:
        lim = make()
        try:
            peeks = [await lim.peek("k", limits) for _ in range(3)]
            return [*peeks, await lim.acquire("k", "r1", limits, 1), await lim.peek("k", limits)]
        finally:
            await lim.close()

    *peeks, admitted, after = asyncio.run(run())
    assert all(d.allowed for d in peeks) and admitted.allowed
    assert (after.allowed, after.reason) == (False, "rpm")


def test_without_an_rpm_refusals_are_not_counted(make: Callable[[], RateLimiter]) -> None:
    async def run() -> list[Decision]:
        lim = make()
        try:
            return [await lim.count_refusal("k", Limits(tpm=10, concurrency=1)) for _ in range(5)]
        finally:
            await lim.close()

    assert all(d.allowed and d.headers == {} for d in asyncio.run(run()))


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
def test_a_refusal_keeps_its_answer_when_redis_is_unreachable(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    """The refusal path never turns a 400 into a 503: the limit store's state only decides 429 or not."""
    principal = Principal(key_id="tok-1", token_id=1, limits=Limits(rpm=1), balance=0)
    error = GatewayError(400, "bad_request", "Invalid 'max_tokens'.")

    async def run() -> tuple[Decision, GatewayError, int]:
        lim = RedisRateLimiter(DEAD_REDIS_URL, on_store_error=mode)  # type: ignore[arg-type]
        admission = AccountAdmission(None, lim, [])  # type: ignore[arg-type]  (no store is reached)
        try:
            return await lim.count_refusal("k", Limits(rpm=1)), await admission.refused(principal, "r", error), \
                lim.degraded_total
        finally:
            await lim.close()

    with caplog.at_level(logging.WARNING, logger="grokgate.limits"):
        decision, answered, degraded = asyncio.run(run())
    assert decision.reason == "store_unavailable" and decision.allowed == (mode == "fail_open")
    assert answered is error
    assert degraded == 2


def test_the_precheck_refuses_only_while_the_bucket_would() -> None:
    """What `precheck` notes from a refusal drains as the bucket does: no longer than the retry-after."""
    now = [1000.0]
    lim = MemoryRateLimiter(clock=lambda: now[0])
    admission = AccountAdmission(None, lim, [], clock=lambda: now[0])  # type: ignore[arg-type]  (no store)
    principal = Principal(key_id="tok-1", token_id=1, limits=Limits(rpm=60), balance=0)
    error = GatewayError(400, "bad_request", "Invalid 'max_tokens'.")

    async def run() -> list[int]:
        return [(await admission.refused(principal, f"r{i}", error)).status for i in range(61)]

    assert asyncio.run(run()) == [400] * 60 + [429]
    admission.precheck(Principal(key_id="tok-2", token_id=2, limits=Limits(rpm=60), balance=0))  # another key
    now[0] += 0.999
    with pytest.raises(GatewayError) as refused:
        admission.precheck(principal)
    assert (refused.value.status, refused.value.headers["retry-after"]) == (429, "1")
    now[0] += 0.001  # one request's worth has drained: the bucket would take one
    admission.precheck(principal)
    assert asyncio.run(lim.peek("tok-1", Limits(rpm=60))).allowed


def test_the_precheck_forgets_a_note_when_the_limits_change() -> None:
    now = [1000.0]
    lim = MemoryRateLimiter(clock=lambda: now[0])
    admission = AccountAdmission(None, lim, [], clock=lambda: now[0])  # type: ignore[arg-type]  (no store)
    principal = Principal(key_id="tok-1", token_id=1, limits=Limits(rpm=1), balance=0)
    error = GatewayError(404, "model_not_found", "No such model.")

    async def run() -> list[int]:
        return [(await admission.refused(principal, f"r{i}", error)).status for i in range(2)]

    assert asyncio.run(run()) == [404, 429]
    with pytest.raises(GatewayError):
        admission.precheck(principal)
    admission.precheck(Principal(key_id="tok-1", token_id=1, limits=Limits(rpm=100), balance=0))
