"""The exact response cache (issue 13, item 6): opt-in per model in the routing file and per request, scoped to
the token, replayed through the same lifecycle (streamed or not), billed at the hit rate and marked in the ledger,
the metrics and the `x-grokgate-cache` header; in memory, or in Redis shared by replicas.

In-process tier (tests/inproc.py: the real app over HTTP, a scripted provider), except the Redis test, which is
e2e by its fixture and skips when Redis is absent."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from grokgate.core.errors import GatewayError
from grokgate.core.events import Delta, Event, Finish, Usage, UsageReport
from grokgate.core.pricing import Price, cache_hit_cost, cost_of, default_prices
from grokgate.core.response_cache import CacheOption, CacheRule, effective_ttl, is_sampled, parse_option
from grokgate.providers.base import Call
from grokgate.routing import ConfigError, parse
from grokgate.schemas.chat import ChatCompletionRequest
from grokgate.serving.response_cache import FORMAT, complete, decode, encode
from grokgate.store.response_cache_memory import ENTRY_OVERHEAD, MemoryResponseCache
from tests.conftest import create_key, err, user
from tests.inproc import PROMPT_TOKENS, AppServer, ScriptedProvider, app_server, scripted_models

ROUTING = """
backends: {local: {kind: local}}
models:
  grok-3: [{backend: local}]
  grok-4: [{backend: local}]
  grok-3-mini: [{backend: local}]
cache:
  grok-3: {ttl: 600, max_ttl: 3600}
  grok-4: {ttl: 600, cache_sampled: true}
"""
BODY: dict[str, Any] = {"model": "grok-3", "messages": user("What is 2+2?"), "temperature": 0, "max_tokens": 16}
REDIS_DB = 11  # no other test uses it


def routing_file(tmp: Path, text: str = ROUTING) -> Path:
    path = tmp / "routing.yaml"
    path.write_text(text)
    return path


@contextmanager
def cached_app(tmp: Path, provider: ScriptedProvider | None = None, **settings: Any) -> Iterator[AppServer]:
    provider = provider or ScriptedProvider()
    with app_server(tmp, scripted_models(provider), config=routing_file(tmp), **settings) as srv:
        srv.extra["provider"] = provider
        yield srv


def post(srv: AppServer, body: dict[str, Any], token: str | None = None, cache: str | None = None,
         path: str = "/grok/chat/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or srv.token}"}
    if cache is not None:
        headers["x-grokgate-cache"] = cache
    with srv.client() as c:
        return c.post(path, json=body, headers=headers)


def streamed(srv: AppServer, body: dict[str, Any], token: str | None = None) -> tuple[httpx.Headers, str, Any]:
    """A streamed request's headers, its text, and its usage chunk."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    text, usage = "", None
    with srv.client() as c, c.stream("POST", "/grok/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer {token or srv.token}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", ()):  # an error event has none
                text += choice["delta"].get("content") or ""
            if chunk.get("usage"):
                usage = chunk["usage"]
        return r.headers, text, usage


def calls(srv: AppServer) -> int:
    provider: ScriptedProvider = srv.extra["provider"]
    return len(provider.requests)


def admin_json(srv: AppServer, path: str) -> Any:
    with srv.client() as c:
        r = c.get(path, headers={"Authorization": f"Bearer {srv.token}"})
    assert r.status_code == 200, r.text
    return r.json()


# -- over HTTP, in memory -------------------------------------------------------------------------------------------


def test_a_hit_replays_the_same_content_and_usage(tmp_path: Path) -> None:
    with cached_app(tmp_path) as srv:
        first = post(srv, BODY)
        second = post(srv, BODY)
        assert first.status_code == second.status_code == 200, (first.text, second.text)
        assert first.headers["x-grokgate-cache"] == "miss"
        assert second.headers["x-grokgate-cache"] == "hit"
        assert calls(srv) == 1  # the backend saw only the miss
        a, b = first.json(), second.json()
        assert b["choices"] == a["choices"]
        assert b["usage"] == a["usage"]
        assert b["system_fingerprint"] == a["system_fingerprint"]
        assert b["id"] != a["id"]  # a new completion, with the old answer


