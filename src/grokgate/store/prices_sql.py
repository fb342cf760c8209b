"""Prices by model, versioned (every change a new version; the ledger names the one it charged), mixed into
SqlStore (store/sql.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, insert, select

from grokgate.core.accounts import check_text, now_ms, storable
from grokgate.core.pricing import Price
from grokgate.store.batch import dialect_insert
from grokgate.store.cache import RefreshingCache
from grokgate.store.parts import StorePart
from grokgate.store.schema import prices


class PricesMixin(StorePart):
    """Mixed into SqlStore, which provides these."""

    _prices: RefreshingCache[str, dict[str, Price]]

    async def current_prices(self) -> dict[str, Price]:
        return await self._prices.get("current", self._read_prices)

    async def _read_prices(self) -> dict[str, Price]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(prices).order_by(prices.c.model, prices.c.version))).mappings().all()
        return {r["model"]: _price(r) for r in rows}  # ordered by version: the last one wins

    async def current_price(self, model: str) -> Price | None:
        return (await self.current_prices()).get(model)

    async def price_history(self, model: str | None = None) -> list[Price]:
        query = select(prices).order_by(prices.c.model, prices.c.version)
        if model and not storable(model):
            return []  # no model can have this name (PostgreSQL would refuse to compare it)
        if model:
            query = query.where(prices.c.model == model)
        async with self.engine.connect() as conn:
            return [_price(r) for r in (await conn.execute(query)).mappings().all()]

    async def set_price(self, price: Price) -> Price:
        check_text(price.model, "model")

        def op(conn: Connection) -> int:
            latest = (conn.execute(
                select(prices.c.version).where(prices.c.model == price.model).order_by(prices.c.version.desc()).limit(1)
            )).scalar()
            version = int(latest or 0) + 1
            conn.execute(insert(prices).values(
                model=price.model, version=version, input=price.input, cached_input=price.cached_input,
                output=price.output, created_at=now_ms(),
            ))
            return version

        version = await self.write(op)
        self._prices.invalidate()
        return Price(price.model, price.input, price.cached_input, price.output, version)

    async def seed_prices(self, defaults: list[Price]) -> None:
        """Give every model without a price its default, once. Replicas starting together all try: version 1
        of a model is inserted by the first and skipped by the others (no unique violation at start)."""
        existing = await self.current_prices()
        missing = [p for p in defaults if p.model not in existing]
        if not missing:
            return
        rows = [{"model": p.model, "version": 1, "input": p.input, "cached_input": p.cached_input,
                 "output": p.output, "created_at": now_ms()} for p in missing]

        def op(conn: Connection) -> None:
            stmt = dialect_insert(conn.dialect.name, prices).on_conflict_do_nothing(
                index_elements=["model", "version"])
            conn.execute(stmt, rows)

        await self.write(op)
        self._prices.invalidate()


def _price(row: Any) -> Price:
    return Price(model=row["model"], input=int(row["input"]), cached_input=int(row["cached_input"]),
                 output=int(row["output"]), version=int(row["version"]))
