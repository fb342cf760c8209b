"""The stored responses of the Responses API (core/responses.py): one contract, run against every implementation:
memory (store/responses_memory.py), SQLite in both writer modes and PostgreSQL (store/responses_sql.py); and
migration 0003 over a database at 0002 that already has ledger rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from grokgate.core.accounts import Settlement
from grokgate.core.events import Usage
from grokgate.core.responses import ChainTooLong, ResponseStore, StoredResponse, owner_of
from grokgate.store.responses_memory import MemoryResponseStore, measure
from grokgate.store.responses_sql import SqlResponseStore
from grokgate.store.sql import SqlStore
from tests.conftest import PG_ADMIN_URL

T0 = 1_800_000_000_000  # epoch ms: the tests' clock starts here
DAY = 86_400_000
ALICE = owner_of(1, "tok-1")
BOB = owner_of(2, "tok-2")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def turn(rid: str, previous: str | None = None, *, owner: str = ALICE, text: str = "hello", created: int = T0,
         expires: int = T0 + 30 * DAY, inputs: int = 1) -> StoredResponse:
    """One stored turn: `inputs` input items and one output message."""
    return StoredResponse(
        id=rid, owner=owner, created_at=created, expires_at=expires, previous_id=previous,
        input_items=[{"id": f"msg_{rid}_{i}", "type": "message", "role": "user",
                      "content": [{"type": "input_text", "text": f"{text} {i}"}]} for i in range(inputs)],
        response={"id": rid, "object": "response", "status": "completed", "created_at": created // 1000,
                  "output": [{"id": f"msg_{rid}_out", "type": "message", "role": "assistant", "status": "completed",
                              "content": [{"type": "output_text", "text": f"answer to {text}", "annotations": []}]}],
                  "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}},
    )


Scenario = Callable[[ResponseStore, Clock], Awaitable[None]]

BACKENDS = ["memory", "sqlite-process", "sqlite-thread", pytest.param("postgresql", marks=pytest.mark.e2e)]


@asynccontextmanager
async def opened(kind: str, tmp_path: Path, clock: Clock) -> AsyncIterator[ResponseStore]:
    if kind == "memory":
        yield MemoryResponseStore(1 << 20, clock=clock)
        return
    if kind == "postgresql":
        async with pg_database() as url:
            store = SqlStore(url)
            await store.open(serve=True)
            try:
                yield SqlResponseStore(store, purge_batch=2, clock=clock)
            finally:
                await store.close()
        return
    # The writer process settles in a child, and the response store's inserts commit there too, in the same
    # transaction as the batch's settlements (mixed below); with a writer thread, both run in this process.
    store = SqlStore(f"sqlite:///{tmp_path}/g.db", writer_process=kind == "sqlite-process")
    await store.open(serve=True)
    try:
        yield SqlResponseStore(store, purge_batch=2, clock=clock)
    finally:
        await store.close()


@asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for one test, dropped after it (skipped when PostgreSQL is absent)."""
    import uuid

    import asyncpg

    name = f"grokgate_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except (OSError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def run(kind: str, tmp_path: Path, scenario: Scenario) -> None:
    async def main() -> None:
        clock = Clock()
        async with opened(kind, tmp_path, clock) as store:
            await scenario(store, clock)

    asyncio.run(main())


# -- the contract ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
def test_save_get_delete(kind: str, tmp_path: Path) -> None:
    async def scenario(store: ResponseStore, clock: Clock) -> None:
        # Non-ASCII and NUL survive (a lone surrogate cannot arrive: pydantic and orjson refuse it in any JSON).
        first = turn("resp_a", text="héllo 😀 \x00")
        await store.save(first)
        assert await store.get(ALICE, "resp_a") == first
        assert (await store.get(ALICE, "resp_a")).output[0]["type"] == "message"  # type: ignore[union-attr]
        await store.save(dataclasses.replace(first, response={"id": "resp_a", "status": "failed"}))
        assert await store.get(ALICE, "resp_a") == first, "an id saved twice keeps the first"
        assert await store.get(ALICE, "resp_missing") is None
        assert await store.get(ALICE, "resp_\x00") is None  # no row can have it (PostgreSQL would refuse it)
        assert await store.get(ALICE, "r" * 5000) is None
        assert await store.delete(ALICE, "resp_a") is True
        assert await store.get(ALICE, "resp_a") is None
        assert await store.delete(ALICE, "resp_a") is False
        assert await store.chain(ALICE, "resp_a", max_items=100, max_bytes=1 << 20) == []

    run(kind, tmp_path, scenario)


