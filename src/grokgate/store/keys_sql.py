"""Accounts and their keys in the SQL store: create, read, change, top up, rotate (mixed into SqlStore).

A key is read with its account (one join): `TokenRecord.balance` is the account's, which its keys share. Admin
writes go through the store's writer like every write, and clear what this process caches of the key or the
account, so a change applies to the next request.
"""

from __future__ import annotations

import hmac
import uuid
from typing import Any

from sqlalchemy import Connection, Select, delete, func, insert, or_, select, update

from grokgate.core.accounts import (
    TokenRecord,
    ambiguous,
    check_text,
    check_token_name,
    display_prefix,
    hash_token,
    new_secret,
    now_ms,
    parse_ref,
)
from grokgate.core.budgets import PERIODS, AccountRecord, period_bounds
from grokgate.core.errors import GatewayError
from grokgate.core.limits import Limits
from grokgate.store.batch import release_held, restart_period
from grokgate.store.cache import RefreshingCache
from grokgate.store.parts import StorePart
from grokgate.store.schema import accounts, api_tokens, ledger, reservations

_KEY_FIELDS = {"name", "disabled", "expires_at", "allowed_models", "rpm", "tpm", "max_concurrency", "spend_limit",
               "limit_period"}
_ACCOUNT_FIELDS = {"name", "disabled", "rpm", "tpm", "max_concurrency"}


def _token_query() -> Select[Any]:
    return select(
        api_tokens, accounts.c.name.label("account_name"), accounts.c.disabled.label("account_disabled"),
        accounts.c.rpm.label("account_rpm"), accounts.c.tpm.label("account_tpm"),
        accounts.c.max_concurrency.label("account_max_concurrency"),
        accounts.c.balance.label("account_balance"), accounts.c.reserved.label("account_reserved"),
    ).select_from(api_tokens.join(accounts, api_tokens.c.account_id == accounts.c.id))


def _account_query() -> Select[Any]:
    keys = select(func.count()).where(api_tokens.c.account_id == accounts.c.id).scalar_subquery()
    return select(accounts, keys.label("keys"))


def check_period(period: str | None) -> str | None:
    if period is not None and period not in PERIODS:
        raise GatewayError(400, "bad_request", f"'period' must be one of {', '.join(PERIODS)} (or null: never).",
                           param="period")
    return period