def test_a_stored_stream_answers_a_collected_request_and_the_reverse(tmp_path: Path) -> None:
    with cached_app(tmp_path) as srv:
        headers, text, usage = streamed(srv, BODY)
        assert headers["x-grokgate-cache"] == "miss"
        collected = post(srv, BODY)
        assert collected.headers["x-grokgate-cache"] == "hit"
        assert collected.json()["choices"][0]["message"]["content"] == text == "Hello from the script"
        assert collected.json()["usage"] == usage
        other = {**BODY, "messages": user("Another question")}
        assert post(srv, other).headers["x-grokgate-cache"] == "miss"
        headers, text, usage = streamed(srv, other)
        assert headers["x-grokgate-cache"] == "hit"
        assert text == "Hello from the script" and usage["completion_tokens"] == 4
        assert calls(srv) == 2


def test_n_choices_and_tool_calls_replay_whole(tmp_path: Path) -> None:
    async def script(request: ChatCompletionRequest, model: str) -> AsyncGenerator[Event]:
        for i in range(request.choices):
            yield Delta(i, content=f"choice {i}")
            yield Delta(i, tool_calls=[{"index": 0, "id": f"call_{i}", "type": "function",
                                        "function": {"name": "f", "arguments": "{}"}}])
            yield Finish(i, "tool_calls")
        yield UsageReport(Usage(prompt_tokens=9, completion_tokens=6, cached_tokens=2))

    with cached_app(tmp_path, ScriptedProvider(script=script)) as srv:
        body = {**BODY, "n": 2, "tools": [{"type": "function", "function": {"name": "f"}}]}
        first, second = post(srv, body).json(), post(srv, body).json()
        assert second["choices"] == first["choices"] and len(first["choices"]) == 2
        assert second["choices"][1]["message"]["tool_calls"][0]["id"] == "call_1"
        assert second["usage"] == first["usage"]
        assert calls(srv) == 1


def test_a_model_without_a_rule_is_never_cached(tmp_path: Path) -> None:
    with cached_app(tmp_path) as srv:
        body = {**BODY, "model": "grok-3-mini"}
        responses = [post(srv, body) for _ in range(2)]
        assert all("x-grokgate-cache" not in r.headers for r in responses)
        assert calls(srv) == 2


def test_never_across_tokens(tmp_path: Path) -> None:
    with cached_app(tmp_path) as srv:
        alice, _ = create_key(srv, "alice", credits="10")
        bob, _ = create_key(srv, "bob", credits="10")
        assert post(srv, BODY, alice).headers["x-grokgate-cache"] == "miss"
        assert post(srv, BODY, bob).headers["x-grokgate-cache"] == "miss"  # not alice's answer
        assert post(srv, BODY, alice).headers["x-grokgate-cache"] == "hit"
        assert post(srv, BODY, bob).headers["x-grokgate-cache"] == "hit"
        assert post(srv, BODY).headers["x-grokgate-cache"] == "miss"  # the admin key is a third owner
        assert calls(srv) == 3


def test_off_per_request_and_a_bad_header_is_a_400(tmp_path: Path) -> None:
    with cached_app(tmp_path) as srv:
        assert post(srv, BODY).headers["x-grokgate-cache"] == "miss"
        off = post(srv, BODY, cache="off")
        assert off.status_code == 200 and "x-grokgate-cache" not in off.headers
        assert calls(srv) == 2  # the stored answer was not used
        assert post(srv, BODY, cache="ttl=60").headers["x-grokgate-cache"] == "hit"
        other = {**BODY, "messages": user("Not kept")}
        assert "x-grokgate-cache" not in post(srv, other, cache="OFF").headers
        assert post(srv, other).headers["x-grokgate-cache"] == "miss"  # `off` wrote nothing either
        assert calls(srv) == 4
        for bad in ("ttl=0", "ttl=-5", "forever", "ttl=99999999999"):
            err(post(srv, BODY, cache=bad), 400, "bad_request", param="x-grokgate-cache")
            err(post(srv, {"model": "grok-3", "input": "hi"}, cache=bad, path="/v1/responses"), 400, "bad_request",
                param="x-grokgate-cache")


