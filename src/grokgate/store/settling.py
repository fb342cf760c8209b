"""The settlement of a batch, written against a small runner so that it runs unchanged through SQLAlchemy
(PostgreSQL), on a sqlite3 cursor in the serving process, and in the SQLite writer process, which imports no
SQLAlchemy (store/sqlite_writer.py).

Per token, the balance row is locked by the UPDATE that charges it, and the decisions are made against that
locked value, so concurrent replicas can never both spend the same credits. When the balance covers the
whole batch (the usual case) that is one statement; otherwise the row is locked, the charges are capped at
the balance (never below zero), and the capped total is charged. Reservations bound every cost, so a cap means a
bound failed: it is logged as an error (and counted by the serving process), not only noted on the ledger row.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from grokgate.core.accounts import Settlement

COUNTERS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "cost",
            "upstream_requests", "upstream_cost_ticks", "upstream_charged")

# Statement names, each bound to SQL by the runner (store/batch.py). The first four are on an account's balance:
# parameters account, delta / freed, charge / hold. The last three on a key's counters (core/budgets.py).
LOCK_BALANCE = "lock_balance"  # balance += delta, reserved -= delta; RETURNING balance
CHARGE_IN_FULL = "charge_in_full"  # if balance + freed >= charge: balance += freed - charge, reserved -= freed
CHARGE = "charge"  # balance -= charge
HOLD = "hold"  # balance -= hold, reserved += hold
KEY_SPEND = "key_spend"  # token, period, kind, charge, freed: count a settled charge in its period; RETURNING counters
KEY_LOCK = "key_lock"  # token, period, kind: start the period if it is newer; RETURNING limit and counters
OWN_CALENDAR = "*"  # the `kind` of a reservation row's period: the key's own calendar (store/batch.py _same)
KEY_HOLD = "key_hold"  # token, hold: period_reserved += hold

# What a settlement batch returns: each touched account's balance after it, and each touched key's (period_start,
# period_spent) after it.
KeySpend = tuple[dict[int, int], dict[int, tuple[int, int]]]

SQLITE_DAILY_CONFLICT = "ON CONFLICT (day, token_id, model) DO UPDATE SET " + ", ".join(
    f"{c} = {c} + excluded.{c}" for c in COUNTERS)


class UsageRow(NamedTuple):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    server_tool_calls: int = 0
    cost_in_usd_ticks: int | None = None  # the upstream's own figure (xAI's), when it reported one


class SettlementRow(NamedTuple):
    """A Settlement as plain data, for the writer process: it then needs none of grokgate.core's imports."""

    request_id: str
    token_id: int | None
    model: str
    backend: str
    usage: UsageRow
    cost: int
    price_version: int | None
    status: str
    estimated: bool
    duration_ms: int
    endpoint: str = "chat"  # chat | responses
    account_id: int | None = None
    period_start: int = 0
    limit_period: str | None = None


def as_row(s: Settlement) -> SettlementRow:
    u = s.usage
    return SettlementRow(s.request_id, s.token_id, s.model, s.backend,
                         UsageRow(u.prompt_tokens, u.completion_tokens, u.cached_tokens, u.reasoning_tokens,
                                  u.server_tool_calls, u.cost_in_usd_ticks),
                         s.cost, s.price_version, s.status, s.estimated, s.duration_ms, s.endpoint,
                         s.account_id, s.period_start, s.limit_period)


class Runner(Protocol):
    def first(self, name: str, params: dict[str, Any]) -> Any: ...

    def execute(self, name: str, params: dict[str, Any]) -> None: ...

    def insert(self, table: str, rows: list[dict[str, Any]], *, daily: bool = False) -> None: ...


