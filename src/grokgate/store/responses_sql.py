"""Stored responses in the accounts database (SQLite or PostgreSQL): the `ResponseStore` contract of
core/responses.py on the `responses` table (store/schema.py, migration 0003).

Writes go through the store's group-commit writer (`SqlStore.write`), so on SQLite they never fight the
settlements for the database lock, and on PostgreSQL they share the settlements' transactions. Reads use the
store's async engine. Every read names the owner: another owner's response is simply not found, also as a link
of a `previous_response_id` chain.

A chain is walked by one recursive query over the light columns (id, previous_id, size, item_count) that carries
the running totals and stops one link past a bound, so a chain that is too long costs no JSON; then the JSON of
the links found is read in one query.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from sqlalchemy import Connection, delete, func, literal_column, select
from sqlalchemy.dialects import postgresql

from grokgate.core.accounts import now_ms
from grokgate.core.responses import ChainTooLong, StoredResponse
from grokgate.store.responses_memory import measure, serialize
from grokgate.store.schema import responses
from grokgate.store.sql import SqlStore

_COLUMNS = ("id", "owner", "created_at", "expires_at", "previous_id", "input_items", "response", "size",
            "item_count")
_SQLITE_INSERT = (f"INSERT OR IGNORE INTO responses ({', '.join(_COLUMNS)}) "
                  f"VALUES ({', '.join('?' for _ in _COLUMNS)})")
_ID_MAX = 100  # the id column's length: a longer id cannot be stored, so it is not found
PURGE_BATCH = 1000  # rows per purge transaction: the writer's other work (settlements) waits at most one batch


class SqlResponseStore:
    def __init__(self, store: SqlStore, *, purge_batch: int = PURGE_BATCH, clock: Callable[[], int] = now_ms) -> None:
        self.store = store
        self._clock = clock  # epoch milliseconds: what has expired is not found
        self.purge_batch = purge_batch
        self._pending: list[dict[str, Any]] = []
        self._flush: asyncio.Future[Any] | None = None

    async def save(self, response: StoredResponse, *, max_bytes: int | None = None) -> int | None:
        serialized = serialize(response)
        size, items = measure(response, serialized)
        if max_bytes is not None and size > max_bytes:
            return None
        self._pending.append({
            "id": response.id, "owner": response.owner, "created_at": response.created_at,
            "expires_at": response.expires_at, "previous_id": response.previous_id,
            "input_items": serialized[0].decode(), "response": serialized[1].decode(), "size": size,
            "item_count": items,
        })
        # Saves waiting for the same group commit go in as one multi-row statement: one op, one future.
        if self._flush is None:
            self._flush = asyncio.ensure_future(self._write_pending())
        flush = self._flush
        await asyncio.shield(flush)  # the insert is queued: it commits even if this caller is cancelled
        return size

    async def _write_pending(self) -> None:
        """The saves queued so far, as one insert in the store's next group commit: on SQLite with the writer
        process, in the child's settlement transaction (SqlStore.write_rows)."""
        await asyncio.sleep(0)  # let the saves of this loop iteration join
        rows, self._pending = self._pending, []
        self._flush = None  # later saves start the next insert

        def op(conn: Connection) -> None:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql(_SQLITE_INSERT, tuples)
            else:
                conn.execute(postgresql.insert(responses).on_conflict_do_nothing(index_elements=["id"]), rows)

        tuples = [tuple(row[c] for c in _COLUMNS) for row in rows]
        await self.store.write_rows(op, _SQLITE_INSERT, tuples)

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        if not _valid(owner, response_id):
            return None
        query = select(responses).where(*_visible(owner, response_id, self._clock()))
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        return _stored(row) if row is not None else None

    async def delete(self, owner: str, response_id: str) -> bool:
        if not _valid(owner, response_id):
            return False
        conditions = _visible(owner, response_id, self._clock())

        def op(conn: Connection) -> int:
            return int(conn.execute(delete(responses).where(*conditions)).rowcount)

        return bool(await self.store.write(op))

    async def chain(self, owner: str, response_id: str, *, max_items: int, max_bytes: int) -> list[StoredResponse]:
        if not _valid(owner, response_id):
            return []
        now = self._clock()
        r = responses.c
        first = (select(r.id, r.previous_id, literal_column("0").label("depth"), r.size.label("total_bytes"),
                        r.item_count.label("total_items"))
                 .where(*_visible(owner, response_id, now))
                 .cte("chain", recursive=True))
        # The next link only while the totals so far are within the bounds: the walk stops one link past them.
        walk = first.union_all(
            select(r.id, r.previous_id, first.c.depth + 1, first.c.total_bytes + r.size,
                   first.c.total_items + r.item_count)
            .where(r.id == first.c.previous_id, r.owner == owner, r.expires_at > now,
                   first.c.total_bytes <= max_bytes, first.c.total_items <= max_items)
        )
        async with self.store.engine.connect() as conn:
            links = (await conn.execute(
                select(walk.c.id, walk.c.total_bytes, walk.c.total_items).order_by(walk.c.depth))).all()
            if not links:
                return []
            _, total_bytes, total_items = links[-1]
            if int(total_bytes) > max_bytes or int(total_items) > max_items:
                raise ChainTooLong(f"the conversation is longer than {max_items} items or {max_bytes} bytes")
            ids = [link[0] for link in links]
            rows = (await conn.execute(select(responses).where(r.id.in_(ids)))).mappings().all()
        by_id = {row["id"]: _stored(row) for row in rows}
        # Oldest first. A link deleted between the two queries ends the chain there, as it would have before.
        found: list[StoredResponse] = []
        for rid in ids:
            if rid not in by_id:
                break
            found.append(by_id[rid])
        found.reverse()
        return found

    async def purge(self, now_ms: int) -> int:
        """In batches of `purge_batch`, each its own transaction through the writer, so a large backlog never
        holds the database (or the settlements queued behind it) for long."""
        batch = self.purge_batch

        def op(conn: Connection) -> int:
            expired = select(responses.c.id).where(responses.c.expires_at <= now_ms).limit(batch)
            return int(conn.execute(delete(responses).where(responses.c.id.in_(expired))).rowcount)

        total = 0
        while True:
            count = int(await self.store.write(op))
            total += count
            if count < batch:
                return total

    async def stats(self) -> tuple[int, int]:
        async with self.store.engine.connect() as conn:
            count, size = (await conn.execute(
                select(func.count(), func.coalesce(func.sum(responses.c.size), 0)))).one()
        return int(count), int(size)


def _valid(owner: str, response_id: str) -> bool:
    """An id or owner no row can have is not found without a query (PostgreSQL text cannot hold NUL, and asyncpg
    refuses to send it)."""
    return 0 < len(response_id) <= _ID_MAX and "\x00" not in response_id and "\x00" not in owner


def _visible(owner: str, response_id: str, now: int) -> list[Any]:
    return [responses.c.id == response_id, responses.c.owner == owner, responses.c.expires_at > now]


def _stored(row: Any) -> StoredResponse:
    return StoredResponse(
        id=row["id"], owner=row["owner"], created_at=int(row["created_at"]), expires_at=int(row["expires_at"]),
        previous_id=row["previous_id"], input_items=orjson.loads(row["input_items"]),
        response=orjson.loads(row["response"]),
    )