@pytest.mark.parametrize("kind", BACKENDS)
def test_owners_are_isolated(kind: str, tmp_path: Path) -> None:
    async def scenario(store: ResponseStore, clock: Clock) -> None:
        await store.save(turn("resp_1"))
        await store.save(turn("resp_2", "resp_1"))
        # Bob's turn names Alice's response as its previous one: the link is not his, so his chain ends there.
        await store.save(turn("resp_b", "resp_2", owner=BOB))
        assert await store.get(BOB, "resp_1") is None
        assert await store.delete(BOB, "resp_1") is False
        assert await store.get(ALICE, "resp_1") is not None, "another owner's delete removed nothing"
        assert await store.chain(BOB, "resp_2", max_items=100, max_bytes=1 << 20) == []
        assert [r.id for r in await store.chain(BOB, "resp_b", max_items=100, max_bytes=1 << 20)] == ["resp_b"]
        assert await store.get(ALICE, "resp_b") is None
        assert owner_of(None, "key-0") != owner_of(0, "key-0")

    run(kind, tmp_path, scenario)


@pytest.mark.parametrize("kind", BACKENDS)
def test_expiry_and_purge(kind: str, tmp_path: Path) -> None:
    async def scenario(store: ResponseStore, clock: Clock) -> None:
        for i in range(5):
            await store.save(turn(f"resp_old{i}", expires=T0 + 1000))
        await store.save(turn("resp_new", expires=T0 + DAY))
        clock.now = T0 + 999
        assert await store.get(ALICE, "resp_old0") is not None
        assert await store.purge(clock.now) == 0, "nothing has expired yet"
        clock.now = T0 + 1000
        assert await store.get(ALICE, "resp_old0") is None, "not found once expired, before any purge"
        assert await store.delete(ALICE, "resp_old1") is False
        assert (await store.stats())[0] == 6, "expired but not yet purged"
        assert await store.purge(clock.now) == 5  # the SQL stores purge in batches of 2: three transactions
        assert (await store.stats()) == (1, measure(turn("resp_new", expires=T0 + DAY)).size)
        assert await store.get(ALICE, "resp_new") is not None
        assert await store.purge(clock.now) == 0

    run(kind, tmp_path, scenario)


@pytest.mark.parametrize("kind", BACKENDS)
def test_chain_order_and_ends(kind: str, tmp_path: Path) -> None:
    async def scenario(store: ResponseStore, clock: Clock) -> None:
        await store.save(turn("resp_1", expires=T0 + 1000))
        await store.save(turn("resp_2", "resp_1"))
        await store.save(turn("resp_3", "resp_2"))
        await store.save(turn("resp_4", "resp_3"))
        await store.save(turn("resp_x", "resp_2"))  # a branch: two answers continue resp_2
        big = {"max_items": 100, "max_bytes": 1 << 20}
        assert [r.id for r in await store.chain(ALICE, "resp_4", **big)] == ["resp_1", "resp_2", "resp_3", "resp_4"]
        assert [r.id for r in await store.chain(ALICE, "resp_x", **big)] == ["resp_1", "resp_2", "resp_x"]
        assert [r.id for r in await store.chain(ALICE, "resp_1", **big)] == ["resp_1"]
        assert (await store.chain(ALICE, "resp_4", **big))[0] == turn("resp_1", expires=T0 + 1000)
        assert await store.chain(ALICE, "resp_nope", **big) == []
        clock.now = T0 + 1000  # resp_1 expired: the chain ends after it
        assert [r.id for r in await store.chain(ALICE, "resp_4", **big)] == ["resp_2", "resp_3", "resp_4"]
        assert await store.delete(ALICE, "resp_3")  # a deleted link ends it too
        assert [r.id for r in await store.chain(ALICE, "resp_4", **big)] == ["resp_4"]

    run(kind, tmp_path, scenario)


@pytest.mark.parametrize("kind", BACKENDS)
def test_chain_too_long(kind: str, tmp_path: Path) -> None:
    async def scenario(store: ResponseStore, clock: Clock) -> None:
        turns = [turn("resp_1", inputs=3), turn("resp_2", "resp_1", inputs=1), turn("resp_3", "resp_2", inputs=2)]
        for t in turns:
            await store.save(t)
        items = sum(len(t.input_items) + len(t.output) for t in turns)
        assert items == 9
        size = sum(measure(t).size for t in turns)
        chain = await store.chain(ALICE, "resp_3", max_items=items, max_bytes=size)
        assert [r.id for r in chain] == ["resp_1", "resp_2", "resp_3"], "exactly at the bounds is within them"
        with pytest.raises(ChainTooLong):
            await store.chain(ALICE, "resp_3", max_items=items - 1, max_bytes=size)
        with pytest.raises(ChainTooLong):
            await store.chain(ALICE, "resp_3", max_items=items, max_bytes=size - 1)
        with pytest.raises(ChainTooLong):  # the newest turn alone is over the bound
            await store.chain(ALICE, "resp_3", max_items=2, max_bytes=size)
        # A shorter chain within the same bounds is fine.
        assert len(await store.chain(ALICE, "resp_2", max_items=items - 3, max_bytes=size)) == 2

    run(kind, tmp_path, scenario)


