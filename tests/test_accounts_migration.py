"""Migration 0006 from a database as today's main leaves it (revision 0005): every token becomes an account of the
same id with one key, same balance and reserved credits, its ledger, usage and stored responses following it; no
account id is one a deleted token had; and the migrated key keeps working (SQLite and PostgreSQL).

The database is brought to 0005 with Alembic (the head of main before accounts) and filled as that schema held
rows: balances on the tokens, stored responses owned by `token:<id>`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Connection, delete, insert, select, text

from grokgate.core.accounts import Settlement
from grokgate.core.budgets import Hold
from grokgate.core.events import Usage
from grokgate.store.schema import accounts, api_tokens, ledger, reservations, responses, usage_daily
from grokgate.store.sql import SqlStore, normalise_url
from tests.test_token_identity import _ledger_row, _response, _token, _usage, database, handed_out, rows_of

__all__ = ["database"]  # the fixture: a fresh SQLite file, or a PostgreSQL database of the test's own


async def at_0005(url: str, fill: Callable[[Connection], None]) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy.ext.asyncio import create_async_engine

    from grokgate.store import sql as sql_module

    config = Config()
    config.set_main_option("script_location", str(Path(sql_module.__file__).parent / "migrations"))

    def to_0005(sync_conn: Connection) -> None:
        config.attributes["connection"] = sync_conn
        command.upgrade(config, "0005")

    engine = create_async_engine(normalise_url(url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(to_0005)
        async with engine.begin() as conn:
            await conn.run_sync(fill)
    finally:
        await engine.dispose()


def main_database(conn: Connection) -> None:
    """Tokens 1, 2, 3 as main held them: balances on the tokens, 2 with a request in flight (reserved 40), 3
    deleted (its ledger and usage kept); a stored conversation and a deferred one of token 2."""
    one, two, three = _token(1, 1000), {**_token(2, 948), "reserved": 40}, _token(3, 488)
    conn.execute(insert(api_tokens), [one, two, three])
    handed_out(conn, 3)
    conn.execute(insert(reservations), [{"request_id": "in-flight", "token_id": 2, "amount": 40,
                                         "owner": "replica-a", "created_at": 1}])
    conn.execute(insert(ledger), [
        _ledger_row("topup-1", 1, "topup", 1000),
        _ledger_row("topup-2", 2, "topup", 1000), _ledger_row("chat-2", 2, "usage", -12),
        _ledger_row("topup-3", 3, "topup", 500), _ledger_row("chat-3", 3, "usage", -12)])
    conn.execute(insert(usage_daily), [_usage(2), _usage(3)])
    conn.execute(insert(responses), [_response("resp_2", "token:2"), _response("resp_d", "token:2#deferred"),
                                     _response("resp_k", "key:key-0123456789ab")])
    conn.execute(delete(api_tokens).where(api_tokens.c.id == 3))


def test_every_token_becomes_an_account_with_one_key_and_its_books(database: str) -> None:
    async def main() -> None:
        await at_0005(database, main_database)
        store = SqlStore(database)
        await store.open(serve=True)
        try:
            found = await rows_of(store, select(accounts).order_by(accounts.c.id))
            assert [(a["id"], a["name"], a["balance"], a["reserved"], a["disabled"]) for a in found] == [
                (1, "token-1", 1000, 0, False), (2, "token-2", 948, 40, False)]
            keys = await rows_of(store, select(api_tokens).order_by(api_tokens.c.id))
            assert [(k["id"], k["account_id"], k["balance"], k["reserved"], k["rpm"]) for k in keys] == [
                (1, 1, 0, 0, 10), (2, 2, 0, 0, 20)], "the balance moved to the account, the limits stayed"
            rows = await rows_of(store, select(ledger).order_by(ledger.c.id))
            assert [(r["request_id"], r["token_id"], r["account_id"]) for r in rows] == [
                ("topup-1", 1, 1), ("topup-2", 2, 2), ("chat-2", 2, 2), ("topup-3", 3, 3), ("chat-3", 3, 3)]
            assert {(u["token_id"], u["account_id"]) for u in await rows_of(store, select(usage_daily))} == {
                (2, 2), (3, 3)}
            owners = {r["id"]: r["owner"] for r in await rows_of(store, select(responses))}
            assert owners == {"resp_2": "account:2", "resp_d": "account:2#deferred",
                              "resp_k": "key:key-0123456789ab"}
            held = await rows_of(store, select(reservations))
            assert [(r["token_id"], r["account_id"], r["amount"]) for r in held] == [(2, 2, 40)]

            # Books: each account's balance + reserved is the sum of its ledger (the reservation not yet settled).
            for account_id, expected in ((1, 1000), (2, 988)):
                assert sum(r["amount"] for r in rows if r["account_id"] == account_id) == expected
            record = await store.require_token(2)
            assert (record.account_id, record.balance, record.reserved) == (2, 948, 40)

            # No account id a deleted token had (3), nor any id before it: new accounts start at 4.
            assert (await store.create_account("after")).id == 4
            key, _ = await store.create_token("new key")
            assert key.id == 4 and key.account_id == 5

            # The migrated key spends from its account, and its old reservation is released by the sweep.
            outcome = await store.reserve(Hold(2, 2, "after-upgrade", 900))
            assert outcome.granted
            await store.settle(Settlement("after-upgrade", 2, "grok-3", "t", Usage(prompt_tokens=1), 30, 1, "ok",
                                          False, 1, 900, account_id=2))
            assert (await store.require_account(2)).balance == 948 - 30
        finally:
            await store.close()

    asyncio.run(main())


def test_a_crashed_replicas_reservation_from_before_the_upgrade_goes_back_to_the_account(database: str) -> None:
    async def main() -> None:
        await at_0005(database, main_database)
        store = SqlStore(database, owner="replica-b")
        await store.open()
        try:
            assert await store.reclaim(owner="replica-a") == 1
            account = await store.require_account(2)
            assert (account.balance, account.reserved) == (988, 0)
        finally:
            await store.close()

    asyncio.run(main())


def test_accounts_start_past_the_tokens_sequence_even_with_no_token_left(database: str) -> None:
    def only_deleted(conn: Connection) -> None:
        conn.execute(insert(api_tokens), [_token(1, 0), _token(2, 0)])
        handed_out(conn, 7)  # ids up to 7 were handed out once
        if conn.dialect.name == "sqlite":
            conn.execute(text("UPDATE sqlite_sequence SET seq = 7 WHERE name = 'api_tokens'"))
        conn.execute(delete(api_tokens))

    async def main() -> None:
        await at_0005(database, only_deleted)
        store = SqlStore(database)
        await store.open()
        try:
            assert (await store.create_account("first")).id == 8
        finally:
            await store.close()

    asyncio.run(main())


