"""Token ids are never reused (store/migrations 0004): a token created after another was deleted inherits none of its
ledger, usage, cached answers or balance, on SQLite as on PostgreSQL; and the migration keeps every id of an existing
database while handing out no id that anything still holds.

The reproduction runs over HTTP on the in-process app (tests/inproc.py); the migration tests bring a real database
to revision 0003 with Alembic, write rows as that schema had them, then open the store (which upgrades to head).
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, delete, insert, select, text

from grokgate.store.schema import accounts, api_tokens, ledger, responses, usage_daily
from grokgate.store.sql import SqlStore, normalise_url
from tests.conftest import E2E, PG_ADMIN_URL, TOKEN, _pg_execute, call, create_key, ok, user
from tests.inproc import AppServer, ScriptedProvider, app_server, scripted_models

ROUTING = """
backends: {local: {kind: local}}
models:
  grok-3: [{backend: local}]
cache:
  grok-3: {ttl: 600}
"""
BODY: dict[str, Any] = {"model": "grok-3", "messages": user("What is carol's secret?"), "temperature": 0,
                        "max_tokens": 16}
T0 = 1_780_000_000_000


def new_pg_database() -> tuple[str, str]:
    name = f"grokgate_test_{uuid.uuid4().hex[:12]}"
    try:
        _pg_execute(f'CREATE DATABASE "{name}"')
    except (OSError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    return name, f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=E2E)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty accounts database: a SQLite file, or a PostgreSQL database of this test's own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/accounts.db"
        return
    name, url = new_pg_database()
    try:
        yield url
    finally:
        _pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the reproduction, over HTTP ------------------------------------------------------------------------------------


def api(srv: AppServer, method: str, path: str, token: str = TOKEN, **kwargs: Any) -> Any:
    return ok(call(srv, method, path, token, **kwargs))


def ask(srv: AppServer, token: str) -> str:
    with srv.client() as c:
        r = c.post("/grok/chat/completions", json=BODY, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return r.headers["x-grokgate-cache"]


def test_a_token_created_after_a_deletion_inherits_nothing_of_the_deleted(tmp_path: Path, database: str) -> None:
    config = tmp_path / "routing.yaml"
    config.write_text(ROUTING)
    provider = ScriptedProvider(text="carol's answer")
    with app_server(tmp_path, scripted_models(provider), config=config, database_url=database) as srv:
        create_key(srv, "alice", credits="10")
        carol_secret, carol = create_key(srv, "carol", credits="10")
        assert ask(srv, carol_secret) == "miss"
        carol_rows = api(srv, "GET", "/v1/ledger", carol_secret)["data"]
        assert [r["kind"] for r in carol_rows] == ["usage", "topup"]
        assert api(srv, "GET", "/v1/usage", carol_secret)["data"]
        ok(call(srv, "DELETE", f"/admin/keys/{carol['id']}", TOKEN))

        dave_secret, dave = create_key(srv, "dave", credits="10")
        dave_rows = api(srv, "GET", "/v1/ledger", dave_secret)["data"]
        assert [r["kind"] for r in dave_rows] == ["topup"], "only dave's own top-up"
        assert api(srv, "GET", "/v1/usage", dave_secret)["data"] == []
        assert ask(srv, dave_secret) == "miss", "carol's cached answer is not dave's"
        assert len(provider.requests) == 2

        # The books: every token's balance is the sum of its ledger; carol's rows stay for the operator.
        for key in api(srv, "GET", "/admin/keys")["data"]:
            rows = api(srv, "GET", "/admin/ledger", params={"token": key["id"], "limit": 10_000})["data"]
            assert key["balance"] == sum(r["amount"] for r in rows), key
        everything = api(srv, "GET", "/admin/ledger", params={"limit": 10_000})["data"]
        assert {r["request_id"] for r in everything if r["token_id"] == carol["id"]} == {
            r["request_id"] for r in carol_rows}
        assert dave["id"] > carol["id"]


# -- the migration --------------------------------------------------------------------------------------------------


def _token(token_id: int, balance: int) -> dict[str, Any]:
    return {"id": token_id, "name": f"token-{token_id}", "prefix": f"gg-{token_id:08d}",
            "token_hash": f"{token_id:064x}", "created_at": T0 + token_id, "expires_at": None, "disabled": False,
            "allowed_models": ["grok-3"] if token_id == 2 else None, "rpm": 10 * token_id, "tpm": None,
            "max_concurrency": None, "balance": balance, "reserved": 0}


def _ledger_row(request_id: str, token_id: int, kind: str, amount: int) -> dict[str, Any]:
    return {"request_id": request_id, "token_id": token_id, "kind": kind, "model": "grok-3", "backend": "local",
            "endpoint": "chat" if kind == "usage" else None, "prompt_tokens": 5, "cached_tokens": 0,
            "completion_tokens": 7, "reasoning_tokens": 0, "server_tool_calls": 0, "amount": amount,
            "cost": -amount if kind == "usage" else 0, "price_version": 1, "status": "ok", "estimated": False,
            "duration_ms": 3, "note": None, "created_at": T0}


def _usage(token_id: int) -> dict[str, Any]:
    return {"day": "2026-06-01", "token_id": token_id, "model": "grok-3", "requests": 1, "prompt_tokens": 5,
            "cached_tokens": 0, "completion_tokens": 7, "reasoning_tokens": 0, "cost": 12}


def _response(response_id: str, owner: str) -> dict[str, Any]:
    return {"id": response_id, "owner": owner, "created_at": T0, "expires_at": 2 * T0, "previous_id": None,
            "input_items": "[]", "response": "{}", "size": 4, "item_count": 0}


def handed_out(conn: Connection, highest: int) -> None:
    """PostgreSQL's sequence as it is when it handed out the ids up to `highest` (rows written here name their ids)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT setval(pg_get_serial_sequence('api_tokens', 'id'), :n)"), {"n": highest})