def test_sampled_requests_are_cached_only_when_the_rule_says_so(tmp_path: Path) -> None:
    with cached_app(tmp_path) as srv:
        for body in ({**BODY, "temperature": 0.7}, {k: v for k, v in BODY.items() if k != "temperature"}):
            responses = [post(srv, body) for _ in range(2)]
            assert all("x-grokgate-cache" not in r.headers for r in responses)
        assert calls(srv) == 4
        seeded = {**BODY, "temperature": 0.7, "seed": 42}  # a seed pins the answer: cached
        assert [post(srv, seeded).headers["x-grokgate-cache"] for _ in range(2)] == ["miss", "hit"]
        sampled = {**BODY, "model": "grok-4", "temperature": 0.9}  # grok-4's rule: cache_sampled
        assert [post(srv, sampled).headers["x-grokgate-cache"] for _ in range(2)] == ["miss", "hit"]
        assert calls(srv) == 6


def test_an_answer_expires(tmp_path: Path) -> None:
    with cached_app(tmp_path) as srv:
        assert post(srv, BODY, cache="ttl=1").headers["x-grokgate-cache"] == "miss"
        assert post(srv, BODY).headers["x-grokgate-cache"] == "hit"
        time.sleep(1.1)
        assert post(srv, BODY).headers["x-grokgate-cache"] == "miss"
        assert calls(srv) == 2


def test_failed_or_cut_answers_are_not_kept(tmp_path: Path) -> None:
    async def script(request: ChatCompletionRequest, model: str) -> AsyncGenerator[Event]:
        yield Delta(0, content="partial")
        raise GatewayError(502, "upstream_error", "the backend broke")

    with cached_app(tmp_path, ScriptedProvider(script=script)) as srv:
        for _ in range(2):
            headers, text, _ = streamed(srv, BODY)
            assert headers["x-grokgate-cache"] == "miss" and text == "partial"
        assert calls(srv) == 2


def test_hits_are_billed_at_the_cached_input_price_and_marked_in_the_ledger(tmp_path: Path) -> None:
    with cached_app(tmp_path) as srv:
        token, key = create_key(srv, "payer", credits="10")
        assert post(srv, BODY, token).headers["x-grokgate-cache"] == "miss"
        assert post(srv, BODY, token).headers["x-grokgate-cache"] == "hit"
        headers, _, _ = streamed(srv, BODY, token)
        assert headers["x-grokgate-cache"] == "hit"
        rows = [r for r in admin_json(srv, f"/admin/ledger?token={key['id']}")["data"] if r["kind"] == "usage"]
        by_backend = sorted((r["backend"], r["cost"], r["prompt_tokens"], r["completion_tokens"]) for r in rows)
        price = {p.model: p for p in default_prices(["grok-3"], 1.0)}["grok-3"]
        full = cost_of(Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=4), price).total
        hit = -(-PROMPT_TOKENS * price.cached_input // 1_000_000)
        assert by_backend == [("cache", hit, PROMPT_TOKENS, 4), ("cache", hit, PROMPT_TOKENS, 4),
                              ("scripted", full, PROMPT_TOKENS, 4)]
        assert 0 < hit < full
        balance = admin_json(srv, f"/admin/keys/{key['id']}")["balance"]
        assert balance == 10_000_000 - full - 2 * hit
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'grokgate_response_cache_total{model="grok-3",result="hit"} 2.0' in metrics
        assert 'grokgate_response_cache_total{model="grok-3",result="miss"} 1.0' in metrics
        assert 'grokgate_response_cache_total{model="grok-3",result="stored"} 1.0' in metrics
        assert 'grokgate_requests_total{backend="cache",endpoint="chat",model="grok-3",status="200"} 2.0' in metrics


def test_hits_and_replays_are_known_by_the_generation_not_by_a_backend_name(tmp_path: Path) -> None:
    """A live backend an operator happened to name `cache` or `replay:...` is billed as live. Before: billing read
    the backend's name, so a live answer of a backend named `cache` was billed at the cached-input price, and one
    named `replay:x` times the replay price factor (free with GROKGATE_REPLAY_PRICE_FACTOR=0)."""
    price = {p.model: p for p in default_prices(["grok-3"], 1.0)}["grok-3"]
    full = cost_of(Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=4), price).total
    for name in ("cache", "replay:xai"):
        with app_server(tmp_path / name.replace(":", "-"), scripted_models(ScriptedProvider(name)),
                        replay_price_factor=0) as srv:
            token, key = create_key(srv, "payer", credits="10")
            assert srv.chat(BODY, token=token).status_code == 200
            rows = [r for r in admin_json(srv, f"/admin/ledger?token={key['id']}")["data"] if r["kind"] == "usage"]
            assert [(r["backend"], r["cost"]) for r in rows] == [(name, full)]


