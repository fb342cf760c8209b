"""Reservations and settlements of many requests in a few statements (inside one group transaction).

The settlement itself is in store/settling.py; this module binds its statements to SQLAlchemy and adds what
only a shared database needs: the idempotency check against the ledger and the reservation rows. A batch of
N requests over T tokens costs about T + 3 statements, not 4N.
"""

from __future__ import annotations

import functools
import sqlite3
from collections import defaultdict
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    String,
    Table,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal_column,
    select,
    update,
)

from grokgate.core.accounts import Settlement, now_ms
from grokgate.core.budgets import GRANTED, Hold, Reserved
from grokgate.store import settling
from grokgate.store.schema import accounts, api_tokens, ledger, reservations, usage_daily
from grokgate.store.settling import COUNTERS, KeySpend, SqliteCursorRunner, charge_and_record

# The statements are built once: constructing a SQLAlchemy statement costs more Python than running it.
_balance = accounts.c.balance
_account = accounts.c.id == bindparam("account")
_key = api_tokens.c.id == bindparam("token")
_start = api_tokens.c.period_start
_period: Any = bindparam("period")
_ZERO: Any = literal_column("0")  # in the SQL itself: the runners bind named parameters only
_kind: Any = bindparam("kind", type_=String)
# The hold's or settlement's period is of the key's own calendar: its reset period is the key's ("" for none), or
# "*" (OWN_CALENDAR: the period of a reservation row, which moves with the key's period, restart_period below).
# Only such a period may start a new one: a principal cached across an admin's change of the reset period computes
# the period with the old calendar, and daily -> weekly, weekly -> monthly or any -> none moves the key's start
# earlier, so the old calendar's start looks later and would zero the counters (the period's spend forgotten and
# the key past its limit). Of another calendar, the hold and the charge count in the key's counters' period.
_same: Any = ((_kind == literal_column("'*'"))
              | (func.coalesce(api_tokens.c.limit_period, literal_column("''")) == _kind))
_later = _same & (_start < _period)
STATEMENTS: dict[str, Any] = {
    settling.LOCK_BALANCE: (
        update(accounts).where(_account)
        .values(balance=_balance + bindparam("delta"), reserved=accounts.c.reserved - bindparam("delta"))
        .returning(_balance)
    ),
    settling.CHARGE_IN_FULL: (
        update(accounts)
        .where(_account, _balance + bindparam("freed") >= bindparam("charge"))
        .values(balance=_balance + bindparam("freed") - bindparam("charge"),
                reserved=accounts.c.reserved - bindparam("freed"))
        .returning(_balance)
    ),
    settling.CHARGE: update(accounts).where(_account).values(balance=_balance - bindparam("charge")),
    settling.HOLD: update(accounts).where(_account)
    .values(balance=_balance - bindparam("hold"), reserved=accounts.c.reserved + bindparam("hold")),
    # A key's counters belong to one period: a later period starts them again (core/budgets.py). Both statements
    # lock the key's row; every SET reads the row as it was (PostgreSQL and SQLite alike).
    settling.KEY_SPEND: (
        update(api_tokens).where(_key).values(
            period_spent=case((_start == _period, api_tokens.c.period_spent + bindparam("charge")),
                              (_later, bindparam("charge")), (_same, api_tokens.c.period_spent),
                              else_=api_tokens.c.period_spent + bindparam("charge")),
            period_reserved=case((_start == _period, api_tokens.c.period_reserved - bindparam("freed")),
                                 (_later, _ZERO), (_same, api_tokens.c.period_reserved),
                                 else_=api_tokens.c.period_reserved - bindparam("freed")),
            period_start=case((_later, _period), else_=_start))
        .returning(api_tokens.c.period_start, api_tokens.c.period_spent)
    ),
    settling.KEY_LOCK: (
        update(api_tokens).where(_key).values(
            period_spent=case((_later, _ZERO), else_=api_tokens.c.period_spent),
            period_reserved=case((_later, _ZERO), else_=api_tokens.c.period_reserved),
            period_start=case((_later, _period), else_=_start))
        .returning(api_tokens.c.spend_limit, api_tokens.c.period_start, api_tokens.c.period_spent,
                   api_tokens.c.period_reserved)
    ),
    settling.KEY_HOLD: update(api_tokens).where(_key)
    .values(period_reserved=api_tokens.c.period_reserved + bindparam("hold")),
}
_TABLES = {"ledger": ledger, "usage_daily": usage_daily, "reservations": reservations}