def three_tokens_the_last_deleted(conn: Connection) -> None:
    """Tokens 1, 2 and 3 with top-ups and usage; 3 deleted as the admin API deletes (its ledger and usage kept)."""
    conn.execute(insert(api_tokens), [_token(1, 1000), _token(2, 988), _token(3, 488)])
    handed_out(conn, 3)
    conn.execute(insert(ledger), [
        _ledger_row("topup-1", 1, "topup", 1000),
        _ledger_row("topup-2", 2, "topup", 1000), _ledger_row("chat-2", 2, "usage", -12),
        _ledger_row("topup-3", 3, "topup", 500), _ledger_row("chat-3", 3, "usage", -12)])
    conn.execute(insert(usage_daily), [_usage(2), _usage(3)])
    conn.execute(insert(responses), [_response("resp_2", "token:2")])
    conn.execute(delete(api_tokens).where(api_tokens.c.id == 3))


async def at_0003(url: str, fill: Callable[[Connection], None]) -> None:
    """Bring an empty database to revision 0003 and write `fill`'s rows there."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy.ext.asyncio import create_async_engine

    from grokgate.store import sql as sql_module

    config = Config()
    config.set_main_option("script_location", str(Path(sql_module.__file__).parent / "migrations"))

    def to_0003(sync_conn: Connection) -> None:
        config.attributes["connection"] = sync_conn
        command.upgrade(config, "0003")

    engine = create_async_engine(normalise_url(url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(to_0003)
        async with engine.begin() as conn:
            await conn.run_sync(fill)
    finally:
        await engine.dispose()


async def rows_of(store: SqlStore, query: Any) -> list[dict[str, Any]]:
    async with store.engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(query)).mappings().all()]


def test_the_upgrade_keeps_every_id_and_never_hands_out_a_deleted_one(database: str) -> None:
    async def main() -> None:
        await at_0003(database, three_tokens_the_last_deleted)
        store = SqlStore(database)
        await store.open(serve=True)
        try:
            tokens = await rows_of(store, select(api_tokens).order_by(api_tokens.c.id))
            # Every column as it was, but the balance: since 0006 the token's account holds it (same id).
            assert [{k: t[k] for k in _token(1, 0)} for t in tokens] == [_token(1, 0), _token(2, 0)], \
                "ids and every column as they were"
            assert [(a["id"], a["balance"]) for a in await rows_of(store, select(accounts).order_by(accounts.c.id))] \
                == [(1, 1000), (2, 988)]
            assert len(await rows_of(store, select(ledger))) == 5, "the deleted token's ledger rows are kept"
            assert len(await rows_of(store, select(usage_daily))) == 2
            assert [r["id"] for r in await rows_of(store, select(responses))] == ["resp_2"]
            assert (await store.require_token(2)).allowed_models == ("grok-3",)
            record, _ = await store.create_token("after the upgrade")
            assert record.id == 4
            await store.delete_token(4)
            again, _ = await store.create_token("after a deletion")
            assert again.id == 5
            assert store.deployment_id
        finally:
            await store.close()

    asyncio.run(main())


@pytest.mark.parametrize("trace", ["ledger", "usage_daily", "responses"])
def test_an_id_that_only_a_deleted_tokens_rows_hold_is_not_handed_out(database: str, trace: str) -> None:
    """Token 9 was deleted long ago (its row is gone, the id was the highest once); what it left in one table is
    enough to keep its id from coming back. On PostgreSQL the sequence is left at 2, as restoring the rows without
    their sequence would leave it: the upgrade moves it past 9."""
    def fill(conn: Connection) -> None:
        conn.execute(insert(api_tokens), [_token(1, 0), _token(2, 0)])
        handed_out(conn, 2)
        conn.execute(insert(responses), [_response("resp_key", "key:key-0123456789ab")])  # not a token's
        if trace == "ledger":
            conn.execute(insert(ledger), [_ledger_row("topup-9", 9, "topup", 5)])
        elif trace == "usage_daily":
            conn.execute(insert(usage_daily), [_usage(9)])
        else:
            conn.execute(insert(responses), [_response("resp_9", "token:9")])

    async def main() -> None:
        await at_0003(database, fill)
        store = SqlStore(database)
        await store.open()
        try:
            record, _ = await store.create_token("next")
            assert record.id == 10
        finally:
            await store.close()

    asyncio.run(main())


def test_a_fresh_sqlite_database_has_autoincrement_ids(tmp_path: Path) -> None:
    async def main() -> None:
        store = SqlStore(f"sqlite:///{tmp_path}/fresh.db")
        await store.open(serve=True)
        try:
            first, _ = await store.create_token("first")
            second, _ = await store.create_token("second")
            await store.delete_token(second.id)
            third, _ = await store.create_token("third")
            assert (first.id, second.id, third.id) == (1, 2, 3)
        finally:
            await store.close()

    asyncio.run(main())
    with sqlite3.connect(tmp_path / "fresh.db") as db:
        (schema,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'api_tokens'").fetchone()
        assert "AUTOINCREMENT" in schema
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []


def test_a_reservation_survives_the_rebuild_and_still_follows_its_token(tmp_path: Path) -> None:
    """Reservations reference api_tokens ON DELETE CASCADE: the rebuild must neither lose them nor the reference."""
    url = f"sqlite:///{tmp_path}/held.db"

    def fill(conn: Connection) -> None:
        conn.execute(insert(api_tokens), [_token(1, 100), _token(2, 100)])
        conn.execute(text("INSERT INTO reservations VALUES ('held-1', 1, 5, 'replica', :t)"), {"t": T0})

    async def main() -> None:
        await at_0003(url, fill)
        store = SqlStore(url)
        await store.open()
        await store.close()

    asyncio.run(main())
    with sqlite3.connect(tmp_path / "held.db") as db:
        db.execute("PRAGMA foreign_keys = ON")
        assert db.execute("SELECT request_id, token_id, amount FROM reservations").fetchall() == [("held-1", 1, 5)]
        db.execute("DELETE FROM api_tokens WHERE id = 1")
        assert db.execute("SELECT count(*) FROM reservations").fetchone() == (0,), "the cascade still holds"


def test_an_upgrade_that_fails_midway_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    """SQLite runs DDL outside a transaction until the first write: the migration opens one first, so a failure
    (here: a table in the way of the rebuild) leaves revision 0003 whole, and the next start upgrades it."""
    path = tmp_path / "half.db"
    url = f"sqlite:///{path}"

    def fill(conn: Connection) -> None:
        conn.execute(insert(api_tokens), [_token(1, 100)])
        conn.execute(text("CREATE TABLE _api_tokens_0004 (x INTEGER)"))

    async def open_close() -> None:
        store = SqlStore(url)
        try:
            await store.open()
        finally:
            await store.close()

    asyncio.run(at_0003(url, fill))
    with pytest.raises(Exception, match="_api_tokens_0004"):
        asyncio.run(open_close())
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0003",)]
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "deployment" not in tables and "api_tokens" in tables
        assert db.execute("SELECT id, name FROM api_tokens").fetchall() == [(1, "token-1")]
        db.execute("DROP TABLE _api_tokens_0004")
    asyncio.run(open_close())
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0007",)]
        assert db.execute("SELECT id, name FROM api_tokens").fetchall() == [(1, "token-1")]
