"""Per-token rate limits (RPM, TPM, concurrency), in-process and in Redis, plus the pure header helpers."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from redis.asyncio import Redis

from grokgate.core.limits import Decision, Limits, RateLimiter, go_duration, rate_limit_headers
from grokgate.store.limits_memory import MemoryRateLimiter
from grokgate.store.limits_redis import RedisRateLimiter
from tests.conftest import E2E

REDIS_URL = "redis://127.0.0.1:6379/0"
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1: every command fails to connect

Factory = Callable[..., RateLimiter]


def redis_available() -> bool:
    try:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5) as r:
            return bool(r.ping())
    except redis.exceptions.RedisError:
        return False


@pytest.fixture(scope="module")
def redis_up() -> bool:
    return redis_available()


@pytest.fixture
def redis_prefix(redis_up: bool) -> Iterator[str]:
    if not redis_up:
        pytest.skip(f"Redis is not reachable at {REDIS_URL}")
    prefix = f"grokgate-test:{uuid.uuid4().hex}:"
    yield prefix
    with redis.Redis.from_url(REDIS_URL) as r:
        for k in r.scan_iter(match=f"{prefix}*"):
            r.delete(k)


@pytest.fixture(params=["memory", pytest.param("redis", marks=E2E)])
def make(request: pytest.FixtureRequest) -> Factory:
    """A factory, so each limiter (and its Redis connections) is created inside the test's event loop."""
    if request.param == "memory":
        return lambda lease_seconds=600.0: MemoryRateLimiter(lease_seconds=lease_seconds)
    prefix: str = request.getfixturevalue("redis_prefix")
    return lambda lease_seconds=600.0: RedisRateLimiter(REDIS_URL, key_prefix=prefix, lease_seconds=lease_seconds)


def assert_allowed(d: Decision) -> None:
    assert (d.allowed, d.reason, d.retry_after) == (True, None, 0.0), d
    assert "retry-after" not in d.headers


def test_rpm_refused_after_n_requests(make: Factory) -> None:
    limits = Limits(rpm=2)

    async def run() -> list[Decision]:
        lim = make()
        try:
            return [await lim.acquire("k", f"r{i}", limits, 10) for i in range(3)]
        finally:
            await lim.close()

    first, second, third = asyncio.run(run())
    assert_allowed(first)
    assert first.headers == {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1",
                             "x-ratelimit-reset-requests": "30s"}
    assert_allowed(second)
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"1m0s|59(\.\d+)?s", second.headers["x-ratelimit-reset-requests"])
    assert (third.allowed, third.reason) == (False, "rpm")
    # One request refills every 30 s; a few ms may have passed since the bucket was full.
    assert 25 < third.retry_after <= 30
    assert third.headers["retry-after"] == "30"
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert not any("tokens" in h for h in third.headers)


def test_tpm_refusal_and_release_gives_unused_tokens_back(make: Factory) -> None:
    limits = Limits(tpm=1000)

    async def run() -> None:
        lim = make()
        try:
            a = await lim.acquire("k", "a", limits, 600)
            assert_allowed(a)
            assert a.headers["x-ratelimit-remaining-tokens"] == "400"
            assert a.headers["x-ratelimit-limit-tokens"] == "1000"
            refused = await lim.acquire("k", "b", limits, 600)
            assert (refused.allowed, refused.reason) == (False, "tpm")
            assert 10 < refused.retry_after <= 12  # 200 tokens at 1000/60 per second
            await lim.release("k", "a", limits, estimated_tokens=600, actual_tokens=100)
            b = await lim.acquire("k", "b", limits, 600)
            assert_allowed(b)
            assert 300 <= int(b.headers["x-ratelimit-remaining-tokens"]) < 310
        finally:
            await lim.close()

    asyncio.run(run())