@functools.cache
def sqlite_statements() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each statement compiled for SQLite once: its SQL and the order of its parameters."""
    from sqlalchemy.dialects import sqlite

    compiled = {name: stmt.compile(dialect=sqlite.dialect()) for name, stmt in STATEMENTS.items()}
    return {name: (str(c), tuple(c.positiontup or ())) for name, c in compiled.items()}


class _AlchemyRunner:
    """The settlement runner through SQLAlchemy (PostgreSQL)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def first(self, name: str, params: dict[str, Any]) -> Any:
        return self.conn.execute(STATEMENTS[name], params).first()

    def execute(self, name: str, params: dict[str, Any]) -> None:
        self.conn.execute(STATEMENTS[name], params)

    def insert(self, table: str, rows: list[dict[str, Any]], *, daily: bool = False) -> None:
        if rows:
            self.conn.execute(_upsert_daily(self.conn.dialect.name) if daily else insert(_TABLES[table]), rows)


def runner(conn: Connection) -> _AlchemyRunner | SqliteCursorRunner:
    """On SQLite the statements run on the DBAPI cursor of the same connection, inside the same transaction:
    SQLAlchemy's execution context and result object per statement were a third of a one-request batch."""
    if conn.dialect.name != "sqlite":
        return _AlchemyRunner(conn)
    dbapi: Any = conn.connection.dbapi_connection
    return SqliteCursorRunner(dbapi.cursor(), sqlite_statements(), dbapi.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))


def reserve_many(conn: Connection, items: list[Hold], owner: str) -> list[Reserved]:
    """Hold each item against its account's balance and its key's spending limit, first come first served.
    Lock order, as settlements and releases take it: accounts by id, then keys by id (no deadlocks)."""
    results = [Reserved(False, "balance", 0)] * len(items)
    run = runner(conn)
    balances: dict[int, int] = {}
    for account_id in sorted({item.account_id for item in items}):
        row = run.first(settling.LOCK_BALANCE, {"account": account_id, "delta": 0})
        if row is not None:
            balances[account_id] = int(row[0])
    keys: dict[int, tuple[int | None, int, int]] = {}  # token -> (limit, its period, room used in it)
    for token_id, period, kind in sorted({(item.token_id, item.period_start, item.limit_period or "")
                                          for item in items}):
        if token_id in keys:
            continue  # one row, one period: the first item's (a batch spans a boundary only by a few ms)
        row = run.first(settling.KEY_LOCK, {"token": token_id, "period": period, "kind": kind})
        if row is not None:
            keys[token_id] = (None if row[0] is None else int(row[0]), int(row[1]), int(row[2]) + int(row[3]))
    held: dict[int, int] = defaultdict(int)
    key_held: dict[int, int] = defaultdict(int)
    rows = []
    for i, item in enumerate(items):
        balance = balances.get(item.account_id)
        key = keys.get(item.token_id)
        if balance is None or key is None:
            continue
        available = balance - held[item.account_id]
        if item.amount > available:
            results[i] = Reserved(False, "balance", max(0, available))
            continue
        limit, period, used = key
        if limit is not None and item.amount > limit - used - key_held[item.token_id]:
            results[i] = Reserved(False, "key_limit", max(0, limit - used - key_held[item.token_id]))
            continue
        held[item.account_id] += item.amount
        key_held[item.token_id] += item.amount
        results[i] = GRANTED
        rows.append({"request_id": item.request_id, "token_id": item.token_id, "account_id": item.account_id,
                     "amount": item.amount, "period_start": period, "owner": owner, "created_at": now_ms()})
    for account_id, total in sorted(held.items()):
        if total:
            run.execute(settling.HOLD, {"account": account_id, "hold": total})
    for token_id, total in sorted(key_held.items()):
        if total:
            run.execute(settling.KEY_HOLD, {"token": token_id, "hold": total})
    run.insert("reservations", rows)
    return results


