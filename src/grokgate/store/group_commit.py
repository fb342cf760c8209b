"""The group-commit writer, mixed into SqlStore (store/sql.py).

Writes (reservations, settlements, top-ups, admin changes) go through one writer task per process that commits
whatever has queued up while the previous commit ran: many requests per transaction, and no "database is locked"
fights between connections of one process. A batch commits in one of three ways:
- PostgreSQL, only settlements and reservations (the hot path): one call of `grokgate_commit` (store/pg_commit.py);
- SQLite with the writer process: settlements and row inserts in the child (store/sqlite_writer.py), the rest here;
- otherwise the batch's statements through SQLAlchemy (store/batch.py), in a thread on SQLite.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine

from grokgate.core.accounts import Settlement, StoreUnavailable
from grokgate.store.batch import reserve_many, settle_many
from grokgate.store.cache import RefreshingCache
from grokgate.store.parts import StorePart
from grokgate.store.pg_commit import PgCommitter
from grokgate.store.settling import KeySpend
from grokgate.store.sqlite_writer import SqliteWriter, WriterFailed

log = logging.getLogger("grokgate.store")

Op = Callable[[Connection], Any]

# What the SQLite writer process commits (store/sqlite_writer.py): settlements and rows given to `write_rows`.
_CHILD_KINDS = ("settle", "rows")
# What PostgreSQL commits in one call (store/pg_commit.py); a batch with anything else takes SQLAlchemy.
_PG_KINDS = ("settle", "reserve")


class GroupCommit(StorePart):
    """Mixed into SqlStore, which sets these up (store/sql.py)."""

    owner: str
    on_commit: Callable[[float, int], None] | None
    _closed: bool
    _max_batch: int
    _queue: list[tuple[str, Any, asyncio.Future[Any]]]
    _writers: list[asyncio.Task[None] | None]  # one slot per lane: batches committing at once
    _settler: SqliteWriter | None
    _pg: PgCommitter | None
    _sync_engine: Engine | None
    _memory_holds: bool
    _balances: RefreshingCache[int, int | None]
    _keys: RefreshingCache[int, tuple[int | None, int, int, str | None] | None]

    async def write(self, op: Op) -> Any:
        """Run `op` in the next group transaction and return its result once committed."""
        return await self._submit("op", op)

    async def write_rows(self, op: Op, sqlite_sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Insert rows in the next group transaction: `op` does it (PostgreSQL, or SQLite in a thread); with the
        SQLite writer process, the child runs `sqlite_sql` over `rows` in its settlement transaction instead, so
        the serving process spends no thread (and no GIL hand-offs) on them. `sqlite_sql` must be idempotent
        (INSERT OR IGNORE): after a writer failure the rows are written again here."""
        await self._submit("rows", (op, sqlite_sql, rows))

    async def _submit(self, kind: str, payload: Any) -> Any:
        if self._closed:
            raise RuntimeError("the store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((kind, payload, future))
        writers = self._writers  # one lane but PostgreSQL's serving path: SQLite commits in order
        for lane, writer in enumerate(writers):
            if writer is None or writer.done():
                writers[lane] = asyncio.create_task(self._drain(lane), name=f"store-writer-{lane}")
                break
        return await asyncio.shield(future)

    def writing(self) -> list[asyncio.Task[None]]:
        """The writers with a batch to commit (close() waits for them)."""
        return [w for w in self._writers if w is not None and not w.done()]

    async def _drain(self, lane: int = 0) -> None:
        """Commit what is queued, a batch at a time. On PostgreSQL a second lane takes the next batch while the
        first is still at the database (each on a connection of its own: store/pg_commit.py), so the database
        works on one batch while this process sends the next; rows they both touch (an account's balance) are
        locked in one order by both, so they serialise there and nowhere else."""
        while self._queue:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch:]
            started = time.perf_counter()
            try:
                results = await self._execute(batch, lane)
            except StoreUnavailable as exc:
                # The database is away: one by one, each would wait for it again. Every caller decides what
                # its item's unknown outcome means (store/holds.py).
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(StoreUnavailable(str(exc)))
                continue
            except Exception:
                # One bad operation must not sink the others: run each in its own transaction.
                for item in batch:
                    future = item[2]
                    try:
                        (result,) = await self._execute([item], lane)
                    except Exception as exc:
                        if not future.done():
                            future.set_exception(exc)
                    else:
                        if not future.done():
                            future.set_result(result)
                continue
            if self.on_commit is not None:  # outside the try: the batch is committed and must not run again
                self.on_commit(time.perf_counter() - started, len(batch))
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, _Failed):
                    future.set_exception(result.exc)
                else:
                    future.set_result(result)

    async def _execute(self, batch: list[tuple[str, Any, Any]], lane: int = 0) -> list[Any]:
        """One transaction for the batch. SQLite: the whole batch in one thread hop on a plain sqlite3
        connection (aiosqlite hops threads once per statement, which made the writer the bottleneck).
        PostgreSQL: the same synchronous code, driven over asyncpg by SQLAlchemy's run_sync. With the SQLite
        writer process, settlements commit there, after the batch's other operations."""
        if self._settler is not None and any(kind in _CHILD_KINDS for kind, _, _ in batch):
            return await self._execute_split(batch)
        if self._pg is not None and all(kind in _PG_KINDS for kind, _, _ in batch):
            return await self._execute_pg(batch, lane)
        if self._sync_engine is not None:
            return await asyncio.to_thread(self._execute_sync, batch)
        async with self.engine.begin() as conn:
            results: list[Any] = await conn.run_sync(self._run, batch)
            return results

    async def _execute_pg(self, batch: list[tuple[str, Any, Any]], lane: int) -> list[Any]:
        assert self._pg is not None
        spent, granted = await self._pg.commit([p for kind, p, _ in batch if kind == "settle"],
                                               [p for kind, p, _ in batch if kind == "reserve"], lane=lane)
        outcomes = iter(granted)
        return [spent if kind == "settle" else next(outcomes) for kind, _, _ in batch]

    async def _execute_split(self, batch: list[tuple[str, Any, Any]]) -> list[Any]:
        assert self._settler is not None
        results: list[Any] = [None] * len(batch)
        others = [i for i, (kind, _, _) in enumerate(batch) if kind not in _CHILD_KINDS]
        if others:
            done = await asyncio.to_thread(self._execute_sync, [batch[i] for i in others])
            for i, result in zip(others, done, strict=True):
                results[i] = result
        # From here on nothing may raise: the operations above are committed, and _drain would run them again.
        settles = [(i, payload) for i, (kind, payload, _) in enumerate(batch) if kind == "settle"]
        inserts = [(i, payload) for i, (kind, payload, _) in enumerate(batch) if kind == "rows"]
        try:
            balances = await self._settle_in_writer([payload for _, payload in settles],
                                                    [(sql, rows) for _, (_, sql, rows) in inserts])
            for i, _ in settles:
                results[i] = balances
        except Exception:
            for i, (op, _, _) in inserts:  # idempotent inserts: whatever the child did, write them here
                try:
                    results[i] = await asyncio.to_thread(self._execute_sync, [("op", op, None)])
                except Exception as exc:
                    results[i] = _Failed(exc)
            # One bad settlement must not sink the others: each on its own, in this process and through the
            # ledger check, since a child that failed mid-answer may have committed the batch after all.
            for i, payload in settles:
                self._forget_settled(payload)
                try:
                    results[i] = await asyncio.to_thread(self._settle_checked, [payload])
                except Exception as exc:
                    results[i] = _Failed(exc)
        return results

    def _forget_settled(self, s: Settlement) -> None:
        """A settlement whose outcome is unknown here: the cache reads its account and key again."""
        if s.account_id is not None:
            self._balances.invalidate(s.account_id)
        if s.token_id is not None:
            self._keys.invalidate(s.token_id)

    async def _settle_in_writer(self, settlements: list[Settlement],
                                inserts: list[tuple[str, list[tuple[Any, ...]]]]) -> KeySpend:
        assert self._settler is not None
        unique = list({s.request_id: s for s in reversed(settlements)}.values())  # the first of each id
        try:
            return await self._settler.settle(unique, inserts)
        except WriterFailed:
            # The child is stopped, so the batch committed there entirely or not at all; the shared path
            # skips what the ledger already has (and then cannot say those tokens' balances, so the cache
            # reads them again). The next batch starts a new child.
            log.warning("the SQLite writer process failed; settling its batch in this process", exc_info=True)
            for s in unique:
                self._forget_settled(s)
            if inserts:  # idempotent: the child may or may not have committed them
                await asyncio.to_thread(self._insert_sync, inserts)
            return await asyncio.to_thread(self._settle_checked, unique)

    def _insert_sync(self, inserts: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
        assert self._sync_engine is not None
        with self._sync_engine.begin() as conn:
            for sql, rows in inserts:
                conn.exec_driver_sql(sql, rows)

    def _settle_checked(self, settlements: list[Settlement]) -> KeySpend:
        assert self._sync_engine is not None
        with self._sync_engine.begin() as conn:
            return settle_many(conn, settlements, shared=True)

    def _execute_sync(self, batch: list[tuple[str, Any, Any]]) -> list[Any]:
        assert self._sync_engine is not None
        with self._sync_engine.begin() as conn:
            return self._run(conn, batch)

    def _run(self, conn: Connection, batch: list[tuple[str, Any, Any]]) -> list[Any]:
        """Plain operations, then settlements (they free credits), then reservations, each kind in a few
        statements for the whole batch."""
        results: list[Any] = [None] * len(batch)
        for i, (kind, payload, _) in enumerate(batch):
            if kind == "op":
                results[i] = payload(conn)
            elif kind == "rows":
                results[i] = payload[0](conn)
        settles = [(i, payload) for i, (kind, payload, _) in enumerate(batch) if kind == "settle"]
        if settles:
            balances = settle_many(conn, [p for _, p in settles], shared=not self._memory_holds)
            for i, _ in settles:
                results[i] = balances
        reserves = [(i, payload) for i, (kind, payload, _) in enumerate(batch) if kind == "reserve"]
        if reserves:
            granted = reserve_many(conn, [p for _, p in reserves], self.owner)
            for (i, _), ok in zip(reserves, granted, strict=True):
                results[i] = ok
        return results


class _Failed:
    """A result that is an exception (one settlement of a batch whose others went through)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