def test_release_charges_tokens_used_beyond_the_estimate(make: Factory) -> None:
    limits = Limits(tpm=1000)

    async def run() -> None:
        lim = make()
        try:
            assert (await lim.acquire("k", "a", limits, 100)).allowed
            await lim.release("k", "a", limits, estimated_tokens=100, actual_tokens=900)
            refused = await lim.acquire("k", "b", limits, 200)
            assert (refused.allowed, refused.reason) == (False, "tpm")
        finally:
            await lim.close()

    asyncio.run(run())


def test_refund_never_takes_usage_below_zero(make: Factory) -> None:
    limits = Limits(tpm=1000)

    async def run() -> None:
        lim = make()
        try:
            assert (await lim.acquire("k", "a", limits, 100)).allowed
            # Returns more than was ever charged: the bucket is empty, not "in credit".
            await lim.release("k", "a", limits, estimated_tokens=5000, actual_tokens=0)
            assert (await lim.acquire("k", "b", limits, 1000)).allowed
            assert (await lim.acquire("k", "c", limits, 1)).reason == "tpm"
        finally:
            await lim.close()

    asyncio.run(run())


def test_request_bigger_than_the_whole_tpm_budget_is_refused(make: Factory) -> None:
    limits = Limits(tpm=100)

    async def run() -> tuple[Decision, Decision]:
        lim = make()
        try:
            return await lim.acquire("k", "big", limits, 101), await lim.acquire("k", "fits", limits, 100)
        finally:
            await lim.close()

    big, fits = asyncio.run(run())
    assert (big.allowed, big.reason, big.retry_after) == (False, "tpm", 60.0)
    assert big.headers["retry-after"] == "60"
    assert big.headers["x-ratelimit-remaining-tokens"] == "100"
    assert_allowed(fits)


def test_concurrency_limit_and_release_frees_a_slot(make: Factory) -> None:
    limits = Limits(concurrency=2)

    async def run() -> None:
        lim = make()
        try:
            assert_allowed(await lim.acquire("k", "a", limits, 1))
            assert_allowed(await lim.acquire("k", "b", limits, 1))
            refused = await lim.acquire("k", "c", limits, 1)
            assert (refused.allowed, refused.reason, refused.retry_after) == (False, "concurrency", 1.0)
            assert refused.headers == {"retry-after": "1"}
            assert (await lim.acquire("other-key", "c", limits, 1)).allowed  # limits are per key
            await lim.release("k", "a", limits, 1, 1)
            assert_allowed(await lim.acquire("k", "c", limits, 1))
            assert (await lim.acquire("k", "d", limits, 1)).reason == "concurrency"
        finally:
            await lim.close()

    asyncio.run(run())


def test_concurrent_acquires_never_overshoot(make: Factory) -> None:
    limits = Limits(concurrency=5, rpm=100)

    async def run() -> list[Decision]:
        lim = make()
        try:
            return await asyncio.gather(*(lim.acquire("k", f"r{i}", limits, 1) for i in range(20)))
        finally:
            await lim.close()

    decisions = asyncio.run(run())
    assert sum(d.allowed for d in decisions) == 5
    assert {d.reason for d in decisions if not d.allowed} == {"concurrency"}


def test_release_is_idempotent(make: Factory) -> None:
    limits = Limits(tpm=1000, concurrency=3)

    async def run() -> None:
        lim = make()
        try:
            assert (await lim.acquire("k", "a", limits, 500)).allowed
            assert (await lim.acquire("k", "b", limits, 500)).allowed
            for _ in range(2):
                await lim.release("k", "a", limits, estimated_tokens=500, actual_tokens=0)
            await lim.release("k", "never-acquired", limits, 500, 0)
            await lim.release("unknown-key", "a", limits, 500, 0)
            assert (await lim.acquire("k", "c", limits, 400)).allowed
            # One refund of 500, not two: 900 of 1000 in use.
            assert (await lim.acquire("k", "d", limits, 300)).reason == "tpm"
            # "a" released once, so b and c hold two of three slots.
            assert (await lim.acquire("k", "e", limits, 0)).allowed
            assert (await lim.acquire("k", "f", limits, 0)).reason == "concurrency"
        finally:
            await lim.close()

    asyncio.run(run())


