"""Accounts and the caps of their keys: who holds the money, and how much of it one key may spend per period.

An account holds the balance; its keys spend from it. A key may have a spending limit (micro-credits) that never
resets (`period` None) or resets at the start of each calendar day, ISO week (Monday) or month, in UTC. What a key
has spent is counted per period: the store keeps `period_start` (the start of the period the counters belong to,
epoch ms; 0 for a limit that never resets), `period_spent` (settled) and `period_reserved` (held by requests in
flight, shared databases only; one SQLite process holds them in memory).

A request belongs to the period it was admitted in: its reservation is checked against that period's room, and
its settlement adds its cost to that period's spend. A request admitted before a boundary and settled after it
charges the account but does not count against the new period (its reservation already held the old period's
room; store/settling.py). `Hold.period_start` carries the admitted period from admission to the settlement.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from grokgate.core.limits import Limits

Period = Literal["daily", "weekly", "monthly"]
PERIODS: tuple[Period, ...] = ("daily", "weekly", "monthly")
NEVER = 0  # the period_start of a limit that never resets


def period_bounds(period: str | None, now_ms: int) -> tuple[int, int | None]:
    """(start, end) in epoch ms of the UTC calendar period holding `now_ms`; (0, None) for no period."""
    if period is None:
        return NEVER, None
    now = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC)
    day = dt.datetime(now.year, now.month, now.day, tzinfo=dt.UTC)
    if period == "daily":
        start, end = day, day + dt.timedelta(days=1)
    elif period == "weekly":
        start = day - dt.timedelta(days=day.weekday())  # Monday
        end = start + dt.timedelta(days=7)
    elif period == "monthly":
        start = day.replace(day=1)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    else:
        raise ValueError(f"unknown period {period!r}")
    return _ms(start), _ms(end)


def _ms(moment: dt.datetime) -> int:
    return int(moment.timestamp()) * 1000


def spent_in(period_start: int, stored_start: int, stored_spent: int) -> int:
    """What a key has spent in the period starting at `period_start`, given its stored counter: a counter of an
    earlier period is that period's, so nothing is spent yet in this one."""
    return stored_spent if stored_start == period_start else 0


@dataclass(frozen=True, slots=True)
class Hold:
    """One reservation: `amount` of the account's balance, and the same amount of the key's room in the period
    starting at `period_start` when the key has a spending limit."""

    account_id: int
    token_id: int
    request_id: str
    amount: int
    period_start: int = NEVER
    # The reset period whose calendar `period_start` is of (the key's, as the principal saw it). A principal is
    # cached, so an admin's change may not have reached it: the store starts a new period only when this is still
    # the key's period, and otherwise counts the hold in the period the key's counters are in (store/batch.py).
    limit_period: str | None = None


@dataclass(frozen=True, slots=True)
class Reserved:
    """A reservation's outcome. Refused: `limit` names what refused it ("balance": the account's balance cannot
    hold `amount`; "key_limit": the key's spending limit has less room) and `available` is how much there was."""

    granted: bool
    limit: str | None = None
    available: int = 0


GRANTED = Reserved(True)


@dataclass(frozen=True, slots=True)
class AccountRecord:
    id: int
    name: str
    created_at: int
    disabled: bool
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    balance: int
    reserved: int
    keys: int = 0  # how many keys it has

    @property
    def limits(self) -> Limits | None:
        if self.rpm is None and self.tpm is None and self.max_concurrency is None:
            return None
        return Limits(rpm=self.rpm, tpm=self.tpm, concurrency=self.max_concurrency)

    def public(self) -> dict[str, object]:
        from grokgate.core.accounts import format_credits

        return {
            "object": "account",
            "id": self.id,
            "name": self.name,
            "created_at": self.created_at // 1000,
            "disabled": self.disabled,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "max_concurrency": self.max_concurrency,
            "balance": self.balance,
            "reserved": self.reserved,
            "balance_credits": format_credits(self.balance),
            "keys": self.keys,
        }