class KeysMixin(StorePart):
    """Mixed into SqlStore, which provides these."""

    _tokens: RefreshingCache[str, tuple[TokenRecord, bool] | None]

    def _with_holds(self, record: TokenRecord) -> TokenRecord:
        raise NotImplementedError

    def _account_with_holds(self, record: AccountRecord) -> AccountRecord:
        raise NotImplementedError

    def _restart_held(self, token_id: int, before: int, start: int) -> None:
        raise NotImplementedError

    def _forget(self, *, token_id: int | None = None, account_id: int | None = None) -> None:
        raise NotImplementedError

    # -- keys ------------------------------------------------------------------------------------------------

    async def create_token(self, name: str, *, allowed_models: list[str] | None = None,
                           expires_at: int | None = None, rpm: int | None = None, tpm: int | None = None,
                           max_concurrency: int | None = None, account_id: int | None = None,
                           spend_limit: int | None = None,
                           limit_period: str | None = None) -> tuple[TokenRecord, str]:
        check_token_name(name)
        check_period(limit_period)
        secret = new_secret()
        now = now_ms()
        values = {
            "name": name, "prefix": display_prefix(secret), "token_hash": hash_token(secret),
            "created_at": now, "expires_at": expires_at, "disabled": False,
            "allowed_models": allowed_models, "rpm": rpm, "tpm": tpm, "max_concurrency": max_concurrency,
            "balance": 0, "reserved": 0, "spend_limit": spend_limit, "limit_period": limit_period,
        }

        def op(conn: Connection) -> int:
            owner = account_id
            if owner is None:  # a key of its own account, named like it
                owner = int(conn.execute(insert(accounts).values(
                    name=name, created_at=now, disabled=False, balance=0, reserved=0)
                    .returning(accounts.c.id)).scalar_one())
            elif conn.execute(select(accounts.c.id).where(accounts.c.id == owner)).first() is None:
                raise GatewayError(404, "account_not_found", f"No account with id {owner}.")
            result = conn.execute(insert(api_tokens).values(**values, account_id=owner).returning(api_tokens.c.id))
            return int(result.scalar_one())

        token_id = await self.write(op)
        record = await self.get_token(token_id)
        assert record is not None
        return record, secret

    async def get_token(self, ref: int | str) -> TokenRecord | None:
        """By id, by name, or by prefix (`gg-xxxxxxxx`). A reference is checked against every meaning it
        can have, so a token named "2" (allowed before names were checked) and the token whose id is 2 make
        "2" ambiguous: 409 naming both, never a silent choice."""
        parsed = parse_ref(ref)
        name = parsed.name
        if name is not None and "\x00" in name and self.dialect == "postgresql":
            name = None  # PostgreSQL text cannot hold NUL, so no name has one (and asyncpg would refuse it)
        conditions = []
        if parsed.id is not None:
            conditions.append(api_tokens.c.id == parsed.id)
        if parsed.prefix is not None:
            conditions.append(api_tokens.c.prefix == parsed.prefix)
        if name is not None:
            conditions.append(api_tokens.c.name == name)
        if not conditions:
            return None
        query = _token_query().where(or_(*conditions)).order_by(api_tokens.c.id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        if len(rows) > 1:
            raise ambiguous(parsed.text, [token_record(r) for r in rows])
        return self._with_holds(token_record(rows[0])) if rows else None

    async def require_token(self, ref: int | str) -> TokenRecord:
        record = await self.get_token(ref)
        if record is None:
            raise GatewayError(404, "token_not_found", f"No token matches {ref!r}.")
        return record

    async def list_tokens(self) -> list[TokenRecord]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(_token_query().order_by(api_tokens.c.id))).mappings().all()
        return [self._with_holds(token_record(r)) for r in rows]

    async def account_keys(self, account_id: int) -> list[TokenRecord]:
        query = _token_query().where(api_tokens.c.account_id == account_id).order_by(api_tokens.c.id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [self._with_holds(token_record(r)) for r in rows]

    async def find_token(self, token_hash: str) -> TokenRecord | None:
        found = await self._tokens.get(token_hash, lambda: self._read_token(token_hash))
        if found is None:
            return None
        record, previous = found
        if previous and (record.previous_valid_until or 0) <= now_ms():
            return None  # a rotated-out secret past its grace
        return record

    async def _read_token(self, token_hash: str) -> tuple[TokenRecord, bool] | None:
        query = _token_query().where(or_(api_tokens.c.token_hash == token_hash,
                                         api_tokens.c.previous_hash == token_hash))
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            return None
        # The index found the row; the digest is still compared in constant time, as the admin tokens' are.
        if hmac.compare_digest(token_hash, row["token_hash"]):
            return token_record(row), False
        if row["previous_hash"] is not None and hmac.compare_digest(token_hash, row["previous_hash"]):
            return token_record(row), True
        return None

    async def update_token(self, token_id: int, **fields: Any) -> TokenRecord:
        unknown = set(fields) - _KEY_FIELDS
        if unknown:
            raise GatewayError(400, "bad_request", f"Cannot change {', '.join(sorted(unknown))}.")
        if fields.get("name") is not None:
            check_token_name(fields["name"])
        check_period(fields.get("limit_period"))

        now = now_ms()
        start = period_bounds(fields.get("limit_period"), now)[0]
        restarted: list[int] = []  # the start of the key's period before the change, when it changed

        def op(conn: Connection) -> int:
            if "limit_period" in fields:
                old = conn.execute(select(api_tokens.c.limit_period).where(api_tokens.c.id == token_id)).first()
                if old is not None and old[0] != fields["limit_period"]:
                    restart_period(conn, token_id, start)
                    restarted.append(period_bounds(old[0], now)[0])
            result = conn.execute(update(api_tokens).where(api_tokens.c.id == token_id).values(**fields))
            return int(result.rowcount)

        if fields and not await self.write(op):
            raise GatewayError(404, "token_not_found", f"No token with id {token_id}.")
        if restarted:
            self._restart_held(token_id, restarted[0], start)
        self._forget(token_id=token_id)
        return await self.require_token(token_id)

    async def rotate_token(self, token_id: int, grace_ms: int) -> tuple[TokenRecord, str]:
        if grace_ms < 0:
            raise GatewayError(400, "bad_request", "The grace period cannot be negative.", param="grace_seconds")
        secret = new_secret()
        now = now_ms()

        def op(conn: Connection) -> int:
            return int(conn.execute(update(api_tokens).where(api_tokens.c.id == token_id).values(
                previous_hash=api_tokens.c.token_hash if grace_ms else None,
                previous_valid_until=now + grace_ms if grace_ms else None,
                token_hash=hash_token(secret), prefix=display_prefix(secret), rotated_at=now)).rowcount)

        if not await self.write(op):
            raise GatewayError(404, "token_not_found", f"No token with id {token_id}.")
        self._forget(token_id=token_id)
        return await self.require_token(token_id), secret

    async def delete_token(self, token_id: int) -> None:
        def op(conn: Connection) -> int:
            # What its requests in flight hold goes back to the account (which stays, with its other keys); the
            # key's ledger and daily usage stay, for the operator's books. Stored conversations are the account's.
            release_held(conn, reservations.c.token_id == token_id)
            return int((conn.execute(delete(api_tokens).where(api_tokens.c.id == token_id))).rowcount)

        if not await self.write(op):
            raise GatewayError(404, "token_not_found", f"No token with id {token_id}.")
        self._forget(token_id=token_id)

    async def add_credits(self, token_id: int, amount: int, note: str | None = None) -> TokenRecord:
        record = await self.require_token(token_id)
        await self._top_up(record.account_id, amount, note, token_id=token_id)
        return await self.require_token(token_id)

    # -- accounts ------------------------------------------------------------------------------------------------

    async def create_account(self, name: str, *, rpm: int | None = None, tpm: int | None = None,
                             max_concurrency: int | None = None) -> AccountRecord:
        check_token_name(name)

        def op(conn: Connection) -> int:
            return int(conn.execute(insert(accounts).values(
                name=name, created_at=now_ms(), disabled=False, rpm=rpm, tpm=tpm, max_concurrency=max_concurrency,
                balance=0, reserved=0).returning(accounts.c.id)).scalar_one())

        return await self.require_account(await self.write(op))

    async def list_accounts(self) -> list[AccountRecord]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(_account_query().order_by(accounts.c.id))).mappings().all()
        return [self._account_with_holds(account_record(r)) for r in rows]

    async def get_account(self, ref: int | str) -> AccountRecord | None:
        parsed = parse_ref(ref)
        name = parsed.name
        if name is not None and "\x00" in name and self.dialect == "postgresql":
            name = None
        conditions = []
        if parsed.id is not None:
            conditions.append(accounts.c.id == parsed.id)
        if name is not None:
            conditions.append(accounts.c.name == name)
        if not conditions:
            return None
        query = _account_query().where(or_(*conditions)).order_by(accounts.c.id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        if len(rows) > 1:
            listed = "; ".join(f"id {r['id']} (named {r['name']!r})" for r in rows)
            raise GatewayError(409, "ambiguous_reference",
                               f"{parsed.text!r} matches {len(rows)} accounts: {listed}. Use the id of the one you "
                               "mean, or rename one of them.")
        return self._account_with_holds(account_record(rows[0])) if rows else None

    async def require_account(self, ref: int | str) -> AccountRecord:
        record = await self.get_account(ref)
        if record is None:
            raise GatewayError(404, "account_not_found", f"No account matches {ref!r}.")
        return record

    async def update_account(self, account_id: int, **fields: Any) -> AccountRecord:
        unknown = set(fields) - _ACCOUNT_FIELDS
        if unknown:
            raise GatewayError(400, "bad_request", f"Cannot change {', '.join(sorted(unknown))}.")
        if fields.get("name") is not None:
            check_text(fields["name"], "name")
            check_token_name(fields["name"])

        def op(conn: Connection) -> int:
            return int(conn.execute(update(accounts).where(accounts.c.id == account_id).values(**fields)).rowcount)

        if fields and not await self.write(op):
            raise GatewayError(404, "account_not_found", f"No account with id {account_id}.")
        self._forget(account_id=account_id)
        return await self.require_account(account_id)

    async def add_account_credits(self, account_id: int, amount: int, note: str | None = None) -> AccountRecord:
        await self._top_up(account_id, amount, note)
        return await self.require_account(account_id)

    async def _top_up(self, account_id: int, amount: int, note: str | None, *, token_id: int | None = None) -> None:
        if amount <= 0:
            raise GatewayError(400, "bad_request", "The amount must be positive.", param="amount")

        def op(conn: Connection) -> int:
            result = conn.execute(update(accounts).where(accounts.c.id == account_id)
                                  .values(balance=accounts.c.balance + amount))
            if result.rowcount:
                conn.execute(insert(ledger).values(
                    request_id=f"topup-{uuid.uuid4().hex}", token_id=token_id, account_id=account_id, kind="topup",
                    endpoint=None, amount=amount, cost=0, prompt_tokens=0, cached_tokens=0, completion_tokens=0,
                    reasoning_tokens=0, status="ok", estimated=False, note=note, created_at=now_ms(),
                ))
            return int(result.rowcount)

        if not await self.write(op):
            raise GatewayError(404, "account_not_found", f"No account with id {account_id}.")
        self._forget(account_id=account_id)


def token_record(row: Any) -> TokenRecord:
    models = row["allowed_models"]
    limits = Limits(rpm=row["account_rpm"], tpm=row["account_tpm"], concurrency=row["account_max_concurrency"])
    return TokenRecord(
        id=int(row["id"]), name=row["name"], prefix=row["prefix"], created_at=int(row["created_at"]),
        expires_at=row["expires_at"], disabled=bool(row["disabled"]),
        allowed_models=tuple(models) if models is not None else None,
        rpm=row["rpm"], tpm=row["tpm"], max_concurrency=row["max_concurrency"],
        balance=int(row["account_balance"]), reserved=int(row["account_reserved"]),
        account_id=int(row["account_id"]), account_name=row["account_name"],
        account_disabled=bool(row["account_disabled"]),
        account_limits=None if limits == Limits() else limits,
        spend_limit=None if row["spend_limit"] is None else int(row["spend_limit"]),
        limit_period=row["limit_period"], period_start=int(row["period_start"]),
        period_spent=int(row["period_spent"]), period_reserved=int(row["period_reserved"]),
        rotated_at=row["rotated_at"], previous_valid_until=row["previous_valid_until"],
    )


def account_record(row: Any) -> AccountRecord:
    return AccountRecord(
        id=int(row["id"]), name=row["name"], created_at=int(row["created_at"]), disabled=bool(row["disabled"]),
        rpm=row["rpm"], tpm=row["tpm"], max_concurrency=row["max_concurrency"], balance=int(row["balance"]),
        reserved=int(row["reserved"]), keys=int(row["keys"] or 0),
    )