def test_the_hit_price_is_configurable(tmp_path: Path) -> None:
    with cached_app(tmp_path, response_cache_hit_price="free") as srv:
        token, key = create_key(srv, "payer", credits="10")
        post(srv, BODY, token)
        assert post(srv, BODY, token).headers["x-grokgate-cache"] == "hit"
        rows = [r for r in admin_json(srv, f"/admin/ledger?token={key['id']}")["data"] if r["kind"] == "usage"]
        assert sorted(r["cost"] for r in rows if r["backend"] == "cache") == [0]


def test_a_field_grokgate_does_not_know_is_part_of_the_key(tmp_path: Path) -> None:
    """Unknown fields are forwarded (an upstream may honour them: vLLM's `guided_choice`), so they decide the answer
    and the key. Before: the key dropped them, and `guided_choice: ["second"]` was answered "first" from the cache."""
    provider = ScriptedProvider()

    async def echo(request: ChatCompletionRequest, model: str) -> AsyncGenerator[Event]:
        choice = (request.model_extra or {}).get("guided_choice") or ["free text"]
        yield Delta(0, content=str(choice[0]))
        yield Finish(0, "stop")
        yield UsageReport(Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=1))

    provider.script = echo
    with cached_app(tmp_path, provider) as srv:
        answers = [post(srv, {**BODY, "guided_choice": [choice]}) for choice in ("first", "second")]
        assert [r.json()["choices"][0]["message"]["content"] for r in answers] == ["first", "second"]
        assert [r.headers["x-grokgate-cache"] for r in answers] == ["miss", "miss"]
        plain = post(srv, BODY)
        assert (plain.headers["x-grokgate-cache"], plain.json()["choices"][0]["message"]["content"]) == (
            "miss", "free text")
        again = post(srv, {**BODY, "guided_choice": ["second"]})
        assert (again.headers["x-grokgate-cache"], again.json()["choices"][0]["message"]["content"]) == (
            "hit", "second")
        # What does not change the answer still shares it: how it is delivered, and the prompt-cache hint.
        delivered = post(srv, {**BODY, "prompt_cache_key": "conv-1", "stream": False})
        assert delivered.headers["x-grokgate-cache"] == "hit"


def test_a_streamed_hit_cut_short_is_billed_what_it_delivered(tmp_path: Path) -> None:
    """At the full hit price, a client that reads part of a long cached stream and hangs up pays for the part it
    read (the prompt, and the output in the share of its text that went out). Before: it paid nothing."""
    words = 60_000
    provider = ScriptedProvider(text=" ".join(f"w{i % 10}" for i in range(words)))
    with cached_app(tmp_path, provider, response_cache_hit_price="full",
                    response_cache_max_entry_bytes=256 * 1024 * 1024) as srv:
        secret, key = create_key(srv, "reader", credits="1000")  # type: ignore[arg-type]
        body = {**BODY, "max_tokens": words + 10}
        assert post(srv, body, token=secret).headers["x-grokgate-cache"] == "miss"
        whole = post(srv, body, token=secret)
        assert whole.headers["x-grokgate-cache"] == "hit"
        with srv.client() as c, c.stream("POST", "/grok/chat/completions", json={**body, "stream": True},
                                         headers={"Authorization": f"Bearer {secret}"}) as r:
            assert r.headers["x-grokgate-cache"] == "hit"
            lines = r.iter_lines()
            for _ in range(200):  # a little of it, then the client goes away
                next(lines)
        deadline = time.monotonic() + 10
        while True:
            rows = [row for row in admin_json(srv, f"/admin/ledger?token={key['id']}")["data"]
                    if row["kind"] == "usage"]
            if len(rows) == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        cut, full_hit = rows[0], rows[1]  # newest first
        assert (cut["backend"], cut["status"]) == ("cache", "client_disconnected")
        assert full_hit["status"] == "ok" and full_hit["completion_tokens"] == words
        assert 0 < cut["cost"] < full_hit["cost"]
        assert 0 < cut["completion_tokens"] < words and cut["prompt_tokens"] == full_hit["prompt_tokens"]


