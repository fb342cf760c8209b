"""Bursts against a healthy Redis (issue 9, item 7): the rate limiter's connection pool waits for a free
connection instead of failing, a request refused for credits costs one Redis round trip, and a pool still
exhausted after its timeout is a store error handled as `rate_limit_store_error` says. The burst on two replicas
is test_billing.py's `test_burst_on_two_replicas_gets_only_200_and_used_up`."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from grokgate.core.accounts import Settlement, TokenRecord
from grokgate.core.admission import AdmissionRequest, Principal
from grokgate.core.billing import AccountAdmission
from grokgate.core.budgets import Hold, Reserved
from grokgate.core.errors import GatewayError
from grokgate.core.limits import Decision, Limits
from grokgate.core.pricing import Price
from grokgate.store.limits_redis import RedisRateLimiter

pytestmark = pytest.mark.e2e  # the real server, model or databases (tests/conftest.py)

# The burst itself (1,000 requests over two replicas, PostgreSQL + Redis) is in tests/test_billing.py, on the
# replicas that module starts once for its other cross-replica tests.


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards (never FLUSHALL)."""
    prefix = f"grokgate-burst-test:{uuid.uuid4().hex}:"
    yield prefix
    with redis.Redis.from_url(redis_url) as r:
        for key in r.scan_iter(match=f"{prefix}*"):
            r.delete(key)


# -- the limiter on its own, against the real Redis --------------------------------------------------------


class CountingRedis(Redis):
    """Counts commands sent (each a round trip: the limiter never pipelines a request's commands)."""

    sent: list[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]))
        return await super().execute_command(*args, **options)


def counting_client(url: str) -> CountingRedis:
    client = CountingRedis.from_url(url)
    client.sent = []
    return client


class NoCredits:
    """The slice of the account store admission uses: a price, and no credits for any reservation."""

    def __init__(self) -> None:
        self.reserve_calls = 0

    async def find_token(self, token_hash: str) -> TokenRecord | None:
        return None

    async def current_price(self, model: str) -> Price | None:
        return Price(model, 3_000_000, 750_000, 15_000_000)

    async def reserve(self, hold: Hold) -> Reserved:
        self.reserve_calls += 1
        return Reserved(False, "balance", 0)

    async def settle(self, settlement: Settlement) -> None:
        raise AssertionError("a refused request is never settled")


