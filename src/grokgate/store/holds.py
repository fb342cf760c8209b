"""Reservations and settlements, mixed into SqlStore (store/sql.py).

A shared database (PostgreSQL) keeps reservation rows, committed by the group-commit writer (one call per batch:
store/pg_commit.py). SQLite serves one process, so there reservations live in its memory: the request path then
waits for one commit (its settlement), not two. Each account's committed balance and each key's counters are cached
(refreshed when older than a couple of seconds, kept current by this process's own settlements) and what is held is
subtracted from them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from sqlalchemy import select

from grokgate.core.accounts import Settlement, StoreUnavailable, TokenRecord, now_ms
from grokgate.core.budgets import GRANTED, AccountRecord, Hold, Reserved, period_bounds, spent_in
from grokgate.store.batch import release_held
from grokgate.store.cache import RefreshingCache
from grokgate.store.parts import StorePart
from grokgate.store.schema import accounts, api_tokens, reservations
from grokgate.store.settling import KeySpend

log = logging.getLogger("grokgate.store")

# While the database is away: at most this many settlements and releases kept, retried every 0.2 s, backing off to 5.
_PENDING_MAX = 100_000
_RETRY_FIRST_S = 0.2
_RETRY_MAX_S = 5.0


class HoldsMixin(StorePart):
    """Mixed into SqlStore, which sets these up (store/sql.py)."""

    _memory_holds: bool
    _unsettled: int
    _held: dict[int, int]
    _key_held: dict[tuple[int, int], int]
    _moved_periods: dict[tuple[int, int], int]
    _balances: RefreshingCache[int, int | None]
    _keys: RefreshingCache[int, tuple[int | None, int, int, str | None] | None]
    _tokens: RefreshingCache[str, tuple[TokenRecord, bool] | None]
    _submit: Callable[[str, Any], Coroutine[Any, Any, Any]]
    _pending: dict[str, tuple[Settlement | None, float]]  # request id -> its settlement (None: a release), since
    _retrier: asyncio.Task[None] | None

    async def reserve(self, hold: Hold) -> Reserved:
        if not self._memory_holds:
            try:
                outcome: Reserved = await self._submit("reserve", hold)
            except StoreUnavailable:
                # It may have committed: its row would hold credits until this instance retires.
                self._defer(hold.request_id, None)
                raise
        else:
            outcome = await self._reserve_in_memory(hold)
        self._unsettled += outcome.granted and hold.amount > 0
        return outcome

    async def _reserve_in_memory(self, hold: Hold) -> Reserved:
        balance = await self._committed_balance(hold.account_id)
        key = await self._committed_key(hold.token_id)
        # No await between the checks and the holds: the event loop makes this one atomic step.
        if balance is None or key is None:
            return Reserved(False, "balance", 0)
        available = balance - self._held.get(hold.account_id, 0)
        if hold.amount > available:
            return Reserved(False, "balance", max(0, available))
        limit, stored_start, stored_spent, kind = key
        slot = (hold.token_id, self._moved_periods.get((hold.token_id, hold.period_start), hold.period_start))
        if (hold.limit_period or "") != (kind or "") and slot[1] != stored_start:
            # A principal cached across a change of the key's reset period computed the period with the old
            # calendar: the hold counts in the period the key's counters are in (store/batch.py _same), and its
            # settlement follows it there.
            self._moved_periods[(hold.token_id, hold.period_start)] = stored_start
            slot = (hold.token_id, stored_start)
        if limit is not None:
            room = limit - spent_in(slot[1], stored_start, stored_spent) - self._key_held.get(slot, 0)
            if hold.amount > room:
                return Reserved(False, "key_limit", max(0, room))
        self._held[hold.account_id] = self._held.get(hold.account_id, 0) + hold.amount
        self._key_held[slot] = self._key_held.get(slot, 0) + hold.amount
        return GRANTED

    async def settle(self, s: Settlement) -> None:
        if not self._memory_holds:
            try:
                await self._submit("settle", s)
            except StoreUnavailable:
                # The answer is the client's: its settlement commits when the database is back (idempotent by
                # request id, so an attempt that did commit is not charged again). Counted unsettled till then.
                self._defer(s.request_id, s)
                return
            finally:
                if s.request_id not in self._pending and s.account_id is not None and s.reserved:
                    self._unsettled = max(0, self._unsettled - 1)
            return
        if s.token_id is not None:
            moved = self._moved_periods.get((s.token_id, s.period_start))
            if moved is not None:
                s = dataclasses.replace(s, period_start=moved)
        try:
            spent: KeySpend = await self._submit("settle", s)
        finally:
            if s.account_id is not None and s.reserved:
                self._unsettled = max(0, self._unsettled - 1)
                self._drop_held(s.account_id, s.token_id or 0, s.period_start, s.reserved)
        if self._memory_holds:
            # What each settlement read under the row lock is the newest committed state.
            balances, keys = spent
            for account_id, balance in balances.items():
                self._balances.put(account_id, balance)
            for token_id, (start, total) in keys.items():
                current = self._keys.peek(token_id)
                if current is not None:
                    self._keys.put(token_id, (current[0], start, total, current[3]))
                else:
                    # A read that began before this commit may still be storing the counters without this
                    # charge: dropping it makes the next reservation read them again.
                    self._keys.invalidate(token_id)

    def _drop_held(self, account_id: int, token_id: int, period_start: int, amount: int) -> None:
        """Give back what a hold keeps of an account's balance and of its key's period (memory holds)."""
        self._held[account_id] = max(0, self._held.get(account_id, 0) - amount)
        slot = (token_id, period_start)
        left = self._key_held.get(slot, 0) - amount
        if left > 0:
            self._key_held[slot] = left
        else:
            self._key_held.pop(slot, None)

    def drop_hold(self, hold: Hold) -> None:
        """Release a granted memory hold whose request is never settled (its worker is gone: grokgate/workers.py)."""
        self._unsettled = max(0, self._unsettled - 1)
        period = self._moved_periods.get((hold.token_id, hold.period_start), hold.period_start)
        self._drop_held(hold.account_id, hold.token_id, period, hold.amount)

    # -- while the database is away (PostgreSQL) ------------------------------------------------------------

    def _defer(self, request_id: str, s: Settlement | None) -> None:
        """Keep a settlement (or, None: the release of a reservation whose commit is unknown) for when the
        database answers again. Bounded: past _PENDING_MAX the oldest is dropped, logged as given away."""
        if not self._pending:
            log.warning("the accounts database is unreachable: settlements are kept and committed when it is back")
        if len(self._pending) >= _PENDING_MAX:
            dropped, (lost, _) = next(iter(self._pending.items()))
            del self._pending[dropped]
            log.error("kept settlements past %d: request %s goes unbilled", _PENDING_MAX, dropped)
            if lost is not None and lost.account_id is not None and lost.reserved:
                self._unsettled = max(0, self._unsettled - 1)
        self._pending[request_id] = (s, time.monotonic())
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.create_task(self._retry(), name="store-retry")

    async def _retry(self) -> None:
        delay = _RETRY_FIRST_S
        while self._pending:
            await asyncio.sleep(delay)
            items = list(self._pending.items())
            done = await asyncio.gather(*(self._redo(rid, s) for rid, (s, _) in items), return_exceptions=True)
            kept = 0
            for (rid, (s, _)), outcome in zip(items, done, strict=True):
                if isinstance(outcome, BaseException):
                    kept += 1
                    continue
                self._pending.pop(rid, None)
                if s is not None and s.account_id is not None and s.reserved:
                    self._unsettled = max(0, self._unsettled - 1)
            delay = min(delay * 2, _RETRY_MAX_S) if kept else _RETRY_FIRST_S
            if len(items) > kept:
                log.warning("the accounts database answers again: %d kept settlement(s) and release(s) committed, "
                            "%d still waiting", len(items) - kept, len(self._pending))

    async def _redo(self, request_id: str, s: Settlement | None) -> None:
        if s is not None:
            await self._submit("settle", s)
        else:
            await self.write(lambda conn: release_held(conn, reservations.c.request_id == request_id))

    @property
    def pending(self) -> int:
        """Settlements and releases waiting for the database (a metric, and what close() reports as lost)."""
        return len(self._pending)

    async def _committed_balance(self, account_id: int) -> int | None:
        # A top-up by another process shows up within twice store/sql.py _CACHE_SECONDS (an expired entry is served
        # while it is read again), or at our next settlement of this account, which reads the balance; only
        # this process spends from it.
        return await self._balances.get(account_id, lambda: self._read_balance(account_id))

    async def _read_balance(self, account_id: int) -> int | None:
        async with self.engine.connect() as conn:
            value = (await conn.execute(select(accounts.c.balance).where(accounts.c.id == account_id))).scalar()
        return None if value is None else int(value)

    async def _committed_key(self, token_id: int) -> tuple[int | None, int, int, str | None] | None:
        """(spend limit, period_start, period_spent, limit_period) as committed; kept current by our settlements."""
        return await self._keys.get(token_id, lambda: self._read_key(token_id))

    async def _read_key(self, token_id: int) -> tuple[int | None, int, int, str | None] | None:
        query = select(api_tokens.c.spend_limit, api_tokens.c.period_start, api_tokens.c.period_spent,
                       api_tokens.c.limit_period).where(api_tokens.c.id == token_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else (None if row[0] is None else int(row[0]), int(row[1]), int(row[2]), row[3])

    def _with_holds(self, record: TokenRecord) -> TokenRecord:
        held = self._held.get(record.account_id, 0)
        start, _ = period_bounds(record.limit_period, now_ms())
        key_held = self._key_held.get((record.id, start), 0)
        if not held and not key_held:
            return record
        return dataclasses.replace(record, balance=record.balance - held, reserved=record.reserved + held,
                                   period_start=start, period_spent=spent_in(start, record.period_start,
                                                                             record.period_spent),
                                   period_reserved=key_held)

    def _restart_held(self, token_id: int, before: int, start: int) -> None:
        """The key's counters moved from the period starting at `before` to the one starting at `start` (its reset
        period changed): so do the holds of its requests in flight, and those of requests admitted before it."""
        if not self._memory_holds:
            return  # reservation rows, moved in the same transaction
        self._moved_periods[(token_id, before)] = start
        for slot in [slot for slot in self._key_held if slot[0] == token_id and slot[1] != start]:
            self._key_held[(token_id, start)] = self._key_held.get((token_id, start), 0) + self._key_held.pop(slot)
            self._moved_periods[slot] = start
        for slot in [slot for slot in self._moved_periods if slot[0] == token_id]:
            self._moved_periods[slot] = start
        self._moved_periods.pop((token_id, start), None)  # the new period is its own

    def _account_with_holds(self, record: AccountRecord) -> AccountRecord:
        held = self._held.get(record.id, 0)
        if not held:
            return record
        return dataclasses.replace(record, balance=record.balance - held, reserved=record.reserved + held)

    def _forget(self, *, token_id: int | None = None, account_id: int | None = None) -> None:
        """An admin change: what this process caches of the token or the account is read again."""
        self._tokens.invalidate()
        if token_id is not None:
            self._keys.invalidate(token_id)
        if account_id is not None:
            self._balances.invalidate(account_id)
