"""The exact response cache in this process's memory (no Redis configured): the `ResponseCacheStore` contract of
core/response_cache.py, bounded by the bytes it keeps (least recently used dropped first to make room), with
each entry's time to live. Lost at restart and not shared between processes; store/response_cache_redis.py is
the shared one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

# What an entry costs beyond its value: its key (a 64-character digest plus the prefix) and the bookkeeping.
ENTRY_OVERHEAD = 200


class MemoryResponseCache:
    """Least recently used first out; an expired entry is dropped when it is read or reaches the front."""

    def __init__(self, max_bytes: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # key -> (value, expires at)
        self.bytes = 0
        self.evicted = 0  # entries dropped to make room (not counting expiry)

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def put(self, key: str, value: bytes, ttl: int) -> None:
        size = len(value) + ENTRY_OVERHEAD
        if size > self.max_bytes:  # could never fit: keep what is there
            return
        if key in self._entries:
            self._drop(key)
        now = self._clock()
        while self._entries and self.bytes + size > self.max_bytes:
            oldest, (_, expires) = next(iter(self._entries.items()))
            self._drop(oldest)
            if expires > now:
                self.evicted += 1
        self._entries[key] = (value, now + ttl)
        self.bytes += size

    def _drop(self, key: str) -> None:
        value, _ = self._entries.pop(key)
        self.bytes -= len(value) + ENTRY_OVERHEAD

    async def close(self) -> None:
        self._entries.clear()
        self.bytes = 0
