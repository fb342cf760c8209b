"""The account store on SQLAlchemy (async): SQLite by default, PostgreSQL for several replicas.

Writes (reservations, settlements, top-ups) go through one writer task per process that commits whatever
has queued up while the previous commit ran: many requests per transaction (group commit), and no
"database is locked" fights between connections of one process. Correctness across processes rests on the
statements themselves: a reservation is `UPDATE ... WHERE balance >= amount`, and a settlement locks the
token row with an UPDATE before it reads the balance it charges against.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Interval,
    Table,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal,
    make_url,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import StaticPool

from grokgate.core.accounts import Settlement, TokenRecord, check_text, now_ms, storable
from grokgate.core.budgets import GRANTED, AccountRecord, Hold, Reserved, period_bounds, spent_in
from grokgate.core.pricing import Price
from grokgate.store.batch import release_held, reserve_many, settle_many, sqlite_statements
from grokgate.store.cache import RefreshingCache
from grokgate.store.engine_options import async_engine
from grokgate.store.keys_sql import KeysMixin
from grokgate.store.reports import Reports
from grokgate.store.schema import accounts, api_tokens, deployment, instances, prices, reservations
from grokgate.store.settling import KeySpend
from grokgate.store.sqlite_writer import SqliteWriter, WriterFailed

log = logging.getLogger("grokgate.store")
T = TypeVar("T")
Op = Callable[[Connection], Any]

_CACHE_SECONDS = 2.0
# PostgreSQL advisory lock key for migrations ("grokgate" in ASCII; one 64-bit namespace per database).
_MIGRATION_LOCK = 0x67726F6B67617465
_MIN_MISSED_BEATS = 3


def normalise_url(url: str) -> str:
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url[len("postgresql://"):]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///"):]
    return url


def default_url(data_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{data_dir / 'grokgate.db'}"


# What the SQLite writer process commits (store/sqlite_writer.py): settlements and rows given to `write_rows`.
_CHILD_KINDS = ("settle", "rows")


class SqlStore(KeysMixin, Reports):
    def __init__(self, url: str, *, owner: str = "grokgate", max_batch: int = 256,
                 writer_process: bool = True, heartbeat_seconds: float = 10.0,
                 dead_after_seconds: float = 45.0) -> None:
        self.url = normalise_url(url)
        self.owner = owner
        self.heartbeat_seconds = heartbeat_seconds
        # A live instance must never look dead between two of its heartbeats (a slow commit, a busy loop).
        if dead_after_seconds < _MIN_MISSED_BEATS * heartbeat_seconds:
            log.warning("instance_dead_after_seconds %.3g is below %d heartbeats of %.3g s; using %.3g",
                        dead_after_seconds, _MIN_MISSED_BEATS, heartbeat_seconds,
                        _MIN_MISSED_BEATS * heartbeat_seconds)
            dead_after_seconds = _MIN_MISSED_BEATS * heartbeat_seconds
        self.dead_after_seconds = dead_after_seconds
        self._heartbeat: asyncio.Task[None] | None = None  # shared databases, serving: heartbeat and sweep
        self._beaten = False  # our instance row was written at least once
        self._max_batch = max_batch
        self._use_writer_process = writer_process
        self._settler: SqliteWriter | None = None  # SQLite, serving: settlements commit in a child process
        self._engine: AsyncEngine | None = None
        self._sync_engine: Engine | None = None  # SQLite's writer
        self._queue: list[tuple[str, Any, asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._tokens: RefreshingCache[str, tuple[TokenRecord, bool] | None] = RefreshingCache(_CACHE_SECONDS)
        self._prices: RefreshingCache[str, dict[str, Price]] = RefreshingCache(_CACHE_SECONDS)
        self.on_commit: Callable[[float, int], None] | None = None  # metrics: (seconds, operations)
        # SQLite serves one process, so reservations live in memory: the request path then waits for one
        # commit (its settlement), not two. Each token's committed balance is cached (refreshed when older
        # than _CACHE_SECONDS, kept current by our own settlements) and what is held is subtracted from it.
        self._memory_holds = False
        self._held: dict[int, int] = {}  # account id -> micro-credits held
        self._key_held: dict[tuple[int, int], int] = {}  # (token id, period_start) -> held against its limit
        # (token id, period_start) -> the period its holds moved to when an admin changed the key's reset period
        # (store/batch.py restart_period): a request admitted before the change reserves and settles there.
        self._moved_periods: dict[tuple[int, int], int] = {}
        self._balances: RefreshingCache[int, int | None] = RefreshingCache(_CACHE_SECONDS)  # by account id
        # by token id: (spend limit, period_start, period_spent, limit_period)
        self._keys: RefreshingCache[int, tuple[int | None, int, int, str | None] | None] = RefreshingCache(
            _CACHE_SECONDS)
        self._lock_file: Any = None
        self._unsettled = 0  # reservations granted and not yet settled: close() waits for them
        self._closed = False
        # The deployment's identity (the `deployment` row, migration 0004), read at open: every replica of this
        # database has the same, another database never does (store/deployment.py).
        self.deployment_id: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("store is not open")
        return self._engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def open(self, *, migrate: bool = True, serve: bool = False) -> None:
        """`serve`: this process admits requests. On SQLite that makes it the only such process (a lock
        file enforces it) and lets reservations live in memory."""
        path = _sqlite_file(self.url)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._engine = async_engine(self.url, pool_pre_ping=True)  # store/engine_options.py: poolers
        if self.dialect == "sqlite":
            event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)
            self._sync_engine = create_engine(self.url.replace("+aiosqlite", ""), poolclass=StaticPool,
                                              connect_args={"check_same_thread": False})
            event.listen(self._sync_engine, "connect", _sqlite_pragmas)
            if serve:
                self._lock_file = _exclusive_lock(self.url)
                self._memory_holds = True
        if migrate:
            await self.upgrade()
        self.deployment_id = await self._read_deployment_id()
        if serve and self.dialect != "sqlite":
            # A shared database keeps reservation rows: announce that this instance is alive, release what
            # dead ones left, and keep doing both while serving.
            await self._beat()
            await self._sweep()
            self._heartbeat = asyncio.create_task(self._heartbeats(), name="store-heartbeat")
        if self._memory_holds and self._use_writer_process:
            if path is not None:
                settler = SqliteWriter(path, sqlite_statements())
                try:
                    await settler.start()
                except (OSError, WriterFailed):
                    log.warning("the SQLite writer process did not start; settlements commit in a thread",
                                exc_info=True)
                else:
                    self._settler = settler

    async def upgrade(self) -> None:
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))

        def run(sync_conn: Any) -> None:
            config.attributes["connection"] = sync_conn
            command.upgrade(config, "head")

        async with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Replicas started together on an empty database would each create alembic_version and the
                # tables, and all but one fail (a unique violation in the catalog). One migrates at a time;
                # the others then find the schema at head. Released at commit.
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            await conn.run_sync(run)

    async def _read_deployment_id(self) -> str:
        """The one `deployment` row's id; made now (once, whichever replica gets there first) if it was deleted."""
        async with self.engine.begin() as conn:
            found = (await conn.execute(select(deployment.c.id).where(deployment.c.singleton == 1))).scalar()
            if found is None:
                await conn.execute(_dialect_insert(self.dialect, deployment).values(
                    singleton=1, id=secrets.token_hex(8), created_at=now_ms()).on_conflict_do_nothing(
                    index_elements=["singleton"]))
                found = (await conn.execute(select(deployment.c.id).where(deployment.c.singleton == 1))).scalar_one()
        return str(found)

    async def close(self, grace: float = 10.0) -> None:
        """Settle what is owed, then close. At shutdown the server cancels requests it gave up waiting for
        and starts this at once; their settlements arrive from their `finally` a moment later, so this waits
        (up to `grace` seconds) for every granted reservation to be settled and every queued write to commit."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._queue or self._unsettled or (self._writer is not None and not self._writer.done()):
            if loop.time() >= deadline:
                log.warning("closing the store with %d reservation(s) unsettled and %d write(s) queued",
                            self._unsettled, len(self._queue))
                break
            if self._writer is not None and not self._writer.done():
                await asyncio.shield(self._writer)
            else:
                await asyncio.sleep(0.01)
        if self._heartbeat is not None:
            # Heartbeats went on while settlements drained (others must not take us for dead meanwhile).
            # Nothing of ours settles after this, so what is still held is released now, not after a lease.
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
            try:
                await self._retire()
            except Exception:
                log.warning("could not release this instance's reservations at shutdown", exc_info=True)
        self._closed = True
        for future in [f for _, _, f in self._queue if not f.done()]:
            future.set_exception(RuntimeError("the store is closed"))
        self._queue.clear()
        for cache in (self._tokens, self._prices, self._balances, self._keys):
            await cache.aclose()
        if self._settler is not None:
            await self._settler.close()
            self._settler = None
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
        if self._sync_engine is not None:  # closing SQLite's last connection checkpoints the WAL: disk work
            await asyncio.to_thread(self._sync_engine.dispose)
            self._sync_engine = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- the writer ----------------------------------------------------------------------------------------

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
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain(), name="store-writer")
        return await asyncio.shield(future)

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch:]
            started = time.perf_counter()
            try:
                results = await self._execute(batch)
            except Exception:
                # One bad operation must not sink the others: run each in its own transaction.
                for item in batch:
                    future = item[2]
                    try:
                        (result,) = await self._execute([item])
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

    async def _execute(self, batch: list[tuple[str, Any, Any]]) -> list[Any]:
        """One transaction for the batch. SQLite: the whole batch in one thread hop on a plain sqlite3
        connection (aiosqlite hops threads once per statement, which made the writer the bottleneck).
        PostgreSQL: the same synchronous code, driven over asyncpg by SQLAlchemy's run_sync. With the SQLite
        writer process, settlements commit there, after the batch's other operations."""
        if self._settler is not None and any(kind in _CHILD_KINDS for kind, _, _ in batch):
            return await self._execute_split(batch)
        if self._sync_engine is not None:
            return await asyncio.to_thread(self._execute_sync, batch)
        async with self.engine.begin() as conn:
            results: list[Any] = await conn.run_sync(self._run, batch)
            return results

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

    # -- prices --------------------------------------------------------------------------------------------

    async def current_prices(self) -> dict[str, Price]:
        return await self._prices.get("current", self._read_prices)

    async def _read_prices(self) -> dict[str, Price]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(prices).order_by(prices.c.model, prices.c.version))).mappings().all()
        return {r["model"]: _price(r) for r in rows}  # ordered by version: the last one wins

    async def current_price(self, model: str) -> Price | None:
        return (await self.current_prices()).get(model)

    async def price_history(self, model: str | None = None) -> list[Price]:
        query = select(prices).order_by(prices.c.model, prices.c.version)
        if model and not storable(model):
            return []  # no model can have this name (PostgreSQL would refuse to compare it)
        if model:
            query = query.where(prices.c.model == model)
        async with self.engine.connect() as conn:
            return [_price(r) for r in (await conn.execute(query)).mappings().all()]

    async def set_price(self, price: Price) -> Price:
        check_text(price.model, "model")

        def op(conn: Connection) -> int:
            latest = (conn.execute(
                select(prices.c.version).where(prices.c.model == price.model).order_by(prices.c.version.desc()).limit(1)
            )).scalar()
            version = int(latest or 0) + 1
            conn.execute(insert(prices).values(
                model=price.model, version=version, input=price.input, cached_input=price.cached_input,
                output=price.output, created_at=now_ms(),
            ))
            return version

        version = await self.write(op)
        self._prices.invalidate()
        return Price(price.model, price.input, price.cached_input, price.output, version)

    async def seed_prices(self, defaults: list[Price]) -> None:
        """Give every model without a price its default, once. Replicas starting together all try: version 1
        of a model is inserted by the first and skipped by the others (no unique violation at start)."""
        existing = await self.current_prices()
        missing = [p for p in defaults if p.model not in existing]
        if not missing:
            return
        rows = [{"model": p.model, "version": 1, "input": p.input, "cached_input": p.cached_input,
                 "output": p.output, "created_at": now_ms()} for p in missing]

        def op(conn: Connection) -> None:
            stmt = _dialect_insert(conn.dialect.name, prices).on_conflict_do_nothing(
                index_elements=["model", "version"])
            conn.execute(stmt, rows)

        await self.write(op)
        self._prices.invalidate()

    # -- reservations and settlement --------------------------------------------------------------------------

    async def reserve(self, hold: Hold) -> Reserved:
        if not self._memory_holds:
            outcome: Reserved = await self._submit("reserve", hold)
        else:
            outcome = await self._reserve_in_memory(hold)
        self._unsettled += outcome.granted and hold.amount > 0
        return outcome

    async def _reserve_in_memory(self, hold: Hold) -> Reserved:
        balance = await self._committed_balance(hold.account_id)
        key = await self._committed_key(hold.token_id)
        # No await between the checks and the holds: the event loop makes this one atomic step.
        if balance is None or key is None:
            return Reserved(False, "balance", 0)
        available = balance - self._held.get(hold.account_id, 0)
        if hold.amount > available:
            return Reserved(False, "balance", max(0, available))
        limit, stored_start, stored_spent, kind = key
        slot = (hold.token_id, self._moved_periods.get((hold.token_id, hold.period_start), hold.period_start))
        if (hold.limit_period or "") != (kind or "") and slot[1] != stored_start:
            # A principal cached across a change of the key's reset period computed the period with the old
            # calendar: the hold counts in the period the key's counters are in (store/batch.py _same), and its
            # settlement follows it there.
            self._moved_periods[(hold.token_id, hold.period_start)] = stored_start
            slot = (hold.token_id, stored_start)
        if limit is not None:
            room = limit - spent_in(slot[1], stored_start, stored_spent) - self._key_held.get(slot, 0)
            if hold.amount > room:
                return Reserved(False, "key_limit", max(0, room))
        self._held[hold.account_id] = self._held.get(hold.account_id, 0) + hold.amount
        self._key_held[slot] = self._key_held.get(slot, 0) + hold.amount
        return GRANTED

    async def settle(self, s: Settlement) -> None:
        if self._memory_holds and s.token_id is not None:
            moved = self._moved_periods.get((s.token_id, s.period_start))
            if moved is not None:
                s = dataclasses.replace(s, period_start=moved)
        try:
            spent: KeySpend = await self._submit("settle", s)
        finally:
            if s.account_id is not None and s.reserved:
                self._unsettled = max(0, self._unsettled - 1)
                if self._memory_holds:
                    self._held[s.account_id] = max(0, self._held.get(s.account_id, 0) - s.reserved)
                    slot = (s.token_id or 0, s.period_start)
                    left = self._key_held.get(slot, 0) - s.reserved
                    if left > 0:
                        self._key_held[slot] = left
                    else:
                        self._key_held.pop(slot, None)
        if self._memory_holds:
            # What each settlement read under the row lock is the newest committed state.
            balances, keys = spent
            for account_id, balance in balances.items():
                self._balances.put(account_id, balance)
            for token_id, (start, total) in keys.items():
                current = self._keys.peek(token_id)
                if current is not None:
                    self._keys.put(token_id, (current[0], start, total, current[3]))
                else:
                    # A read that began before this commit may still be storing the counters without this
                    # charge: dropping it makes the next reservation read them again.
                    self._keys.invalidate(token_id)

    async def _committed_balance(self, account_id: int) -> int | None:
        # A top-up by another process shows up within twice _CACHE_SECONDS (an expired entry is served
        # while it is read again), or at our next settlement of this account, which reads the balance; only
        # this process spends from it.
        return await self._balances.get(account_id, lambda: self._read_balance(account_id))

    async def _read_balance(self, account_id: int) -> int | None:
        async with self.engine.connect() as conn:
            value = (await conn.execute(select(accounts.c.balance).where(accounts.c.id == account_id))).scalar()
        return None if value is None else int(value)

    async def _committed_key(self, token_id: int) -> tuple[int | None, int, int, str | None] | None:
        """(spend limit, period_start, period_spent, limit_period) as committed; kept current by our settlements."""
        return await self._keys.get(token_id, lambda: self._read_key(token_id))

    async def _read_key(self, token_id: int) -> tuple[int | None, int, int, str | None] | None:
        query = select(api_tokens.c.spend_limit, api_tokens.c.period_start, api_tokens.c.period_spent,
                       api_tokens.c.limit_period).where(api_tokens.c.id == token_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else (None if row[0] is None else int(row[0]), int(row[1]), int(row[2]), row[3])

    def _with_holds(self, record: TokenRecord) -> TokenRecord:
        held = self._held.get(record.account_id, 0)
        start, _ = period_bounds(record.limit_period, now_ms())
        key_held = self._key_held.get((record.id, start), 0)
        if not held and not key_held:
            return record
        return dataclasses.replace(record, balance=record.balance - held, reserved=record.reserved + held,
                                   period_start=start, period_spent=spent_in(start, record.period_start,
                                                                             record.period_spent),
                                   period_reserved=key_held)

    def _restart_held(self, token_id: int, before: int, start: int) -> None:
        """The key's counters moved from the period starting at `before` to the one starting at `start` (its reset
        period changed): so do the holds of its requests in flight, and those of requests admitted before it."""
        if not self._memory_holds:
            return  # reservation rows, moved in the same transaction
        self._moved_periods[(token_id, before)] = start
        for slot in [slot for slot in self._key_held if slot[0] == token_id and slot[1] != start]:
            self._key_held[(token_id, start)] = self._key_held.get((token_id, start), 0) + self._key_held.pop(slot)
            self._moved_periods[slot] = start
        for slot in [slot for slot in self._moved_periods if slot[0] == token_id]:
            self._moved_periods[slot] = start
        self._moved_periods.pop((token_id, start), None)  # the new period is its own

    def _account_with_holds(self, record: AccountRecord) -> AccountRecord:
        held = self._held.get(record.id, 0)
        if not held:
            return record
        return dataclasses.replace(record, balance=record.balance - held, reserved=record.reserved + held)

    def _forget(self, *, token_id: int | None = None, account_id: int | None = None) -> None:
        """An admin change: what this process caches of the token or the account is read again."""
        self._tokens.invalidate()
        if token_id is not None:
            self._keys.invalidate(token_id)
        if account_id is not None:
            self._balances.invalidate(account_id)

    async def reclaim(self, *, owner: str | None = None, older_than_ms: int | None = None) -> int:
        """Release reservations left by a crash: this owner's, or any older than the cut-off."""
        conditions: list[ColumnElement[bool]] = []
        if owner is not None:
            conditions.append(reservations.c.owner == owner)
        if older_than_ms is not None:
            conditions.append(reservations.c.created_at < now_ms() - older_than_ms)
        if not conditions:
            return 0
        count = int(await self.write(lambda conn: release_held(conn, or_(*conditions))))
        if count:
            log.warning("released reservations left by an earlier run", extra={"count": count})
        return count

    # -- instances: heartbeats, and the reservations of dead ones ---------------------------------------------

    def _stale(self) -> ColumnElement[bool]:
        """Another instance whose heartbeat is older than dead_after, by the database's clock (replicas'
        clocks may disagree; the database's is the one they share)."""
        limit = literal(timedelta(seconds=self.dead_after_seconds), Interval())
        return (instances.c.heartbeat_at < func.now() - limit) & (instances.c.owner != self.owner)

    async def _heartbeats(self) -> None:
        """Beat every heartbeat_seconds; sweep alongside, in its own task, so a sweep waiting on the writer
        (a busy group commit, a lock held by another replica) never delays a beat."""
        sweep: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(self.heartbeat_seconds)
                try:
                    await self._beat()
                except Exception:  # the database may be briefly away: keep beating
                    log.warning("instance heartbeat failed", exc_info=True)
                if sweep is None or sweep.done():
                    sweep = asyncio.create_task(self._sweep_logged(), name="store-sweep")
        finally:
            if sweep is not None:
                sweep.cancel()
                await asyncio.gather(sweep, return_exceptions=True)

    async def _sweep_logged(self) -> None:
        try:
            await self._sweep()
        except Exception:
            log.warning("releasing dead instances' reservations failed", exc_info=True)

    async def _beat(self) -> None:
        """Renew our heartbeat, on its own connection: a backlog of the writer must not make us look dead."""
        async with self.engine.begin() as conn:
            renewed = (await conn.execute(update(instances).where(instances.c.owner == self.owner)
                                          .values(heartbeat_at=func.now()))).rowcount
            if not renewed:
                stmt = _dialect_insert(self.dialect, instances).values(
                    owner=self.owner, heartbeat_at=func.now(), started_at=func.now())
                await conn.execute(stmt.on_conflict_do_update(index_elements=["owner"],
                                                              set_={"heartbeat_at": func.now()}))
        if not renewed and self._beaten:
            log.error("this instance (%s) was taken for dead (no heartbeat for %.3g s): its reservations were "
                      "released, so requests in flight are charged without them", self.owner,
                      self.dead_after_seconds)
        self._beaten = True

    async def _sweep(self) -> int:
        """Release the reservations of instances that stopped beating (killed, or rescheduled under a new
        instance id, so no restart of theirs would release them), then forget those instances. A read
        first: the usual answer is "nobody is dead", and that costs no write."""
        async with self.engine.connect() as conn:
            dead = (await conn.execute(select(instances.c.owner).where(self._stale()))).scalars().all()
        if not dead:
            return 0
        stale = self._stale()

        def op(conn: Connection) -> int:
            # The staleness is checked again inside the transaction: an instance that beat since is alive.
            count = release_held(conn, reservations.c.owner.in_(select(instances.c.owner).where(stale)))
            conn.execute(delete(instances).where(stale))
            return count

        count = int(await self.write(op))
        log.log(logging.WARNING if count else logging.INFO,
                "released the reservations of instances with no heartbeat for %.3g s", self.dead_after_seconds,
                extra={"count": count, "instances": sorted(dead)})
        return count

    async def _retire(self) -> None:
        owner = self.owner

        def op(conn: Connection) -> int:
            count = release_held(conn, reservations.c.owner == owner)
            conn.execute(delete(instances).where(instances.c.owner == owner))
            return count

        count = int(await self.write(op))
        if count:
            log.warning("released reservations still held at shutdown", extra={"count": count})


def _dialect_insert(dialect: str, table: Table) -> Any:
    """INSERT with ON CONFLICT (both databases grokgate runs on have it)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert  # type: ignore[assignment]
    return dialect_insert(table)


class _Failed:
    """A result that is an exception (one settlement of a batch whose others went through)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _exclusive_lock(url: str) -> Any:
    """One serving process per SQLite file: reservations are held in its memory."""
    import fcntl

    path = _sqlite_file(url)
    if path is None:
        return None
    handle = open(path + ".lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RuntimeError(f"another grokgate is serving from {path}; several processes need PostgreSQL "
                           "(GROKGATE_DATABASE_URL)") from None
    return handle


def _sqlite_file(url: str) -> str | None:
    """The database file of a SQLite URL (None for another database or memory); a query string such as
    `?timeout=20` is not part of it."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or not parsed.database or parsed.database == ":memory:":
        return None
    return parsed.database


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL + NORMAL: a committed transaction survives the process being killed (not a power cut).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _price(row: Any) -> Price:
    return Price(model=row["model"], input=int(row["input"]), cached_input=int(row["cached_input"]),
                 output=int(row["output"]), version=int(row["version"]))