def test_nothing_recorded_when_refused(make: Factory) -> None:
    limits = Limits(rpm=1, tpm=1000, concurrency=1)

    async def run() -> None:
        lim = make()
        try:
            for i in range(3):
                assert (await lim.acquire("k", f"big{i}", limits, 5000)).reason == "tpm"
            # A refused request was never in flight, so releasing it must not free anything either.
            await lim.release("k", "big0", limits, 5000, 0)
            ok = await lim.acquire("k", "a", limits, 10)
            assert_allowed(ok)
            assert ok.headers["x-ratelimit-remaining-tokens"] == "990"
            assert ok.headers["x-ratelimit-remaining-requests"] == "0"
        finally:
            await lim.close()

    asyncio.run(run())


def test_unlimited_is_always_allowed(make: Factory) -> None:
    async def run() -> list[Decision]:
        lim = make()
        try:
            return [await lim.acquire("k", f"r{i}", Limits(), 10**9) for i in range(50)]
        finally:
            await lim.close()

    for d in asyncio.run(run()):
        assert_allowed(d)
        assert d.headers == {}


def test_lease_expiry_frees_a_leaked_slot(make: Factory) -> None:
    limits = Limits(concurrency=1)

    async def run() -> None:
        lim = make(lease_seconds=0.2)
        try:
            assert (await lim.acquire("k", "crashed", limits, 1)).allowed
            assert (await lim.acquire("k", "b", limits, 1)).reason == "concurrency"
            await asyncio.sleep(0.35)
            assert (await lim.acquire("k", "b", limits, 1)).allowed
            # The late release of the expired request must not free the slot "b" now holds.
            await lim.release("k", "crashed", limits, 1, 1)
            assert (await lim.acquire("k", "c", limits, 1)).reason == "concurrency"
        finally:
            await lim.close()

    asyncio.run(run())


@E2E
def test_redis_replicas_share_one_limit(redis_prefix: str) -> None:
    limits = Limits(rpm=3, concurrency=10)

    async def run() -> list[bool]:
        one, two = Redis.from_url(REDIS_URL), Redis.from_url(REDIS_URL)
        a = RedisRateLimiter(one, key_prefix=redis_prefix)
        b = RedisRateLimiter(two, key_prefix=redis_prefix)
        try:
            order = [a, b, a, b, a]
            return [(await lim.acquire("k", f"r{i}", limits, 1)).allowed for i, lim in enumerate(order)]
        finally:
            await a.close()
            await b.close()
            assert await one.ping()  # a client passed in belongs to the caller: close() leaves it open
            await one.aclose()
            await two.aclose()

    assert asyncio.run(run()) == [True, True, True, False, False]


@E2E
def test_redis_keys_expire_and_release_cleans_up(redis_prefix: str) -> None:
    limits = Limits(rpm=10, tpm=1000, concurrency=2)

    async def run() -> None:
        lim = RedisRateLimiter(REDIS_URL, key_prefix=redis_prefix, lease_seconds=30)
        probe = Redis.from_url(REDIS_URL)
        try:
            assert (await lim.acquire("k", "a", limits, 100)).allowed
            keys = sorted([k.decode() async for k in probe.scan_iter(match=f"{redis_prefix}*")])
            assert keys == [f"{redis_prefix}{{k}}:b", f"{redis_prefix}{{k}}:f"]
            for k in keys:
                assert 0 < await probe.pttl(k) <= 31_000
            await lim.release("k", "a", limits, 100, 50)
            assert not await probe.exists(f"{redis_prefix}{{k}}:f")
        finally:
            await lim.close()
            await probe.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