async def until_allowed(limiter: RedisRateLimiter, key: str, limits: Limits, deadline_s: float = 10) -> Decision:
    """Poll (the release of a refused request may be sent a moment after the refusal)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        decision = await limiter.acquire(key, f"probe-{uuid.uuid4().hex}", limits, 1)
        if decision.allowed or loop.time() > end:
            return decision
        await asyncio.sleep(0.02)


def test_refused_for_credits_costs_one_redis_round_trip(redis_url: str, redis_prefix: str) -> None:
    """A request the limiter lets through but the balance refuses: one round trip on its path (before: a second
    one to release its slot); the slot still goes back, to this replica at once, to the others by a flush."""
    limits = Limits(rpm=1000, tpm=1_000_000, concurrency=1)
    principal = Principal(key_id="tok-7", token_id=7, account_id=7, limits=limits)

    async def run() -> None:
        client = counting_client(redis_url)
        other = Redis.from_url(redis_url)
        # No background flush during the test, so every command counted is one a request made.
        limiter = RedisRateLimiter(client, key_prefix=redis_prefix, on_store_error="fail_closed",
                                   release_delay=3600)
        other_replica = RedisRateLimiter(other, key_prefix=redis_prefix, on_store_error="fail_closed")
        store = NoCredits()
        admission = AccountAdmission(store, limiter, [])  # type: ignore[arg-type]
        try:
            # Both scripts loaded once (an unknown script costs a SCRIPT LOAD the first time, ever).
            await limiter.acquire("warm-up", "w", Limits(), 0)
            await limiter.release("warm-up", "w", Limits(), 1, 1)
            for i in range(3):
                client.sent.clear()
                with pytest.raises(GatewayError) as refused:
                    await admission.admit(principal, AdmissionRequest(f"r{i}", "grok-3", 1, 16, 10))
                assert (refused.value.status, refused.value.code) == (403, "used_up")
                # Each admit found the slot free (concurrency 1): the previous refusal gave it back.
                assert client.sent == ["EVALSHA"], client.sent
            assert store.reserve_calls == 3
            client.sent.clear()
            await limiter.flush()  # what the background flush sends a moment later
            assert client.sent == ["EVALSHA"], client.sent
            assert (await other_replica.acquire("tok-7", "elsewhere", limits, 1)).allowed
        finally:
            await limiter.close()
            await other_replica.close()
            await client.aclose()
            await other.aclose()

    asyncio.run(run())


def test_refused_request_slot_is_freed_for_other_replicas_without_more_traffic(
        redis_url: str, redis_prefix: str) -> None:
    limits = Limits(concurrency=1)
    principal = Principal(key_id="tok-8", token_id=8, account_id=8, limits=limits)

    async def run() -> Decision:
        limiter = RedisRateLimiter(redis_url, key_prefix=redis_prefix, on_store_error="fail_closed")
        other_replica = RedisRateLimiter(redis_url, key_prefix=redis_prefix, on_store_error="fail_closed")
        try:
            with pytest.raises(GatewayError):
                await AccountAdmission(NoCredits(), limiter, []).admit(  # type: ignore[arg-type]
                    principal, AdmissionRequest("r", "grok-3", 1, 16, 10))
            return await until_allowed(other_replica, "tok-8", limits)
        finally:
            await limiter.close()
            await other_replica.close()

    assert asyncio.run(run()).allowed


def test_pool_waits_for_a_free_connection(redis_url: str, redis_prefix: str) -> None:
    """More commands at once than the pool has connections: they wait for one, none fails."""
    async def run() -> tuple[list[Decision], int]:
        limiter = RedisRateLimiter(redis_url, key_prefix=redis_prefix, on_store_error="fail_closed",
                                   max_connections=4, pool_timeout=30)
        try:
            decisions = await asyncio.gather(*(
                limiter.acquire(f"k{i % 7}", f"r{i}", Limits(rpm=10_000), 1) for i in range(400)))
            return decisions, limiter.degraded_total
        finally:
            await limiter.close()

    decisions, degraded = asyncio.run(run())
    assert degraded == 0
    assert {(d.allowed, d.reason) for d in decisions} == {(True, None)}


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
def test_pool_exhausted_past_its_timeout_is_a_store_error(
        mode: str, redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> tuple[Decision, int]:
        limiter = RedisRateLimiter(redis_url, key_prefix=redis_prefix, on_store_error=mode,  # type: ignore[arg-type]
                                   max_connections=1, pool_timeout=0.2)
        pool = limiter._redis.connection_pool
        held = await pool.get_connection()  # the pool's only connection, taken by someone else
        try:
            return await limiter.acquire("k", "r", Limits(rpm=10), 1), limiter.degraded_total
        finally:
            await pool.release(held)
            await limiter.close()

    with caplog.at_level(logging.WARNING, logger="grokgate.limits"):
        decision, degraded = asyncio.run(run())
    assert degraded == 1
    if mode == "fail_open":
        assert (decision.allowed, decision.reason) == (True, "store_unavailable")
    else:
        assert (decision.allowed, decision.reason, decision.headers) == (
            False, "store_unavailable", {"retry-after": "1"})
    assert any("rate-limit store unavailable" in r.getMessage() and "all 1 connections stayed busy for 0.2 s"
               in r.getMessage() for r in caplog.records)


def test_release_carried_by_a_refused_acquire_is_recorded(redis_url: str, redis_prefix: str) -> None:
    """The script applies carried releases before deciding; when it then refuses, what they gave back
    (tokens, a slot) must still be written, as another replica sees."""
    limits = Limits(tpm=1000, concurrency=1)

    async def run() -> tuple[Decision, Decision]:
        limiter = RedisRateLimiter(redis_url, key_prefix=redis_prefix, release_delay=3600)
        other_replica = RedisRateLimiter(redis_url, key_prefix=redis_prefix)
        try:
            assert (await limiter.acquire("k", "a", limits, 600)).allowed
            await limiter.release("k", "a", limits, estimated_tokens=600, actual_tokens=0)  # deferred
            never_fits = await limiter.acquire("k", "big", limits, 1001)  # carries a's release
            return never_fits, await other_replica.acquire("k", "b", limits, 1000)
        finally:
            await limiter.close()
            await other_replica.close()

    never_fits, whole_budget = asyncio.run(run())
    assert (never_fits.allowed, never_fits.reason) == (False, "tpm")
    assert whole_budget.allowed, whole_budget


def test_releases_carried_by_a_failed_call_are_kept(redis_url: str, redis_prefix: str) -> None:
    limits = Limits(concurrency=1)

    async def run() -> tuple[Decision, Decision]:
        limiter = RedisRateLimiter(redis_url, key_prefix=redis_prefix, on_store_error="fail_closed",
                                   max_connections=1, pool_timeout=0.2, release_delay=3600)
        other_replica = RedisRateLimiter(redis_url, key_prefix=redis_prefix)
        try:
            assert (await limiter.acquire("k", "a", limits, 1)).allowed
            await limiter.release("k", "a", limits, 1, 0)  # deferred
            pool = limiter._redis.connection_pool
            held = await pool.get_connection()
            try:
                failed = await limiter.acquire("k", "b", limits, 1)  # carries a's release, gets no connection
            finally:
                await pool.release(held)
            await limiter.flush()
            return failed, await other_replica.acquire("k", "c", limits, 1)
        finally:
            await limiter.close()
            await other_replica.close()

    failed, after_flush = asyncio.run(run())
    assert (failed.allowed, failed.reason) == (False, "store_unavailable")
    assert after_flush.allowed, after_flush
