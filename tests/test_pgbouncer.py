"""grokgate on PostgreSQL through PgBouncer in transaction mode (issue 19): GROKGATE_DATABASE_POOLER=pgbouncer
(store/engine_options.py).

PgBouncer (Debian's package, installed by the set-up when missing: tests/services.py) is started by the test in
front of a fresh database, with fewer server connections than the replicas have clients, so transactions of
both replicas share them. Two replicas migrate the empty database through it at once, serve a burst of funded
requests (streamed and not) on one key, and the books come out exact: one ledger row per answer, the ledger's
sum equal to the balance moved, no reservation left, no prepared-statement error logged. The control shows the
failure the setting prevents: without it, the second statement on a pooled connection fails.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from grokgate.core.accounts import format_credits
from grokgate.store.engine_options import async_engine, asyncpg_connect_args, with_pooler
from grokgate.store.sql import normalise_url
from tests.conftest import E2E, Server, admin_post, create_key, start_servers, stop_server
from tests.fakes.fake_xai import FakeXAI
from tests.services import PgBouncer, pgbouncer
from tests.test_billing import CHEAP, admin_get, check_books, fake, reservation_of, upstream_env

__all__ = ["fake"]  # the upstream fixture, shared with tests/test_billing.py

STREAM = {**CHEAP, "stream": True}
PREPARED_ERRORS = ("prepared statement", "InvalidSQLStatementName", "DuplicatePreparedStatement",
                   "InvalidCachedStatement", "Traceback")


@dataclass
class Deployment:
    a: Server
    b: Server
    bouncer: PgBouncer

    def logs(self) -> str:
        return self.a.log() + self.b.log() + self.bouncer.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, fake: FakeXAI) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("pgbouncer")
    # 4 server connections for two replicas' pools (5 + 10 overflow each): clients wait for a transaction's
    # turn, and consecutive transactions of one client run on different server connections.
    with pgbouncer(pool_size=4) as bouncer:
        env = upstream_env(tmp, fake, GROKGATE_DATABASE_URL=bouncer.url, GROKGATE_DATABASE_POOLER="pgbouncer",
                           GROKGATE_MAX_CONNECTIONS_PER_CLIENT="1000", GROKGATE_LOG_LEVEL="WARNING")
        # Both at once, on the empty database: the migrations' transaction-scoped lock lets one migrate.
        a, b = start_servers(tmp, ("bounced-a", ("--slots", "2"), env), ("bounced-b", ("--slots", "2"), env))
        try:
            yield Deployment(a, b, bouncer)
        finally:
            stop_server(a)
            stop_server(b)


def direct(bouncer: PgBouncer, sql: str) -> Any:
    """One value from the database itself, not through PgBouncer."""
    async def run() -> Any:
        conn = await asyncpg.connect(bouncer.direct_url, timeout=5)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def no_prepared_statement_errors(d: Deployment) -> None:
    logs = d.logs()
    for marker in PREPARED_ERRORS:
        assert marker not in logs, f"{marker!r} logged:\n{logs[-4000:]}"


def fire_mixed(servers: list[Server], token: str, count: int) -> list[httpx.Response]:
    """`count` requests at once over the replicas, each on its own connection: on each replica, every other one
    streamed (request i goes to replica i % 2, streamed when (i // 2) is odd)."""
    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
        clients = [httpx.AsyncClient(base_url=s.url, timeout=300, limits=limits) for s in servers]
        try:
            return await asyncio.gather(*(
                clients[i % len(clients)].post("/grok/chat/completions", json=STREAM if (i // 2) % 2 else CHEAP,
                                                headers={"Authorization": f"Bearer {token}"})
                for i in range(count)))
        finally:
            for c in clients:
                await c.aclose()

    return asyncio.run(run())


def _head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    import grokgate.store

    config = Config()
    config.set_main_option("script_location", str(Path(grokgate.store.__file__).parent / "migrations"))
    return str(ScriptDirectory.from_config(config).get_current_head())


@E2E
def test_replicas_migrate_through_pgbouncer(deployment: Deployment) -> None:
    heads = direct(deployment.bouncer, "SELECT count(*) FROM alembic_version")
    assert heads == 1
    version = direct(deployment.bouncer, "SELECT version_num FROM alembic_version")
    assert version == _head(), version
    assert direct(deployment.bouncer, "SELECT count(*) FROM deployment") == 1, "one deployment id for both"
    no_prepared_statement_errors(deployment)


@E2E
def test_concurrent_funded_requests_keep_the_books_exact(deployment: Deployment) -> None:
    d = deployment
    reservation = max(reservation_of(d.a, CHEAP), reservation_of(d.a, STREAM))
    initial = reservation * 20 + reservation // 2  # funded for about 20
    token, key = create_key(d.a, f"bounced-{uuid.uuid4().hex[:6]}", credits=format_credits(initial))
    responses = fire_mixed([d.a, d.b], token, 120)
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 403}, [r.text for r in responses if r.status_code not in (200, 403)][:3]
    assert all(r.json()["error"]["code"] == "used_up" for r in responses if r.status_code == 403)
    served = codes.count(200)
    assert served >= 20 and 403 in codes, (served, codes)
    streamed = [r for i, r in enumerate(responses) if (i // 2) % 2 and r.status_code == 200]
    assert streamed, codes
    unfinished = [r.text[-300:] for r in streamed if not r.text.rstrip().endswith("data: [DONE]")]
    assert not unfinished, unfinished
    check_books(d.a, key["id"], initial, served)  # through PgBouncer: the admin API and the ledger
    assert direct(d.bouncer, f"SELECT count(*) FROM reservations WHERE token_id = {int(key['id'])}") == 0
    charged = -direct(d.bouncer, f"SELECT coalesce(sum(amount), 0) FROM ledger WHERE token_id = {int(key['id'])} "
                                 "AND kind = 'usage'")
    balance = direct(d.bouncer, "SELECT balance FROM accounts WHERE id = "
                                f"(SELECT account_id FROM api_tokens WHERE id = {int(key['id'])})")
    assert initial - balance == charged, "the database itself agrees"
    no_prepared_statement_errors(d)


@E2E
def test_the_admin_api_through_pgbouncer(deployment: Deployment) -> None:
    d = deployment
    account = admin_post(d.b, "/admin/accounts", {"name": f"acct-{uuid.uuid4().hex[:6]}", "credits": "5"})
    made = admin_post(d.a, f"/admin/accounts/{account['id']}/keys", {"name": "first"})
    assert d.b.chat(CHEAP, token=made["token"]).status_code == 200
    seen = admin_get(d.a, f"/admin/accounts/{account['id']}")
    assert [k["id"] for k in seen["data"]] == [made["key"]["id"]]
    assert seen["reserved"] == 0 and 0 < seen["balance"] < 5_000_000
    usage = admin_get(d.b, f"/admin/usage?account={account['id']}&by=model")["data"]
    assert sum(r["requests"] for r in usage) == 1
    no_prepared_statement_errors(d)


@E2E
def test_without_the_setting_pgbouncer_breaks_prepared_statements(deployment: Deployment) -> None:
    """The control: SQLAlchemy's default caches, through the same PgBouncer, fail on a pooled connection's second
    transaction (its cached statement was prepared on a server connection since reset); with the option, not."""
    url = normalise_url(deployment.bouncer.url)

    async def twice(store_url: str) -> None:
        engine = async_engine(store_url, pool_size=1, max_overflow=0)
        try:
            for _ in range(3):
                async with engine.begin() as conn:
                    assert (await conn.execute(text("SELECT 1"))).scalar() == 1
        finally:
            await engine.dispose()

    with pytest.raises(DBAPIError, match="prepared statement"):
        asyncio.run(twice(url))
    asyncio.run(twice(with_pooler(url, "pgbouncer")))

    async def raw() -> None:  # what a raw asyncpg path (asyncpg_connect_args) gets
        dsn, options = asyncpg_connect_args(with_pooler(url, "pgbouncer"))
        assert options == {"statement_cache_size": 0}
        conn = await asyncpg.connect(dsn, **options)
        try:
            for _ in range(3):
                assert await conn.fetchval("SELECT $1::int", 7) == 7
        finally:
            await conn.close()

    asyncio.run(raw())


def test_the_pooler_travels_on_the_url_and_no_driver_sees_it() -> None:
    from grokgate.store.engine_options import engine_args, split_pooler

    url = with_pooler("postgresql://u@h:6432/db?sslmode=require", "pgbouncer")
    assert split_pooler(url) == ("postgresql://u@h:6432/db?sslmode=require", "pgbouncer")
    assert with_pooler("postgresql://u@h/db", "none") == "postgresql://u@h/db"
    bare, options = engine_args(normalise_url(url))
    assert bare == "postgresql+asyncpg://u@h:6432/db?sslmode=require"
    args = options["connect_args"]
    assert args["statement_cache_size"] == 0 and args["prepared_statement_cache_size"] == 0
    assert args["prepared_statement_name_func"]() != args["prepared_statement_name_func"]()
    assert engine_args("postgresql+asyncpg://u@h/db") == (
        "postgresql+asyncpg://u@h/db", {"connect_args": {"timeout": 2.0, "command_timeout": 30.0}})
    assert engine_args("sqlite+aiosqlite:///x.db") == ("sqlite+aiosqlite:///x.db", {})
    # Migrations run unbounded: an UPDATE of a large ledger, or waiting on another replica's migration lock.
    assert engine_args("postgresql+asyncpg://u@h/db", bounded=False) == (
        "postgresql+asyncpg://u@h/db", {"connect_args": {"timeout": 2.0}})
    assert asyncpg_connect_args(normalise_url(url)) == ("postgresql://u@h:6432/db?sslmode=require",
                                                        {"statement_cache_size": 0})
    with pytest.raises(ValueError, match="PostgreSQL"):
        with_pooler("sqlite:///x.db", "pgbouncer")
