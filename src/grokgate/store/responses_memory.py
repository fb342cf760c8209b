"""Stored responses in this process's memory, for accounts-off mode (no database): the `ResponseStore` contract of
core/responses.py, bounded by the bytes of JSON it keeps (the oldest are dropped first to make room), and lost at
restart. With accounts on, store/responses_sql.py keeps them in the accounts database instead.

`measure` is also how store/responses_sql.py sizes a response, so both bound chains the same way.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import orjson

from grokgate.core.accounts import now_ms
from grokgate.core.responses import ChainTooLong, StoredResponse


class Measure(NamedTuple):
    size: int  # bytes of JSON: the input items and the response, as the SQL store writes them
    items: int  # input items + output items


def serialize(response: StoredResponse) -> tuple[bytes, bytes]:
    """The input items and the response as the SQL store writes them (orjson: UTF-8 JSON)."""
    return orjson.dumps(response.input_items), orjson.dumps(response.response)


def measure(response: StoredResponse, serialized: tuple[bytes, bytes] | None = None) -> Measure:
    """`size` is the bytes of JSON the SQL store writes for it, exactly."""
    items, body = serialized or serialize(response)
    return Measure(len(items) + len(body), len(response.input_items) + len(response.output))


class MemoryResponseStore:
    """In insertion order, which is creation order: dropping from the front drops the oldest."""

    def __init__(self, max_bytes: int, *, clock: Callable[[], int] = now_ms) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        self._kept: OrderedDict[str, tuple[StoredResponse, Measure]] = OrderedDict()
        self._bytes = 0
        self.dropped = 0  # responses dropped to make room (not counting expiry)

    async def save(self, response: StoredResponse, *, max_bytes: int | None = None) -> int | None:
        size = measure(response)
        if max_bytes is not None and size.size > max_bytes:
            return None
        if response.id in self._kept:
            return size.size  # an id saved twice keeps the first
        if size.size > self.max_bytes:
            self.dropped += 1  # it could never fit: dropping everything else for it would not make it fit
            return None
        while self._kept and self._bytes + size.size > self.max_bytes:
            _, (_, old) = self._kept.popitem(last=False)
            self._bytes -= old.size
            self.dropped += 1
        self._kept[response.id] = (response, size)
        self._bytes += size.size
        return size.size

    def _find(self, owner: str, response_id: str, now: int) -> tuple[StoredResponse, Measure] | None:
        entry = self._kept.get(response_id)
        if entry is None or entry[0].owner != owner or entry[0].expires_at <= now:
            return None
        return entry

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        entry = self._find(owner, response_id, self._clock())
        return entry[0] if entry is not None else None

    async def delete(self, owner: str, response_id: str) -> bool:
        if self._find(owner, response_id, self._clock()) is None:
            return False
        _, size = self._kept.pop(response_id)
        self._bytes -= size.size
        return True

    async def chain(self, owner: str, response_id: str, *, max_items: int, max_bytes: int) -> list[StoredResponse]:
        now = self._clock()
        found: list[StoredResponse] = []
        items = size = 0
        next_id: str | None = response_id
        while next_id is not None:
            entry = self._find(owner, next_id, now)
            if entry is None:
                break  # expired, deleted, dropped, or another owner's: the chain ends here
            response, measured = entry
            items += measured.items
            size += measured.size
            if items > max_items or size > max_bytes:
                raise ChainTooLong(f"the conversation is longer than {max_items} items or {max_bytes} bytes")
            found.append(response)
            next_id = response.previous_id
        found.reverse()
        return found

    async def purge(self, now_ms: int) -> int:
        expired = [rid for rid, (r, _) in self._kept.items() if r.expires_at <= now_ms]
        for rid in expired:
            _, size = self._kept.pop(rid)
            self._bytes -= size.size
        return len(expired)

    async def stats(self) -> tuple[int, int]:
        return len(self._kept), self._bytes