def test_an_entry_with_more_output_than_this_request_reserved_is_a_miss() -> None:
    """Requests of one key are held to the same output cap, unless the policy changed meanwhile (a lower
    GROKGATE_DEFAULT_OUTPUT_RESERVATION after a restart, replicas set apart, over a Redis kept for days): an entry
    with more output than this request reserved would be billed past its reservation at the full hit price.
    Before: a hit; now a miss, generated under the cap."""
    from grokgate.observability.metrics import Metrics
    from grokgate.serving.response_cache import ResponseCache

    cache = ResponseCache(MemoryResponseCache(max_bytes=1 << 20), {}, Metrics())
    events: list[Event] = [Delta(0, "four words stored here"), Finish(0, "stop"),
                           UsageReport(Usage(prompt_tokens=7, completion_tokens=4))]

    def held(limit: int) -> Call:
        return Call(ChatCompletionRequest.model_validate(BODY), "key:k").admitted(limit, None, None)

    def counted(result: str) -> float:
        return cache.counter.labels("grok-3", result)._value.get()  # type: ignore[no-any-return]

    async def run() -> None:
        await cache.keep("k", "grok-3", 600, events, "fp", 1)
        assert await cache.lookup("k", held(3)) is None and counted("miss") == 1
        assert await cache.lookup("k", held(4)) == (events, "fp") and counted("hit") == 1

    asyncio.run(run())


def test_responses_api_hits_too(tmp_path: Path) -> None:
    with cached_app(tmp_path) as srv:
        body = {"model": "grok-3", "input": "What is 2+2?", "temperature": 0, "max_output_tokens": 16}
        first = post(srv, body, path="/v1/responses")
        second = post(srv, body, path="/v1/responses")
        assert first.status_code == second.status_code == 200, (first.text, second.text)
        assert [first.headers["x-grokgate-cache"], second.headers["x-grokgate-cache"]] == ["miss", "hit"]
        a, b = first.json(), second.json()
        assert b["id"] != a["id"]
        assert b["output"][0]["content"][0]["text"] == a["output"][0]["content"][0]["text"]
        assert b["usage"] == a["usage"]
        assert calls(srv) == 1


# -- Redis: shared by replicas --------------------------------------------------------------------------------------


@pytest.fixture
def cache_redis(redis_url: str) -> Iterator[str]:
    url = f"{redis_url.rsplit('/', 1)[0]}/{REDIS_DB}"
    yield url
    with redis.Redis.from_url(url) as r:
        r.flushdb()


def test_redis_is_shared_by_two_replicas(tmp_path: Path, cache_redis: str) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    config = routing_file(tmp_path)
    with ExitStack() as stack:
        replicas = []
        for name in ("a", "b"):
            provider = ScriptedProvider()
            srv = stack.enter_context(app_server(tmp_path / name, scripted_models(provider), config=config,
                                                 redis_url=cache_redis, redis_key_prefix=prefix,
                                                 deployment_id="replicas"))
            srv.extra["provider"] = provider
            replicas.append(srv)
        a, b = replicas
        first = post(a, BODY, cache="ttl=120")
        second = post(b, BODY)
        assert [first.headers["x-grokgate-cache"], second.headers["x-grokgate-cache"]] == ["miss", "hit"]
        assert second.json()["choices"] == first.json()["choices"]
        assert (calls(a), calls(b)) == (1, 0)
        with redis.Redis.from_url(cache_redis) as r:
            keys = r.keys(f"{prefix}replicas:cache:*")
            assert len(keys) == 1
            assert 0 < r.ttl(keys[0]) <= 120  # the request's ttl, native in Redis