@pytest.mark.parametrize("kind", BACKENDS)
def test_stats(kind: str, tmp_path: Path) -> None:
    async def scenario(store: ResponseStore, clock: Clock) -> None:
        assert await store.stats() == (0, 0)
        a, b = turn("resp_a"), turn("resp_b", text="a longer text " * 50)
        await store.save(a)
        await store.save(b)
        assert await store.stats() == (2, measure(a).size + measure(b).size)
        await store.delete(ALICE, "resp_a")
        assert await store.stats() == (1, measure(b).size)

    run(kind, tmp_path, scenario)


@pytest.mark.parametrize("kind", ["sqlite-process", "sqlite-thread", pytest.param("postgresql", marks=pytest.mark.e2e)])
def test_saves_commit_beside_settlements(kind: str, tmp_path: Path) -> None:
    """Saves share the writer's group commits with settlements (on SQLite with a writer process, a batch is split
    between the serving process and the child): both land, neither is lost."""
    async def scenario(store: ResponseStore, clock: Clock) -> None:
        assert isinstance(store, SqlResponseStore)
        sql = store.store
        record, _ = await sql.create_token("t")
        await sql.add_credits(record.id, 1_000_000)
        settlements = [Settlement(request_id=f"req-{i}", token_id=record.id, account_id=record.account_id,
                                model="grok-3", backend="test",
                                  usage=Usage(prompt_tokens=1, completion_tokens=1), cost=10, price_version=1,
                                  status="ok", estimated=False, duration_ms=1, reserved=0, endpoint="responses")
                       for i in range(20)]
        saves = [turn(f"resp_{i}") for i in range(20)]
        await asyncio.gather(*(sql.settle(s) for s in settlements), *(store.save(t) for t in saves))
        assert (await store.stats())[0] == 20
        rows = [r for r in await sql.ledger_rows(token_id=record.id) if r["kind"] == "usage"]
        assert len(rows) == 20 and {r["endpoint"] for r in rows} == {"responses"}

    run(kind, tmp_path, scenario)


@pytest.mark.parametrize("committed", [True, False], ids=["committed-then-lost", "never-committed"])
def test_saves_survive_a_writer_process_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, committed: bool) -> None:
    """The child failed with saves and a settlement in its batch, after committing it (its answer lost) or
    before: the serving process writes the saves again (INSERT OR IGNORE: once) and settles through the ledger
    check (charged once)."""
    import pickle

    from grokgate.store.sqlite_writer import SqliteWriter, WriterFailed

    real_call = SqliteWriter._call
    lost = {"n": 0}

    async def commit_then_vanish(self: SqliteWriter, frame: bytes) -> tuple[str, Any]:
        payload = pickle.loads(frame[4:])
        failing = isinstance(payload, tuple) and payload[1] and not lost["n"]  # the first batch with inserts
        if failing and not committed:
            lost["n"] += 1
            raise WriterFailed("simulated: the child died before the batch")
        answer = await real_call(self, frame)
        if failing:
            lost["n"] += 1
            raise WriterFailed("simulated: the answer never arrived")
        return answer

    async def scenario(store: ResponseStore, clock: Clock) -> None:
        assert isinstance(store, SqlResponseStore)
        sql = store.store
        record, _ = await sql.create_token("t")
        await sql.add_credits(record.id, 1_000_000)
        monkeypatch.setattr(SqliteWriter, "_call", commit_then_vanish)
        settlement = Settlement(request_id="req-lost", token_id=record.id, account_id=record.account_id,
                                model="grok-3", backend="test",
                                usage=Usage(prompt_tokens=1, completion_tokens=1), cost=10, price_version=1,
                                status="ok", estimated=False, duration_ms=1, reserved=0, endpoint="responses")
        saves = [turn(f"resp_{i}") for i in range(5)]
        sizes = await asyncio.gather(*(store.save(t) for t in saves), sql.settle(settlement))
        assert lost["n"] == 1, "the lost answer happened"
        assert all(isinstance(size, int) for size in sizes[:5])
        assert (await store.stats())[0] == 5
        for t in saves:
            assert await store.get(ALICE, t.id) == t
        after = await sql.get_token(record.id)
        assert after is not None and after.balance == 1_000_000 - 10

    run("sqlite-process", tmp_path, scenario)


