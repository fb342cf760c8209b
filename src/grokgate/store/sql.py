"""The account store on SQLAlchemy (async): SQLite by default, PostgreSQL for several replicas.

This module opens, migrates and closes it; the rest is mixed in, one concern a module:
- store/group_commit.py: the writer (every write, committed in groups);
- store/holds.py: reservations and settlements (rows in PostgreSQL, memory on SQLite's one process);
- store/instances.py: heartbeats of PostgreSQL replicas and the release of what dead ones held;
- store/keys_sql.py, store/prices_sql.py, store/reports.py: accounts and keys, prices, usage reports.
Correctness across processes rests on the statements themselves (store/batch.py, migration 0007): a reservation
locks its account's row before it checks the balance, and a settlement locks it before it charges.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, make_url, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool, StaticPool

from grokgate.core.accounts import Settlement, TokenRecord, now_ms
from grokgate.core.pricing import Price
from grokgate.store.batch import dialect_insert, sqlite_statements
from grokgate.store.cache import RefreshingCache
from grokgate.store.engine_options import async_engine
from grokgate.store.group_commit import GroupCommit, Op
from grokgate.store.holds import HoldsMixin
from grokgate.store.instances import InstancesMixin
from grokgate.store.keys_sql import KeysMixin
from grokgate.store.pg_commit import PG_LANES, PgCommitter
from grokgate.store.prices_sql import PricesMixin
from grokgate.store.reports import Reports
from grokgate.store.schema import deployment
from grokgate.store.sqlite_writer import SqliteWriter, WriterFailed

log = logging.getLogger("grokgate.store")
T = TypeVar("T")
__all__ = ["Op", "SqlStore", "default_url", "normalise_url"]

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


class SqlStore(GroupCommit, HoldsMixin, InstancesMixin, KeysMixin, PricesMixin, Reports):
    def __init__(self, url: str, *, owner: str = "grokgate", max_batch: int = 256,
                 writer_process: bool = True, heartbeat_seconds: float = 10.0,
                 dead_after_seconds: float = 45.0, synchronous_commit: bool = False) -> None:
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
        self._synchronous_commit = synchronous_commit
        self._pg: PgCommitter | None = None  # PostgreSQL, serving: settlements and reservations in one call
        self._engine: AsyncEngine | None = None
        self._sync_engine: Engine | None = None  # SQLite's writer
        self._queue: list[tuple[str, Any, asyncio.Future[Any]]] = []
        self._writers: list[asyncio.Task[None] | None] = [None]  # PostgreSQL serving: PG_LANES (open)
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
        self._pending: dict[str, tuple[Settlement | None, float]] = {}  # kept while the database is away (holds.py)
        self._retrier: asyncio.Task[None] | None = None
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
            self._pg = PgCommitter(self.url, self.owner, durable=self._synchronous_commit)
            self._writers = [None] * PG_LANES
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

        if self.dialect != "postgresql":
            async with self.engine.begin() as conn:
                await conn.run_sync(run)
            return
        # Migrations may take minutes on a large ledger (and a replica waits for another's): an engine of their
        # own, without the serving engine's statement timeout (store/engine_options.py).
        engine = async_engine(self.url, bounded=False, poolclass=NullPool)
        try:
            async with engine.begin() as conn:
                # Replicas started together on an empty database would each create alembic_version and the
                # tables, and all but one fail (a unique violation in the catalog). One migrates at a time;
                # the others then find the schema at head. Released at commit.
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
                await conn.run_sync(run)
        finally:
            await engine.dispose()

    async def _read_deployment_id(self) -> str:
        """The one `deployment` row's id; made now (once, whichever replica gets there first) if it was deleted."""
        async with self.engine.begin() as conn:
            found = (await conn.execute(select(deployment.c.id).where(deployment.c.singleton == 1))).scalar()
            if found is None:
                await conn.execute(dialect_insert(self.dialect, deployment).values(
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
        while self._queue or self._unsettled or self.writing():
            if loop.time() >= deadline:
                log.warning("closing the store with %d reservation(s) unsettled and %d write(s) queued",
                            self._unsettled, len(self._queue))
                break
            if writing := self.writing():
                await asyncio.shield(asyncio.gather(*writing, return_exceptions=True))
            else:
                await asyncio.sleep(0.01)
        if self._retrier is not None:
            self._retrier.cancel()
            await asyncio.gather(self._retrier, return_exceptions=True)
            self._retrier = None
        if self._pending:
            log.error("closing with %d settlement(s) and release(s) not committed: the accounts database was "
                      "unreachable until shutdown; those requests go unbilled, and their reservations are released "
                      "by the other instances (or this one's next start)", len(self._pending))
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
        if self._pg is not None:
            await self._pg.close()
            self._pg = None
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
