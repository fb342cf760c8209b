"""PostgreSQL: a batch of settlements and reservations committed in one round trip.

The group-commit writer (store/group_commit.py) hands a batch that holds only settlements and reservations to
`PgCommitter.commit`, which calls `grokgate_commit(...)` (migration 0007) on a connection of its own: one statement,
its own transaction, the same rules as store/batch.py. Through SQLAlchemy the same batch was ~12 round trips, each
with its statement's Python around it; that was most of a PostgreSQL replica's cost per request.

The connection is plain asyncpg. Its one statement is prepared once per connection (then a call is one round
trip); behind a pooler in transaction mode (GROKGATE_DATABASE_POOLER=pgbouncer: store/engine_options.py), where a
prepared statement may not outlive its transaction, it is prepared unnamed on every call (two round trips).

A database that does not answer (refused, reset, timed out) is `StoreUnavailable`: the connection is dropped, the
next batch opens another, and the callers decide what the batch's unknown outcome means (store/holds.py: refuse,
release later, or keep the settlement until it commits, once by its request id).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from grokgate.core.accounts import Settlement, StoreUnavailable
from grokgate.core.budgets import GRANTED, Hold, Reserved
from grokgate.store.engine_options import asyncpg_connect_args
from grokgate.store.settling import KeySpend, report_capped

# Batches committing at once, each on its own connection (store/group_commit.py `_drain`).
PG_LANES = 2
_CALL = "SELECT grokgate_commit($1::jsonb, $2::jsonb, $3, $4, $5, $6)::text"
# A database that drops packets must not hold requests for the kernel's TCP timeout: past these a batch is
# StoreUnavailable (its outcome unknown, which its callers handle: store/holds.py).
_CONNECT_TIMEOUT_S = 2.0
_CALL_TIMEOUT_S = 10.0
# Errors that say the database is away (not that the batch is wrong): connection refused, reset or timed out; the
# server shutting down or starting up (class 57); too many connections (class 53).
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.exceptions.PostgresConnectionError, asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InsufficientResourcesError)


def settlement_item(s: Settlement) -> dict[str, Any]:
    u = s.usage
    return {"r": s.request_id, "t": s.token_id, "a": s.account_id, "m": s.model, "b": s.backend, "e": s.endpoint,
            "pt": u.prompt_tokens, "ct": u.cached_tokens, "ot": u.completion_tokens, "rt": u.reasoning_tokens,
            "st": u.server_tool_calls, "tk": u.cost_in_usd_ticks, "c": s.cost, "pv": s.price_version,
            "s": s.status, "est": s.estimated, "d": s.duration_ms, "ps": s.period_start, "lp": s.limit_period,
            "h": bool(s.reserved)}


def hold_item(h: Hold) -> dict[str, Any]:
    return {"r": h.request_id, "t": h.token_id, "a": h.account_id, "n": h.amount, "ps": h.period_start,
            "lp": h.limit_period}


def _reserved(row: list[Any]) -> Reserved:
    granted, limit, available = row
    return GRANTED if granted else Reserved(False, limit, int(available))


class PgCommitter:
    """One connection, used by the group-commit writer only (one batch at a time)."""

    def __init__(self, url: str, owner: str, *, durable: bool = False) -> None:
        self._dsn, options = asyncpg_connect_args(url)
        self._options = {"statement_cache_size": 8, **options}  # a pooler's turn the cache off
        self._owner = owner
        self._durable = durable
        self._conns: list[Any] = [None] * PG_LANES
        self._locks = [asyncio.Lock() for _ in range(PG_LANES)]

    async def _connection(self, lane: int) -> Any:
        conn = self._conns[lane]
        if conn is None or conn.is_closed():
            conn = self._conns[lane] = await asyncpg.connect(self._dsn, timeout=_CONNECT_TIMEOUT_S, **self._options)
        return conn

    async def commit(self, settlements: Sequence[Settlement], holds: Sequence[Hold],
                     lane: int = 0) -> tuple[KeySpend, list[Reserved]]:
        """Settle, then reserve, in one transaction. Returns the settled accounts' balances and keys' counters
        after it, and each hold's outcome in order."""
        settles = orjson.dumps([settlement_item(s) for s in settlements]).decode()
        reserves = orjson.dumps([hold_item(h) for h in holds]).decode()
        created = int(time.time() * 1000)
        today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        async with self._locks[lane]:
            try:
                conn = await self._connection(lane)
            except UNREACHABLE as exc:
                raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
            try:
                raw = await conn.fetchval(_CALL, settles, reserves, self._owner, created, today, self._durable,
                                          timeout=_CALL_TIMEOUT_S)
            except UNREACHABLE as exc:
                self._drop(lane)
                raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        result = orjson.loads(raw)
        spent: KeySpend = ({}, {})
        settled = result.get("s")
        if settled:
            by_id = {s.request_id: s for s in settlements}
            for request_id, charge in settled["c"]:
                report_capped(by_id[request_id], int(charge))
            spent = ({int(a): int(b) for a, b in settled["b"].items()},
                     {int(t): (int(v[0]), int(v[1])) for t, v in settled["k"].items()})
        return spent, [_reserved(row) for row in result["r"]]

    def _drop(self, lane: int) -> None:
        conn, self._conns[lane] = self._conns[lane], None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        for lane, lock in enumerate(self._locks):
            async with lock:
                conn, self._conns[lane] = self._conns[lane], None
                if conn is None:
                    continue
                try:
                    await asyncio.wait_for(conn.close(), 2.0)
                except (OSError, TimeoutError, asyncpg.exceptions.InterfaceError):
                    conn.terminate()