def test_memory_store_drops_the_oldest_past_its_bound() -> None:
    async def main() -> None:
        clock = Clock()
        one = measure(turn("resp_0")).size
        store = MemoryResponseStore(one * 3, clock=clock)
        for i in range(5):
            await store.save(turn(f"resp_{i}"))
        assert await store.stats() == (3, one * 3)
        assert [await store.get(ALICE, f"resp_{i}") is not None for i in range(5)] == [False, False, True, True, True]
        assert store.dropped == 2
        huge = turn("resp_huge", text="x" * (one * 4))
        await store.save(huge)  # larger than the whole bound: not kept, and nothing else is dropped for it
        assert await store.get(ALICE, "resp_huge") is None
        assert (await store.stats())[0] == 3

    asyncio.run(main())


# -- migration 0003 --------------------------------------------------------------------------------------------------


def _ledger_row(request_id: str, kind: str) -> dict[str, Any]:
    return {"request_id": request_id, "token_id": 99, "kind": kind, "model": "grok-3" if kind == "usage" else None,
            "backend": "local" if kind == "usage" else None, "prompt_tokens": 5, "cached_tokens": 0,
            "completion_tokens": 7, "reasoning_tokens": 0, "amount": -12 if kind == "usage" else 1000, "cost": 12,
            "price_version": 1, "status": "ok", "estimated": False, "duration_ms": 3, "note": None,
            "created_at": T0}


async def _migrate_from_0002(url: str) -> None:
    """Bring a database to 0002, write ledger rows as that schema had them, then open the store (to head)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import Column, MetaData, Table, insert, select
    from sqlalchemy.ext.asyncio import create_async_engine

    from grokgate.store import sql as sql_module
    from grokgate.store.schema import ledger, responses

    config = Config()
    config.set_main_option("script_location", str(Path(sql_module.__file__).parent / "migrations"))
    engine = create_async_engine(sql_module.normalise_url(url))
    # The ledger as 0002 had it: only its columns (no endpoint, no server_tool_calls).
    ledger_0002 = Table("ledger", MetaData(), *[Column(c.name, c.type) for c in ledger.columns
                                                if c.name not in ("endpoint", "server_tool_calls")])

    def to_0002(sync_conn: Any) -> None:
        config.attributes["connection"] = sync_conn
        command.upgrade(config, "0002")

    async with engine.begin() as conn:
        await conn.run_sync(to_0002)
        rows = [_ledger_row("chat-1", "usage"), _ledger_row("topup-1", "topup"), _ledger_row("chat-2", "usage")]
        await conn.execute(insert(ledger_0002), rows)
    await engine.dispose()

    store = SqlStore(url)
    await store.open()
    try:
        got = {r["request_id"]: r for r in await store.ledger_rows(limit=10)}
        assert {k: (v["endpoint"], v["server_tool_calls"]) for k, v in got.items()} == {
            "chat-1": ("chat", 0), "chat-2": ("chat", 0), "topup-1": (None, 0)}
        assert got["chat-1"]["cost"] == 12 and got["chat-1"]["model"] == "grok-3", "the old columns are intact"
        async with store.engine.connect() as conn:
            assert (await conn.execute(select(responses))).all() == []
        responses_store = SqlResponseStore(store)
        await responses_store.save(turn("resp_after_migration", expires=2 * T0))
        assert await responses_store.get(ALICE, "resp_after_migration") is not None
        # A new top-up has no endpoint either.
        record, _ = await store.create_token("after")
        await store.add_credits(record.id, 5)
        topups = [r for r in await store.ledger_rows(token_id=record.id) if r["kind"] == "topup"]
        assert [r["endpoint"] for r in topups] == [None]
    finally:
        await store.close()


def test_migration_from_0002_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    asyncio.run(_migrate_from_0002(url))
    with sqlite3.connect(tmp_path / "old.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0007",)]
        indexes = {row[1] for row in db.execute("PRAGMA index_list(responses)")}
        assert "ix_responses_expires" in indexes


@pytest.mark.e2e
def test_migration_from_0002_postgresql() -> None:
    async def main() -> None:
        async with pg_database() as url:
            await _migrate_from_0002(url)

    asyncio.run(main())