def charge_and_record(run: Runner, fresh: Sequence[Settlement | SettlementRow],
                      held: dict[str, tuple[int, int]]) -> KeySpend:
    """Charge each settlement's cost to its account (releasing what its reservation held: `held` by request id,
    (amount, the key's period it was counted in)), count it in its key's period, and append its ledger row and
    daily totals; returns the touched accounts' balances and keys' counters after it."""
    charges: dict[str, int] = {}
    balances: dict[int, int] = {}
    by_account: dict[int, list[Settlement | SettlementRow]] = defaultdict(list)
    for s in fresh:
        if s.account_id is not None:
            by_account[s.account_id].append(s)
    for account_id, settlements in sorted(by_account.items()):  # one lock order for every replica: no deadlocks
        released = sum(held.get(s.request_id, (0, 0))[0] for s in settlements)
        wanted = sum(s.cost for s in settlements)
        row = run.first(CHARGE_IN_FULL, {"account": account_id, "freed": released, "charge": wanted})
        if row is not None:
            charges.update((s.request_id, s.cost) for s in settlements)
            balances[account_id] = int(row[0])
            continue
        row = run.first(LOCK_BALANCE, {"account": account_id, "delta": released})
        remaining = int(row[0]) if row is not None else 0
        total = 0
        for s in settlements:
            charge = min(s.cost, remaining)  # never below zero
            charges[s.request_id] = charge
            remaining -= charge
            total += charge
            if charge < s.cost:
                report_capped(s, charge)
        if total:
            run.execute(CHARGE, {"account": account_id, "charge": total})
        if row is not None:
            balances[account_id] = remaining

    # Each key's spend, in the period its requests were admitted in (core/budgets.py): after the accounts, in key
    # order, as reservations lock them.
    per_key: dict[tuple[int, int, str], list[int]] = {}
    for s in fresh:
        if s.account_id is None or s.token_id is None:
            continue
        if s.request_id in held:  # the reservation row's period, which moved with the key's (restart_period)
            amount, period = held[s.request_id]
            kind = OWN_CALENDAR
        else:  # released by crash recovery, or held in memory: the period admission computed
            amount, period, kind = 0, s.period_start, s.limit_period or ""
        key_totals = per_key.setdefault((s.token_id, period, kind), [0, 0])
        key_totals[0] += charges.get(s.request_id, 0)
        key_totals[1] += amount
    keys: dict[int, tuple[int, int]] = {}
    for (token_id, period, kind), (charge, freed) in sorted(per_key.items()):
        row = run.first(KEY_SPEND, {"token": token_id, "period": period, "kind": kind, "charge": charge,
                                    "freed": freed})
        if row is not None:
            keys[token_id] = (int(row[0]), int(row[1]))

    created = int(time.time() * 1000)
    day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    rows = []
    daily: dict[tuple[str, int, str], dict[str, int]] = {}
    accounts_of: dict[int, int] = {}
    for s in fresh:
        u, charge = s.usage, charges.get(s.request_id, 0)
        rows.append({
            "request_id": s.request_id, "token_id": s.token_id, "account_id": s.account_id, "kind": "usage",
            "model": s.model,
            "backend": s.backend, "endpoint": s.endpoint, "prompt_tokens": u.prompt_tokens,
            "cached_tokens": u.cached_tokens, "completion_tokens": u.completion_tokens,
            "reasoning_tokens": u.reasoning_tokens, "server_tool_calls": u.server_tool_calls, "amount": -charge,
            "cost": s.cost, "price_version": s.price_version, "status": s.status, "estimated": s.estimated,
            "duration_ms": s.duration_ms, "created_at": created, "upstream_cost_ticks": u.cost_in_usd_ticks,
            "note": None if charge == s.cost or s.account_id is None else f"cost {s.cost} capped at the balance",
        })
        accounts_of[s.token_id or 0] = s.account_id or 0
        totals = daily.setdefault((day, s.token_id or 0, s.model), dict.fromkeys(COUNTERS, 0))
        ticks = u.cost_in_usd_ticks
        for name, value in zip(COUNTERS, (1, u.prompt_tokens, u.cached_tokens, u.completion_tokens,
                                          u.reasoning_tokens, charge, int(ticks is not None), ticks or 0,
                                          charge if ticks is not None else 0), strict=True):
            totals[name] += value
    run.insert("ledger", rows)
    run.insert("usage_daily", [{"day": d, "token_id": t, "model": m, "account_id": accounts_of[t], **c}
                               for (d, t, m), c in daily.items()], daily=True)
    return balances, keys


def report_capped(s: Settlement | SettlementRow, charge: int) -> None:
    """Usage given away: unreachable while reservations bound the cost (core/pricing.py), so loud if taken.
    The serving process also counts it (the overrun metric in api/chat.py). Imported here, on this path only, so
    the SQLite writer process does not load logging otherwise; there, with no handler configured, the line goes
    to its stderr, which is the server's."""
    import logging

    logging.getLogger("grokgate.billing").error(
        "settlement capped at the balance: cost %d, charged %d (request %s, token %s)", s.cost, charge,
        s.request_id, s.token_id)


class SqliteCursorRunner:
    """The runner on a sqlite3 cursor, with each statement's SQL and parameter order given (compiled from
    SQLAlchemy once, by the caller). Row inserts are single multi-row statements rather than `executemany`:
    sqlite3 hands the GIL back and forth once per row it steps, and in a writer thread each retake competes
    with the event loop's thread."""

    def __init__(self, cursor: Any, statements: dict[str, tuple[str, tuple[str, ...]]], variables: int) -> None:
        self.cursor = cursor
        self.statements = statements
        self.variables = variables

    def first(self, name: str, params: dict[str, Any]) -> Any:
        sql, names = self.statements[name]
        return self.cursor.execute(sql, [params[n] for n in names]).fetchone()

    def execute(self, name: str, params: dict[str, Any]) -> None:
        sql, names = self.statements[name]
        self.cursor.execute(sql, [params[n] for n in names])

    def insert(self, table: str, rows: list[dict[str, Any]], *, daily: bool = False) -> None:
        if not rows:
            return
        conflict = SQLITE_DAILY_CONFLICT if daily else ""
        columns = list(rows[0])
        per_statement = max(1, self.variables // len(columns))
        group = "(" + ", ".join("?" * len(columns)) + ")"
        for start in range(0, len(rows), per_statement):
            chunk = rows[start:start + per_statement]
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([group] * len(chunk))} {conflict}"
            self.cursor.execute(sql, [row[c] for row in chunk for c in columns])