# -- units ----------------------------------------------------------------------------------------------------------


def test_the_memory_store_expires_and_stays_within_its_bound() -> None:
    now = [0.0]
    store = MemoryResponseCache(max_bytes=3 * (ENTRY_OVERHEAD + 100), clock=lambda: now[0])

    async def run() -> None:
        for key in "abc":
            await store.put(key, b"x" * 100, ttl=10)
        assert await store.get("a") == b"x" * 100  # now the most recently used
        await store.put("d", b"y" * 100, ttl=10)
        assert await store.get("b") is None and store.evicted == 1  # the least recently used made room
        assert store.bytes <= store.max_bytes and len(store) == 3
        now[0] = 10.0
        assert await store.get("a") is None  # expired
        await store.put("huge", b"z" * store.max_bytes, ttl=10)
        assert await store.get("huge") is None and await store.get("d") is None  # d expired too

    asyncio.run(run())


def test_events_round_trip_and_only_complete_answers_count() -> None:
    events: list[Event] = [Delta(0, "a", [{"token": "a", "logprob": -0.1}], None, "why"), Finish(0, "stop"),
                           Delta(1, None, None, [{"index": 0, "id": "c"}]), Finish(1, "length"),
                           UsageReport(Usage(3, 4, 1, 2, 0, True))]
    decoded, fingerprint = decode(encode(events, "fp_x"))
    assert decoded == events and fingerprint == "fp_x"
    assert complete(events, 2) and not complete(events, 3) and not complete(events[:-1], 2)
    with pytest.raises(ValueError):
        decode(b'{"v": 99, "fp": "", "events": []}')
    # A damaged entry is a miss (ValueError), or events of the right types: never a Delta whose content is a number
    # (before: it failed in the renderer, mid-answer).
    for damaged in ([["d", 0, 5]], [{"delta": {"index": 0}}, 7], [{"nothing": 1}]):
        with pytest.raises(ValueError):
            decode(json.dumps({"v": FORMAT, "fp": "", "events": damaged}).encode())
    assert decode(json.dumps({"v": FORMAT, "fp": "", "events": [{"delta": {"index": 0, "content": 5}}]}).encode()) \
        == ([Delta(0, None)], "")


def test_rules_options_and_pricing() -> None:
    rule = CacheRule(ttl=600, max_ttl=3600)
    assert effective_ttl(rule, None) == 600
    assert effective_ttl(rule, parse_option("ttl=90")) == 90
    assert effective_ttl(rule, parse_option(" TTL=99999 ")) == 3600  # capped by the rule
    assert effective_ttl(rule, parse_option("off")) is None
    assert parse_option(None) is None and parse_option("off") == CacheOption(off=True)
    assert is_sampled(None, None) and is_sampled(0.5, None)
    assert not is_sampled(0.0, None) and not is_sampled(1.0, 7)
    with pytest.raises(ValueError):
        CacheRule(ttl=7200, max_ttl=3600)
    price = Price("m", input=3_000_000, cached_input=750_000, output=15_000_000)
    usage = Usage(prompt_tokens=1000, completion_tokens=100, cached_tokens=200)
    assert cache_hit_cost(usage, price, "cached_input").total == 750
    assert cache_hit_cost(usage, price, "input").total == 800 * 3 + 200 * 3 // 4
    assert cache_hit_cost(usage, price, "full") == cost_of(usage, price)
    assert cache_hit_cost(usage, price, "free").total == 0


def test_the_routing_file_checks_its_cache_section() -> None:
    with pytest.raises(ConfigError, match=r"cache\.grok-9"):
        parse(ROUTING + "  grok-9: {ttl: 5}\n", {})
    with pytest.raises(ConfigError, match="must not exceed"):
        parse(ROUTING.replace("{ttl: 600, max_ttl: 3600}", "{ttl: 600, max_ttl: 60}"), {})
    with pytest.raises(ConfigError, match="reserved"):
        parse(ROUTING.replace("backends: {local: {kind: local}}", "backends: {local: {kind: local}, cache: "
                              "{kind: openai, base_url: 'http://x'}}"), {})
    assert parse(ROUTING, {}).cache["grok-4"].cache_sampled
