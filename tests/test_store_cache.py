"""The request path's read-through cache: one read per key at a time, stale entries served while refreshed."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from grokgate.store.cache import RefreshingCache


class Source:
    """A loader that counts its reads and can be held open until released."""

    def __init__(self, value: int = 1) -> None:
        self.value = value
        self.reads = 0
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def load(self) -> int:
        self.reads += 1
        value = self.value
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return value


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def test_concurrent_misses_share_one_read() -> None:
    async def scenario() -> None:
        cache: RefreshingCache[str, int] = RefreshingCache(2.0)
        source = Source(7)
        source.gate = asyncio.Event()
        waiters = [asyncio.create_task(cache.get("k", source.load)) for _ in range(50)]
        await asyncio.sleep(0)
        source.gate.set()
        assert await asyncio.gather(*waiters) == [7] * 50
        assert source.reads == 1
        assert await cache.get("k", source.load) == 7 and source.reads == 1  # fresh: no read

    run(scenario())


def test_expired_entry_is_served_while_one_refresh_runs() -> None:
    async def scenario() -> None:
        now = [100.0]
        cache: RefreshingCache[str, int] = RefreshingCache(2.0, clock=lambda: now[0])
        source = Source(1)
        assert await cache.get("k", source.load) == 1
        source.value, source.gate = 2, asyncio.Event()
        now[0] += 2.5  # expired, but younger than twice the ttl
        assert [await cache.get("k", source.load) for _ in range(20)] == [1] * 20  # nobody waits
        await asyncio.sleep(0)
        assert source.reads == 2  # one refresh for all twenty
        source.gate.set()
        await asyncio.sleep(0.01)
        assert await cache.get("k", source.load) == 2 and source.reads == 2

        now[0] += 10  # far too old to serve: callers wait for the read
        source.value, source.gate = 3, None
        assert await cache.get("k", source.load) == 3 and source.reads == 3

    run(scenario())


def test_a_put_during_a_read_wins_over_the_older_read() -> None:
    async def scenario() -> None:
        cache: RefreshingCache[int, int] = RefreshingCache(2.0)
        source = Source(100)  # what the database said before a settlement committed
        source.gate = asyncio.Event()
        waiter = asyncio.create_task(cache.get(1, source.load))
        await asyncio.sleep(0)
        cache.put(1, 90)  # the settlement's newer balance
        source.gate.set()
        assert await waiter == 90
        assert cache.peek(1) == 90

    run(scenario())


def test_an_invalidation_during_a_read_reads_again() -> None:
    async def scenario() -> None:
        cache: RefreshingCache[int, int] = RefreshingCache(2.0)
        source = Source(100)
        source.gate = asyncio.Event()
        waiter = asyncio.create_task(cache.get(1, source.load))
        await asyncio.sleep(0)
        cache.invalidate(1)  # a top-up committed while we read
        source.value = 150
        source.gate.set()
        assert await waiter == 150
        assert source.reads == 2
        assert cache.peek(1) == 150

    run(scenario())


def test_a_failed_read_reaches_its_waiters_and_the_next_get_retries() -> None:
    async def scenario() -> None:
        cache: RefreshingCache[str, int] = RefreshingCache(2.0)
        source = Source(5)
        source.fail = RuntimeError("database is down")
        with pytest.raises(RuntimeError, match="database is down"):
            await cache.get("k", source.load)
        source.fail = None
        assert await cache.get("k", source.load) == 5
        assert source.reads == 2

    run(scenario())


def test_size_is_bounded() -> None:
    async def scenario() -> None:
        cache: RefreshingCache[int, int] = RefreshingCache(2.0, max_entries=10)
        for i in range(25):
            cache.put(i, i)
        assert sum(cache.peek(i) is not None for i in range(25)) <= 10
        assert cache.peek(24) == 24

    run(scenario())