def test_redis_unreachable(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> tuple[list[Decision], int]:
        lim = RedisRateLimiter(DEAD_REDIS_URL, on_store_error=mode)  # type: ignore[arg-type]
        try:
            decisions = [await lim.acquire("k", f"r{i}", Limits(rpm=1), 1) for i in range(2)]
            await lim.release("k", "r0", Limits(rpm=1), 1, 1)  # swallowed, only logged
            return decisions, lim.degraded_total
        finally:
            await lim.close()

    with caplog.at_level(logging.WARNING, logger="grokgate.limits"):
        decisions, degraded = asyncio.run(run())
    assert degraded == 2
    for d in decisions:
        if mode == "fail_open":
            assert (d.allowed, d.reason, d.retry_after, d.headers) == (True, "store_unavailable", 0.0, {})
        else:
            assert (d.allowed, d.reason, d.retry_after) == (False, "store_unavailable", 1.0)
            assert d.headers["retry-after"] == "1"
    warnings = [r for r in caplog.records if r.name == "grokgate.limits" and r.levelno == logging.WARNING]
    assert len(warnings) == 3  # two acquires, one release


def test_memory_drops_idle_keys() -> None:
    now = [1000.0]
    lim = MemoryRateLimiter(clock=lambda: now[0])
    limits = Limits(rpm=60, tpm=6000, concurrency=5)

    async def run() -> None:
        for i in range(100):
            assert (await lim.acquire(f"idle-{i}", "r", limits, 10)).allowed
            await lim.release(f"idle-{i}", "r", limits, 10, 10)
        assert (await lim.acquire("busy", "held", limits, 10)).allowed  # never released: lease still live
        assert lim.tracked_keys == 101
        now[0] += 120
        assert (await lim.acquire("fresh", "r", limits, 10)).allowed
        assert lim.tracked_keys == 2

    asyncio.run(run())


def test_go_durations_and_headers() -> None:
    cases = {0: "0s", 20: "20ms", 1000: "1s", 12_500: "12.5s", 360_000: "6m0s", 61_001: "1m1.001s",
             3_600_000: "1h0m0s", 3_723_400: "1h2m3.4s"}
    assert {ms: go_duration(ms) for ms in cases} == cases
    assert rate_limit_headers(Limits(), 0, 0) == {}
    assert rate_limit_headers(Limits(concurrency=3), 0, 0, retry_after=0.2) == {"retry-after": "1"}
    assert rate_limit_headers(Limits(), 0, 0, retry_after=1.01)["retry-after"] == "2"
    assert rate_limit_headers(Limits(tpm=600), 0, 0) == {
        "x-ratelimit-limit-tokens": "600", "x-ratelimit-remaining-tokens": "600", "x-ratelimit-reset-tokens": "0s"}


@pytest.mark.parametrize("bad", [{"rpm": 0}, {"tpm": -1}, {"concurrency": 0}])
def test_limits_must_be_positive(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Limits(**bad)


def test_memory_lease_taken_again_moves_to_the_newest_place() -> None:
    """Leases expire in the order they were taken; one taken again (same request id, still held) must count
    from its new start, so the older leases behind it still expire on time."""
    now = [1000.0]
    lim = MemoryRateLimiter(lease_seconds=10, clock=lambda: now[0])
    limits = Limits(concurrency=3)

    async def run() -> None:
        assert (await lim.acquire("k", "a", limits, 0)).allowed  # t=0: ends at 10
        now[0] += 5
        assert (await lim.acquire("k", "b", limits, 0)).allowed  # t=5: ends at 15
        now[0] += 1
        assert (await lim.acquire("k", "a", limits, 0)).allowed  # t=6: "a" again, now ends at 16
        now[0] += 9.5  # t=15.5: "b" expired (never released); only "a" is live
        assert (await lim.acquire("k", "c", limits, 0)).allowed
        assert (await lim.acquire("k", "d", limits, 0)).allowed
        assert not (await lim.acquire("k", "e", limits, 0)).allowed  # "a", "c", "d"

    asyncio.run(run())
