"""PostgreSQL's one-call group commit (store/pg_commit.py, migration 0007) decides exactly as the SQLAlchemy path.

The same seeded batches of reservations and settlements go to two fresh databases: one through store/batch.py
(`settle_many`, `reserve_many`: what SQLite and mixed batches still use), one through `grokgate_commit`. After every
batch the outcomes and every row both wrote must be equal: accounts, keys' period counters, reservations, the
ledger and the daily totals. The batches are built to reach each rule: balances too short (a settlement capped, a
hold refused), keys' spending limits, periods that start anew or belong to another calendar, settlements without a
reservation (released by crash recovery) or already on the ledger, the same request twice in a batch, a bootstrap
admin's settlement (no account), and an account or key that does not exist.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import pytest
from sqlalchemy import insert, select

from grokgate.core.accounts import Settlement, Usage
from grokgate.core.budgets import Hold
from grokgate.store.batch import reserve_many, settle_many
from grokgate.store.pg_commit import PgCommitter
from grokgate.store.schema import accounts, api_tokens, ledger, reservations, usage_daily
from grokgate.store.sql import SqlStore
from tests.conftest import PG_ADMIN_URL, _pg_execute

pytestmark = pytest.mark.e2e

DAY = 86_400_000
P1, P2 = 1_700_000_000_000, 1_700_000_000_000 + DAY  # two periods of a daily key, P2 the later
OWNER = "differential"


def _scenario(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    accts = [{"id": i, "name": f"a{i}", "created_at": 1, "disabled": False,
              "balance": rng.choice([0, 300, 5_000, 50_000]), "reserved": 0} for i in (1, 2, 3)]
    keys = []
    for i in range(1, 7):
        period = rng.choice([None, "daily", "weekly"])
        keys.append({"id": i, "name": f"k{i}", "prefix": f"p{i}", "token_hash": f"{i:064x}", "created_at": 1,
                     "disabled": False, "balance": 0, "reserved": 0, "account_id": 1 + (i - 1) % 3,
                     "spend_limit": rng.choice([None, 300, 400, 600, 3_000]), "limit_period": period,
                     "period_start": rng.choice([0, P1, P2]) if period else 0, "period_spent": rng.choice([0, 100]),
                     "period_reserved": 0})
    return accts, keys


async def _opened(name: str) -> SqlStore:
    store = SqlStore(f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}", owner=OWNER)
    await store.open()
    return store


async def _rows(store: SqlStore) -> dict[str, list[tuple[Any, ...]]]:
    queries = {
        "accounts": select(accounts.c.id, accounts.c.balance, accounts.c.reserved).order_by(accounts.c.id),
        "keys": select(api_tokens.c.id, api_tokens.c.period_start, api_tokens.c.period_spent,
                       api_tokens.c.period_reserved).order_by(api_tokens.c.id),
        "reservations": select(reservations.c.request_id, reservations.c.token_id, reservations.c.account_id,
                               reservations.c.amount, reservations.c.period_start,
                               reservations.c.owner).order_by(reservations.c.request_id),
        "ledger": select(*[c for c in ledger.c if c.name not in ("id", "created_at")]).order_by(ledger.c.id),
        "usage_daily": select(usage_daily).order_by(usage_daily.c.token_id, usage_daily.c.model),
    }
    async with store.engine.connect() as conn:
        return {name: [tuple(r) for r in (await conn.execute(q)).all()] for name, q in queries.items()}


def _batch(rng: random.Random, n: int, open_holds: dict[str, Hold], settled: list[str],
           ) -> tuple[list[Settlement], list[Hold]]:
    holds = []
    for _ in range(rng.randint(0, 8)):
        token = rng.randint(1, 7)  # 7: no such key
        account = 4 if token == 7 else 1 + (token - 1) % 3
        n += 1
        holds.append(Hold(account, token, f"r{n}", rng.choice([50, 100, 200, 300, 1_000, 4_000]),
                          rng.choice([P1, P2, 0]), rng.choice([None, "daily", "weekly"])))
    settles = []
    for rid in rng.sample(sorted(open_holds), k=rng.randint(0, len(open_holds))):
        h = open_holds.pop(rid)
        cost = rng.choice([0, h.amount // 2, h.amount, h.amount * 3])  # above the hold: only a capped case can pay
        settles.append(_settlement(rng, rid, h.token_id, h.account_id, cost, h.amount, h.period_start,
                                   h.limit_period))
    for _ in range(rng.randint(0, 2)):  # no reservation: released by a crash sweep, or never held
        n += 1
        token = rng.randint(1, 6)
        settles.append(_settlement(rng, f"s{n}", token, 1 + (token - 1) % 3, rng.choice([10, 500, 9_000]),
                                   rng.choice([0, 100]), rng.choice([P1, P2]), rng.choice([None, "daily"])))
    if settled and rng.random() < 0.3:  # already on the ledger
        settles.append(_settlement(rng, rng.choice(settled), 1, 1, 5, 0, P1, None))
    if settles and rng.random() < 0.3:  # the same request twice in one batch: the first counts
        first = settles[0]
        settles.append(_settlement(rng, first.request_id, first.token_id, first.account_id, first.cost + 7,
                                   first.reserved, first.period_start, first.limit_period))
    if rng.random() < 0.2:
        n += 1
        settles.append(_settlement(rng, f"admin{n}", None, None, 0, 0, 0, None))
    rng.shuffle(settles)
    return settles, holds


def _settlement(rng: random.Random, rid: str, token: int | None, account: int | None, cost: int, reserved: int,
                period: int, kind: str | None) -> Settlement:
    usage = Usage(rng.randint(0, 900), rng.randint(0, 900), rng.randint(0, 50), rng.randint(0, 20),
                  server_tool_calls=rng.randint(0, 2), cost_in_usd_ticks=rng.choice([None, 12_345]))
    return Settlement(rid, token, rng.choice(["grok-3", "grok-4"]), "fake", usage, cost, 1, rng.choice(["ok", "error"]),
                      rng.random() < 0.2, rng.randint(1, 999), reserved, rng.choice(["chat", "responses"]), account,
                      period, kind)


async def _differential(seed: int, name_a: str, name_b: str) -> None:
    rng = random.Random(seed)
    accts, keys = _scenario(rng)
    via_alchemy, via_function = await _opened(name_a), await _opened(name_b)
    committer = PgCommitter(via_function.url, OWNER)
    try:
        for store in (via_alchemy, via_function):
            async with store.engine.begin() as conn:
                await conn.execute(insert(accounts), accts)
                await conn.execute(insert(api_tokens), keys)
        open_holds: dict[str, Hold] = {}
        settled: list[str] = []
        n = 0
        for _ in range(25):
            settles, holds = _batch(rng, n, open_holds, settled)
            n += 100

            def run(conn: Any, settles: list[Settlement] = settles,
                    holds: list[Hold] = holds) -> tuple[Any, Any]:
                spent = settle_many(conn, settles, shared=True) if settles else ({}, {})
                return spent, reserve_many(conn, holds, OWNER)

            async with via_alchemy.engine.begin() as conn:
                expected = await conn.run_sync(run)
            got = await committer.commit(settles, holds)
            assert got[1] == expected[1], (seed, holds)
            assert got[0] == expected[0], (seed, settles)
            for hold, outcome in zip(holds, got[1], strict=True):
                if outcome.granted:
                    open_holds[hold.request_id] = hold
            settled.extend(s.request_id for s in settles)
            assert await _rows(via_function) == await _rows(via_alchemy), seed
    finally:
        await committer.close()
        for store in (via_alchemy, via_function):
            await store.close()


@pytest.mark.parametrize("seed", range(10))
def test_one_call_commit_decides_as_the_statement_path(seed: int) -> None:
    names = [f"grokgate_test_pgc_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    try:
        _pg_execute(f'CREATE DATABASE "{names[0]}"')
    except (OSError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    try:
        _pg_execute(f'CREATE DATABASE "{names[1]}"')
        asyncio.run(_differential(seed, *names))
    finally:
        for name in names:
            _pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