def settle_many(conn: Connection, items: list[Settlement], *, shared: bool = True) -> KeySpend:
    """Settle the batch; returns each touched account's balance and key's counters after it (for the in-process
    cache).

    `shared=False` (one SQLite process, reservations in memory): no reservation rows to release, and no
    earlier settlement can exist (each request settles once, and a crashed run's requests never settle),
    so two statements per batch are skipped.
    """
    done: set[str] = set()
    if shared:
        ids = [s.request_id for s in items]
        done = set((conn.execute(select(ledger.c.request_id).where(ledger.c.request_id.in_(ids)))).scalars())
    fresh: dict[str, Settlement] = {}
    for s in items:
        if s.request_id not in done:  # settlement is idempotent by request id
            fresh.setdefault(s.request_id, s)
    if not fresh:
        return {}, {}
    held: dict[str, tuple[int, int]] = {}
    reserved_ids = [s.request_id for s in fresh.values() if shared and s.reserved and s.token_id is not None]
    if reserved_ids:
        result = conn.execute(delete(reservations).where(reservations.c.request_id.in_(reserved_ids))
                              .returning(reservations.c.request_id, reservations.c.amount,
                                         reservations.c.period_start))
        # Missing: released by crash recovery. The period is the one the reservation was counted in.
        held = {rid: (int(amount), int(period)) for rid, amount, period in result.all()}
    return charge_and_record(runner(conn), list(fresh.values()), held)


def release_held(conn: Connection, condition: ColumnElement[bool]) -> int:
    """Delete the reservations matching `condition` and give their amounts back: one UPDATE per account in id
    order, then one per key and period (the order settlements lock them in, so the two cannot deadlock). A
    settlement that comes later finds its reservation gone and charges the balance directly (store/batch.py)."""
    rows = conn.execute(delete(reservations).where(condition).returning(
        reservations.c.account_id, reservations.c.token_id, reservations.c.amount, reservations.c.period_start)).all()
    freed: dict[int, int] = defaultdict(int)
    key_freed: dict[tuple[int, int], int] = defaultdict(int)
    for account_id, token_id, amount, period in rows:
        freed[int(account_id if account_id is not None else token_id)] += int(amount)
        key_freed[(int(token_id), int(period))] += int(amount)
    for account_id, amount in sorted(freed.items()):
        conn.execute(update(accounts).where(accounts.c.id == account_id).values(
            balance=accounts.c.balance + amount, reserved=accounts.c.reserved - amount))
    for (token_id, period), amount in sorted(key_freed.items()):
        conn.execute(update(api_tokens).where(api_tokens.c.id == token_id, api_tokens.c.period_start == period)
                     .values(period_reserved=api_tokens.c.period_reserved - amount))
    return len(rows)


def dialect_insert(dialect: str, table: Table) -> Any:
    """INSERT with ON CONFLICT (both databases grokgate runs on have it)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    return insert(table)


@functools.cache
def _upsert_daily(dialect: str) -> Any:
    stmt = dialect_insert(dialect, usage_daily).values(
        day=bindparam("day"), token_id=bindparam("token_id"), model=bindparam("model"),
        account_id=bindparam("account_id"),
        **{c: bindparam(c) for c in COUNTERS},
    )
    return stmt.on_conflict_do_update(
        index_elements=["day", "token_id", "model"],
        set_={c: getattr(usage_daily.c, c) + getattr(stmt.excluded, c) for c in COUNTERS},
    )


def restart_period(conn: Connection, token_id: int, start: int) -> None:
    """A key's reset period changed: its counters move to the new period holding now, which starts at `start`.

    Left as they were, they would belong to the old period's calendar: a daily counter of a Tuesday is later than
    the week that started on Monday, so the week's spend would read 0 and its charges would never count (both
    statements above leave a counter of a later period alone) until the next Monday. The spend is what the key's
    ledger charged since `start` (the exact figure: a weekly counter knows nothing of Monday's daily one), and
    the reservations in flight move with it, so that they settle in the new period and free what they hold there.
    Reservations first, then the key's row: the order settlements and releases lock them in."""
    moved = (update(reservations).where(reservations.c.token_id == token_id, reservations.c.period_start != start)
             .values(period_start=start))
    conn.execute(moved)
    conn.execute(select(api_tokens.c.id).where(api_tokens.c.id == token_id).with_for_update())
    conn.execute(moved)  # what another replica reserved before the key's row was locked
    spent = conn.execute(select(func.coalesce(func.sum(-ledger.c.amount), 0)).where(
        ledger.c.token_id == token_id, ledger.c.kind == "usage", ledger.c.created_at >= start)).scalar()
    held = conn.execute(select(func.coalesce(func.sum(reservations.c.amount), 0)).where(
        reservations.c.token_id == token_id)).scalar()
    conn.execute(update(api_tokens).where(api_tokens.c.id == token_id).values(
        period_start=start, period_spent=int(spent or 0), period_reserved=int(held or 0)))
