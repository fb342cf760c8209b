"""Read-only reports on the account store: usage aggregates, ledger pages, error counts, totals.

Every query reads the daily aggregates or an indexed range of the ledger (`ix_ledger_created`,
`ix_ledger_token_created`, `ix_ledger_account_created`), never a full scan, so the console stays fast on large ledgers.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from grokgate.store.schema import ledger, usage_daily


class Reports:
    """Mixed into SqlStore, which provides `engine`."""

    @property
    def engine(self) -> AsyncEngine:
        raise NotImplementedError

    def to_csv(self, rows: list[dict[str, Any]]) -> str:
        return to_csv(rows)

    async def usage(self, *, token_id: int | None = None, since: str | None = None,
                    by: str = "day", account_id: int | None = None) -> list[dict[str, Any]]:
        from sqlalchemy import func

        key = usage_daily.c.day if by == "day" else usage_daily.c.model
        columns = [func.sum(getattr(usage_daily.c, c)).label(c) for c in
                   ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "cost",
                    "upstream_requests", "upstream_cost_ticks", "upstream_charged")]
        query = select(key.label(by), *columns).group_by(key).order_by(key)
        if token_id is not None:
            query = query.where(usage_daily.c.token_id == token_id)
        if account_id is not None:
            query = query.where(usage_daily.c.account_id == account_id)
        if since:
            query = query.where(usage_daily.c.day >= since)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [{k: (int(v) if k != by else v) for k, v in r.items()} for r in rows]

    async def ledger_rows(self, *, token_id: int | None = None, since_ms: int | None = None,
                          limit: int = 1000, account_id: int | None = None) -> list[dict[str, Any]]:
        query = select(ledger).order_by(ledger.c.id.desc()).limit(limit)
        if token_id is not None:
            query = query.where(ledger.c.token_id == token_id)
        if account_id is not None:
            query = query.where(ledger.c.account_id == account_id)
        if since_ms is not None:
            query = query.where(ledger.c.created_at >= since_ms)
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(query)).mappings().all()]

    @staticmethod
    def ledger_page_query(*, token_id: int | None = None, model: str | None = None, status: str | None = None,
                          kind: str | None = None, since_ms: int | None = None, until_ms: int | None = None,
                          cursor: tuple[int, int] | None = None, limit: int = 100,
                          endpoint: str | None = None, account_id: int | None = None) -> Any:
        """Newest first by (created_at, id), so the order comes straight from an index whose leading
        column (after token_id) is created_at; `cursor` is the (created_at, id) of the last row already
        shown. `status` "!x" means "anything but x". Model, status and kind are filters on the rows the range
        yields, so a selective one costs a walk of that range (bounded by since/until), never the table; so is
        `endpoint` (chat | responses)."""
        from sqlalchemy import and_, or_

        query = select(ledger)
        if token_id is not None:
            query = query.where(ledger.c.token_id == token_id)
        if account_id is not None:
            query = query.where(ledger.c.account_id == account_id)
        if since_ms is not None:
            query = query.where(ledger.c.created_at >= since_ms)
        upper = until_ms
        if cursor is not None:
            at, row_id = cursor
            upper = at + 1 if upper is None else min(upper, at + 1)
            query = query.where(or_(ledger.c.created_at < at, and_(ledger.c.created_at == at, ledger.c.id < row_id)))
        if upper is not None:
            query = query.where(ledger.c.created_at < upper)
        if model is not None:
            query = query.where(ledger.c.model == model)
        if status is not None:
            negate = status.startswith("!")
            value = status[1:] if negate else status
            query = query.where(ledger.c.status != value if negate else ledger.c.status == value)
        if kind is not None:
            query = query.where(ledger.c.kind == kind)
        if endpoint is not None:
            query = query.where(ledger.c.endpoint == endpoint)
        return query.order_by(ledger.c.created_at.desc(), ledger.c.id.desc()).limit(limit)

    async def ledger_page(self, *, limit: int = 100, **filters: Any) -> tuple[list[dict[str, Any]], bool]:
        """One page of ledger rows and whether more follow (one extra row is read to know)."""
        if any(isinstance(v, str) and "\x00" in v for v in filters.values()):
            return [], False  # no row holds NUL (PostgreSQL text cannot), and asyncpg would refuse to send it
        query = self.ledger_page_query(limit=limit + 1, **filters)
        async with self.engine.connect() as conn:
            rows = [dict(r) for r in (await conn.execute(query)).mappings().all()]
        return rows[:limit], len(rows) > limit

    @staticmethod
    def ledger_errors_query(*, token_id: int | None = None, since_ms: int, until_ms: int,
                            account_id: int | None = None) -> Any:
        """Failed requests (status != ok) per UTC day number and status, over one created_at range."""
        from sqlalchemy import func

        day = (ledger.c.created_at // 86_400_000).label("day_number")
        query = (select(day, ledger.c.status, func.count().label("count"))
                 .where(ledger.c.created_at >= since_ms, ledger.c.created_at < until_ms,
                        ledger.c.kind == "usage", ledger.c.status != "ok")
                 .group_by(day, ledger.c.status).order_by(day, ledger.c.status))
        if token_id is not None:
            query = query.where(ledger.c.token_id == token_id)
        if account_id is not None:
            query = query.where(ledger.c.account_id == account_id)
        return query

    async def ledger_errors(self, *, token_id: int | None = None, since_ms: int,
                            until_ms: int, account_id: int | None = None) -> list[dict[str, Any]]:
        """[{day: "YYYY-MM-DD" (UTC), status, count}] for the failed requests in [since_ms, until_ms)."""
        import datetime as dt

        query = self.ledger_errors_query(token_id=token_id, since_ms=since_ms, until_ms=until_ms,
                                         account_id=account_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        epoch = dt.date(1970, 1, 1)
        return [{"day": (epoch + dt.timedelta(days=int(d))).isoformat(), "status": s, "count": int(n)}
                for d, s, n in rows]


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Report rows as CSV, one column per key of the first row; no rows, no header (an empty body)."""
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()
