"""Read-through caches for the request path.

One read per key at a time (the others wait for it), and an entry that has just expired is served while a
background read refreshes it. Without this, every request that arrived after an entry expired started its
own read: at 64 connections that was dozens of identical queries every couple of seconds, each on a fresh
pooled connection with a thread of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

log = logging.getLogger("grokgate.store")


class RefreshingCache(Generic[K, V]):
    def __init__(self, ttl: float, *, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._max_entries = max_entries
        self._entries: dict[K, tuple[float, V]] = {}
        self._versions: dict[K, int] = {}  # bumped by every put/invalidate: a read older than that is stale
        self._loading: dict[K, asyncio.Future[V]] = {}

    def peek(self, key: K) -> V | None:
        entry = self._entries.get(key)
        return entry[1] if entry is not None else None

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        entry = self._entries.get(key)
        if entry is not None:
            age = self._clock() - entry[0]
            if age < self.ttl:
                return entry[1]
            if age < 2 * self.ttl:
                self._refresh(key, load)
                return entry[1]
        return await asyncio.shield(self._refresh(key, load))

    def put(self, key: K, value: V) -> None:
        if key not in self._entries and len(self._entries) >= self._max_entries:
            self._entries.clear()
            self._forget_versions()
        self._entries[key] = (self._clock(), value)
        self._versions[key] = self._versions.get(key, 0) + 1

    def invalidate(self, key: K | None = None) -> None:
        """Forget one key (or all): the next get reads again, and reads already running are not stored."""
        keys = list(self._entries) + list(self._loading) if key is None else [key]
        if key is None:
            self._entries.clear()
        else:
            self._entries.pop(key, None)
        for k in keys:
            self._versions[k] = self._versions.get(k, 0) + 1
        if len(self._versions) > 2 * self._max_entries:
            self._forget_versions()

    async def aclose(self) -> None:
        """Cancel the reads in flight (at shutdown, before the engine they use goes away)."""
        tasks = list(self._loading.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _forget_versions(self) -> None:
        # Versions matter only to reads in flight; keeping the others would grow without bound.
        self._versions = {k: v for k, v in self._versions.items() if k in self._loading}

    def _refresh(self, key: K, load: Callable[[], Awaitable[V]]) -> asyncio.Future[V]:
        running = self._loading.get(key)
        if running is not None:
            return running
        # The version is taken now, not when the task first runs: a put in between is newer than our read.
        task = asyncio.ensure_future(self._load(key, load, self._versions.get(key, 0)))
        self._loading[key] = task
        task.add_done_callback(lambda done: self._done(key, done))
        return task

    async def _load(self, key: K, load: Callable[[], Awaitable[V]], version: int) -> V:
        for _ in range(3):
            value = await load()
            if self._versions.get(key, 0) == version:
                self.put(key, value)
                return value
            # Changed while we read: a put holds a newer value; after an invalidation, read again.
            entry = self._entries.get(key)
            if entry is not None:
                return entry[1]
            version = self._versions.get(key, 0)
        return value

    def _done(self, key: K, task: asyncio.Future[V]) -> None:
        if self._loading.get(key) is task:
            del self._loading[key]
        if not task.cancelled() and task.exception() is not None:
            # Waiters get the exception too; a background refresh has none, so it is logged here.
            log.warning("cache read failed", exc_info=task.exception())
