"""One balance, many keys: a key's spending limit and its reset period, the account's limits across its keys, and
exactness when many keys of one account spend at once (core/budgets.py, core/billing.py, store/batch.py).

Admission runs in process on a real store (a SQLite file with its writer process; a PostgreSQL database, where
reservations are rows), with the wall clock injected: a period boundary is crossed by moving the clock, never by
sleeping.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from grokgate.core.accounts import TokenRecord, now_ms
from grokgate.core.admission import AdmissionRequest, Principal
from grokgate.core.billing import AccountAdmission, AccountTicket, principal_of
from grokgate.core.budgets import period_bounds
from grokgate.core.errors import GatewayError
from grokgate.core.events import Usage
from grokgate.core.limits import Limits
from grokgate.core.pricing import Price, max_cost
from grokgate.store.limits_memory import MemoryRateLimiter
from grokgate.store.sql import SqlStore
from tests.test_token_identity import database

__all__ = ["database"]

PRICE = Price("grok-3", 1_000_000, 250_000, 2_000_000)  # 1 and 2 micro-credits per input and output token
PROMPT, OUTPUT = 10, 40
RESERVATION = max_cost(PROMPT, 1, OUTPUT, PRICE)  # 90 micro-credits
USED = Usage(prompt_tokens=PROMPT, completion_tokens=5)  # costs 20


def utc_ms(*parts: int) -> int:
    return int(dt.datetime(*parts, tzinfo=dt.UTC).timestamp() * 1000)  # type: ignore[misc]


class Wall:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@asynccontextmanager
async def admission(url: str, wall: Wall) -> AsyncIterator[tuple[SqlStore, AccountAdmission]]:
    store = SqlStore(url)
    await store.open(serve=True)
    try:
        await store.set_price(PRICE)
        yield store, AccountAdmission(store, MemoryRateLimiter(), [], wall=wall)
    finally:
        await store.close()


def request(output: int = OUTPUT) -> AdmissionRequest:
    return AdmissionRequest(request_id=uuid.uuid4().hex, model="grok-3", choices=1, output_limit=output,
                            prompt_tokens=PROMPT)


async def admit(adm: AccountAdmission, key: TokenRecord, output: int = OUTPUT) -> AccountTicket:
    store = adm.store
    assert isinstance(store, SqlStore)
    return await adm.admit(principal_of(await store.require_token(key.id)), request(output))


async def refused(adm: AccountAdmission, key: TokenRecord, output: int = OUTPUT) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        await admit(adm, key, output)
    return caught.value


# -- periods -------------------------------------------------------------------------------------------------------


def test_periods_are_utc_calendar_days_iso_weeks_and_months() -> None:
    now = utc_ms(2027, 12, 29, 15, 30)  # a Wednesday
    assert period_bounds("daily", now) == (utc_ms(2027, 12, 29), utc_ms(2027, 12, 30))
    assert period_bounds("weekly", now) == (utc_ms(2027, 12, 27), utc_ms(2028, 1, 3))
    assert period_bounds("monthly", now) == (utc_ms(2027, 12, 1), utc_ms(2028, 1, 1))
    assert period_bounds("monthly", utc_ms(2028, 2, 29, 23, 59)) == (utc_ms(2028, 2, 1), utc_ms(2028, 3, 1))
    assert period_bounds(None, now) == (0, None)
    assert period_bounds("daily", utc_ms(2027, 12, 30) - 1)[0] == utc_ms(2027, 12, 29), "the last ms is the old day"


# -- a key's limit within the account's balance ---------------------------------------------------------------------


def test_keys_share_the_balance_and_each_stays_within_its_limit(database: str) -> None:
    async def main() -> None:
        async with admission(database, Wall(utc_ms(2027, 3, 10, 12))) as (store, adm):
            account = await store.create_account("acme")
            await store.add_account_credits(account.id, 5 * RESERVATION)
            capped, _ = await store.create_token("capped", account_id=account.id, spend_limit=2 * RESERVATION,
                                                 limit_period="daily")
            free, _ = await store.create_token("free", account_id=account.id)
            held = [await admit(adm, capped), await admit(adm, capped)]
            error = await refused(adm, capped)
            assert (error.status, error.code) == (403, "key_limit_exceeded")
            assert error.limit is not None
            assert error.limit["type"] == "key_limit" and error.limit["scope"] == "key"
            assert (error.limit["required"], error.limit["available"]) == (RESERVATION, 0)
            assert error.limit["resets_at"] == utc_ms(2027, 3, 11) // 1000
            assert error.headers["x-grokgate-limit"] == "key.key_limit"
            # The other key spends what the capped one cannot: three more reservations fill the balance.
            more = [await admit(adm, free) for _ in range(3)]
            short = await refused(adm, free)
            assert (short.code, short.limit and short.limit["type"]) == ("used_up", "balance")
            for ticket in held + more:
                await ticket.settle(USED, status="ok")
            record = await store.require_token(capped.id)
            assert record.cap(adm._wall())["spent"] == 2 * 20
            assert (await store.require_account(account.id)).balance == 5 * RESERVATION - 5 * 20
            # What settled is back: the capped key has room for its next request.
            await (await admit(adm, capped)).settle(USED, status="ok")

    asyncio.run(main())


def test_a_request_admitted_before_the_reset_counts_in_the_period_it_was_admitted_in(database: str) -> None:
    """Admitted at 23:59:59.999 on the last day of a month and settled after midnight: its cost is charged to the
    account once and counted in January's spend, never February's; February starts with its whole limit."""
    async def main() -> None:
        wall = Wall(utc_ms(2027, 1, 31, 23, 59, 59) + 999)
        async with admission(database, wall) as (store, adm):
            key, _ = await store.create_token("monthly")
            await store.add_credits(key.id, 10 * RESERVATION)
            await store.update_token(key.id, spend_limit=RESERVATION, limit_period="monthly")
            late = await admit(adm, key)
            assert (await refused(adm, key)).code == "key_limit_exceeded", "January's room is held"
            wall.now = utc_ms(2027, 2, 1)
            february = await admit(adm, key)  # the whole limit again: January's request is January's
            await late.settle(USED, status="ok")
            assert (await refused(adm, key)).code == "key_limit_exceeded"
            record = await store.require_token(key.id)
            assert record.cap(wall.now)["spent"] == 0, "January's settlement is not February's spend"
            await february.settle(USED, status="ok")
            record = await store.require_token(key.id)
            spend = record.cap(wall.now)
            assert (spend["spent"], spend["remaining"]) == (20, RESERVATION - 20)
            assert spend["resets_at"] == utc_ms(2027, 3, 1) // 1000
            rows = await store.ledger_rows(account_id=key.account_id)
            assert sorted(-r["amount"] for r in rows if r["kind"] == "usage") == [20, 20], "each charged once"
            assert (await store.require_account(key.account_id)).balance == 10 * RESERVATION - 40
            wall.now = utc_ms(2027, 3, 1)
            assert (await store.require_token(key.id)).cap(wall.now)["spent"] == 0

    asyncio.run(main())


def test_a_limit_lowered_below_what_was_spent_refuses_until_the_reset(database: str) -> None:
    async def main() -> None:
        wall = Wall(utc_ms(2027, 5, 5, 8))
        async with admission(database, wall) as (store, adm):
            key, _ = await store.create_token("weekly")
            await store.add_credits(key.id, 10 * RESERVATION)
            await store.update_token(key.id, spend_limit=10 * RESERVATION, limit_period="weekly")
            await (await admit(adm, key)).settle(USED, status="ok")
            await store.update_token(key.id, spend_limit=10)
            lowered = await refused(adm, key)
            assert lowered.code == "key_limit_exceeded" and lowered.limit is not None
            assert lowered.limit["available"] == 0, "spent past the new limit: nothing left, not a negative"
            wall.now = utc_ms(2027, 5, 10)  # the next Monday
            await store.update_token(key.id, spend_limit=RESERVATION)
            await (await admit(adm, key)).settle(USED, status="ok")

    asyncio.run(main())


def changed_periods(now: int) -> tuple[str, str]:
    """Two reset periods whose current periods start at different times (today is not the first day of the
    week or the month, or not both): what a change between them has to carry the key's spend across."""
    pairs = [(a, b) for a in ("daily", "weekly", "monthly") for b in ("weekly", "monthly", "daily") if a != b]
    return next(((a, b) for a, b in pairs if period_bounds(a, now)[0] != period_bounds(b, now)[0]), pairs[0])



def test_a_principal_cached_across_a_changed_reset_period_neither_passes_the_cap_nor_forgets_the_spend(
        database: str) -> None:
    """A principal authenticated (or cached) before an admin changed the key's reset period computes its hold's period
    with the old calendar. After daily -> weekly or monthly (or any -> none) the key's period starts earlier, so the
    stale period looks later: it must not start a new period (zeroing the spend and passing the cap), and what that
    request settles counts in the key's period."""
    async def main() -> None:
        now = now_ms()
        if period_bounds("daily", now)[1] - now < 5_000:  # type: ignore[operator]
            await asyncio.sleep((period_bounds("daily", now)[1] - now) / 1000 + 0.1)  # type: ignore[operator]
        wall = Wall(now_ms())
        today = period_bounds("daily", wall.now)[0]
        earlier = [p for p in ("weekly", "monthly") if period_bounds(p, wall.now)[0] < today]
        async with admission(database, wall) as (store, adm):
            for after in [*earlier[:1], None]:
                account = await store.create_account(f"acme-{after}")
                await store.add_account_credits(account.id, 10 * RESERVATION)
                key, _ = await store.create_token(f"app-{after}", account_id=account.id,
                                                  spend_limit=10 * RESERVATION, limit_period="daily")
                await (await admit(adm, key)).settle(USED, status="ok")
                stale = principal_of(await store.require_token(key.id))  # daily, as a cached principal is
                await store.update_token(key.id, limit_period=after, spend_limit=20 + RESERVATION - 1)
                with pytest.raises(GatewayError) as caught:
                    await adm.admit(stale, request())
                assert caught.value.code == "key_limit_exceeded", f"{after}: the stale period passed the cap"
                spend = (await store.require_token(key.id)).cap(wall.now)
                assert (spend["spent"], spend["reserved"]) == (20, 0), f"{after}: the spend was forgotten"
                await store.update_token(key.id, spend_limit=20 + RESERVATION)
                ticket = await adm.admit(stale, request())  # room for exactly one: held in the key's period
                assert (await refused(adm, key)).code == "key_limit_exceeded", f"{after}: its hold is not counted"
                await ticket.settle(USED, status="ok")
                spend = (await store.require_token(key.id)).cap(wall.now)
                assert (spend["period"], spend["spent"], spend["reserved"]) == (after, 40, 0), after
                assert (await store.require_account(account.id)).balance == 10 * RESERVATION - 40

    asyncio.run(main())

def test_a_changed_reset_period_keeps_the_spend_of_the_new_period(database: str) -> None:
    """A daily key of a Tuesday made weekly: today's spend is the week's too, what settles after the change counts
    in the week (its limit holds), and a request in flight across the change frees its hold there. The store
    dates the change and the ledger with the real clock, so the admission's clock is the real one too."""
    async def main() -> None:
        now = now_ms()
        if period_bounds("daily", now)[1] - now < 5_000:  # type: ignore[operator]
            await asyncio.sleep((period_bounds("daily", now)[1] - now) / 1000 + 0.1)  # type: ignore[operator]
        wall = Wall(now_ms())
        before, after = changed_periods(wall.now)
        async with admission(database, wall) as (store, adm):
            account = await store.create_account("acme")
            await store.add_account_credits(account.id, 10 * RESERVATION)
            key, _ = await store.create_token("app", account_id=account.id, spend_limit=10 * RESERVATION,
                                              limit_period=before)
            await (await admit(adm, key)).settle(USED, status="ok")
            in_flight = await admit(adm, key)
            await store.update_token(key.id, limit_period=after)
            spend = (await store.require_token(key.id)).cap(wall.now)
            assert (spend["period"], spend["spent"], spend["reserved"]) == (after, 20, RESERVATION)
            await in_flight.settle(USED, status="ok")
            spend = (await store.require_token(key.id)).cap(wall.now)
            assert (spend["spent"], spend["reserved"]) == (40, 0), "settled in the new period, its hold freed"
            # The new period's limit counts what settles after the change: room for one more request, then none.
            await store.update_token(key.id, spend_limit=40 + RESERVATION + 10)
            await (await admit(adm, key)).settle(USED, status="ok")
            assert (await store.require_token(key.id)).cap(wall.now)["spent"] == 60
            assert (await refused(adm, key)).code == "key_limit_exceeded"
            assert (await store.require_account(account.id)).balance == 10 * RESERVATION - 60

    asyncio.run(main())


# -- the account's limits across its keys ---------------------------------------------------------------------------


def test_an_account_wide_concurrency_limit_spans_its_keys(database: str) -> None:
    async def main() -> None:
        async with admission(database, Wall(utc_ms(2027, 6, 1))) as (store, adm):
            account = await store.create_account("shared", max_concurrency=2)
            await store.add_account_credits(account.id, 100 * RESERVATION)
            keys = [(await store.create_token(f"k{i}", account_id=account.id))[0] for i in range(3)]
            first, second = await admit(adm, keys[0]), await admit(adm, keys[1])
            error = await refused(adm, keys[2])
            assert (error.status, error.code) == (429, "too_many_requests")
            assert error.limit == {"type": "concurrency", "scope": "account", "retry_after": 1.0}
            assert error.headers["x-grokgate-limit"] == "account.concurrency"
            assert "account" in error.message
            await first.settle(USED, status="ok")
            third = await admit(adm, keys[2])
            other = await store.create_token("elsewhere")  # another account is not slowed by this one
            await store.add_credits(other[0].id, RESERVATION)
            await (await admit(adm, other[0])).settle(USED, status="ok")
            for ticket in (second, third):
                await ticket.settle(USED, status="ok")
            assert Limits(concurrency=2) == (await store.require_token(keys[0].id)).account_limits

    asyncio.run(main())


async def key_principal(store: SqlStore, name: str, **fields: Any) -> Principal:
    """A new key's principal, as authentication reads it (with its account's limits)."""
    return principal_of(await store.require_token((await store.create_token(name, **fields))[0].id))


def test_an_account_wide_rpm_holds_on_the_early_refusal_paths(database: str) -> None:
    """Refused requests (an invalid body, an unknown model) count against the account's rpm as well as the key's,
    and once the account's is spent every key of it is refused before its body is parsed (`servable`), before it is
    read (`precheck`, no I/O) and on xAI's uncharged calls (`count_request`), naming the account's limit."""
    async def main() -> None:
        async with admission(database, Wall(utc_ms(2027, 6, 1))) as (store, adm):
            account = await store.create_account("chatty", rpm=3)
            await store.add_account_credits(account.id, 100 * RESERVATION)
            keys = [await key_principal(store, f"k{i}", account_id=account.id) for i in range(3)]
            other, _ = await store.create_token("elsewhere", rpm=100)
            await store.add_credits(other.id, RESERVATION)
            bystander = principal_of(await store.require_token(other.id))
            invalid = GatewayError(400, "bad_request", "Invalid body.")
            for principal in keys:  # one refused request per key: 3, the account's whole minute
                await adm.servable(principal)
                assert await adm.refused(principal, uuid.uuid4().hex, invalid) is invalid
            error = await adm.refused(keys[0], uuid.uuid4().hex, invalid)
            assert (error.status, error.code) == (429, "too_many_requests")
            assert error.limit is not None and (error.limit["type"], error.limit["scope"]) == ("rpm", "account")
            assert error.headers["x-grokgate-limit"] == "account.rpm" and "account" in error.message
            for principal in keys:
                for early in (adm.precheck, adm.servable, adm.count_request):
                    with pytest.raises(GatewayError) as caught:
                        result = early(principal)
                        if result is not None:
                            await result
                    assert caught.value.status == 429 and caught.value.limit is not None
                    assert caught.value.limit["scope"] == "account"
            # Another account is neither refused nor slowed.
            adm.precheck(bystander)
            await adm.servable(bystander)
            await adm.count_request(bystander)
            assert await adm.refused(bystander, uuid.uuid4().hex, invalid) is invalid

    asyncio.run(main())


def test_a_key_past_its_own_rpm_is_named_on_the_early_paths(database: str) -> None:
    async def main() -> None:
        async with admission(database, Wall(utc_ms(2027, 6, 1))) as (store, adm):
            account = await store.create_account("roomy", rpm=100)
            await store.add_account_credits(account.id, 100 * RESERVATION)
            key = await key_principal(store, "tight", account_id=account.id, rpm=1)
            sibling = await key_principal(store, "free", account_id=account.id)
            invalid = GatewayError(400, "bad_request", "Invalid body.")
            assert await adm.refused(key, uuid.uuid4().hex, invalid) is invalid
            error = await adm.refused(key, uuid.uuid4().hex, invalid)
            assert error.status == 429 and error.limit is not None and error.limit["scope"] == "key"
            assert error.headers["x-grokgate-limit"] == "key.rpm"
            with pytest.raises(GatewayError):
                adm.precheck(key)
            adm.precheck(sibling)  # the account has room: its other keys go on
            await adm.servable(sibling)

    asyncio.run(main())


# -- exactness: many keys of one account at once ------------------------------------------------------------------


def test_64_requests_over_4_keys_of_an_account_funded_for_10_never_overdraw(database: str) -> None:
    async def main() -> None:
        async with admission(database, Wall(utc_ms(2027, 7, 1, 12))) as (store, adm):
            account = await store.create_account("racers")
            funded = 10 * RESERVATION + RESERVATION // 2
            await store.add_account_credits(account.id, funded)
            keys = [(await store.create_token(f"racer-{i}", account_id=account.id, spend_limit=3 * RESERVATION,
                                              limit_period="daily"))[0] for i in range(4)]

            async def one(i: int) -> str:
                try:
                    ticket = await admit(adm, keys[i % 4])
                except GatewayError as error:
                    return error.code
                await asyncio.sleep(0)
                await ticket.settle(USED, status="ok")
                return "ok"

            outcomes = await asyncio.gather(*(one(i) for i in range(64)))
            served = outcomes.count("ok")
            assert set(outcomes) <= {"ok", "used_up", "key_limit_exceeded"}, outcomes
            assert served >= 10, outcomes
            account_now = await store.require_account(account.id)
            assert account_now.reserved == 0 and account_now.balance >= 0
            rows = await store.ledger_rows(account_id=account.id, limit=10_000)
            usage = [r for r in rows if r["kind"] == "usage"]
            assert len(usage) == served, "one ledger row per served request"
            assert funded - account_now.balance == -sum(r["amount"] for r in usage) == 20 * served
            for key in keys:
                cap = (await store.require_token(key.id)).cap(adm._wall())
                assert cap["reserved"] == 0 and cap["spent"] <= 3 * RESERVATION
                assert cap["spent"] == 20 * sum(1 for r in usage if r["token_id"] == key.id)
            by_key = await store.usage(account_id=account.id, by="model")
            assert by_key[0]["requests"] == served

    asyncio.run(main())


def test_refusal_detail_says_how_many_tokens_the_balance_affords(database: str) -> None:
    async def main() -> None:
        async with admission(database, Wall(utc_ms(2027, 8, 1))) as (store, adm):
            key, _ = await store.create_token("thin")
            await store.add_credits(key.id, 50)  # 10 prompt tokens (10) + 20 output tokens (40): 50
            error = await refused(adm, key, output=1000)
            limit: dict[str, Any] = error.limit or {}
            assert (error.code, error.message.startswith("Your balance is not sufficient")) == ("used_up", True)
            assert (limit["requested_tokens"], limit["affordable_tokens"], limit["available"]) == (1000, 20, 50)
            assert "You requested up to 1000 output tokens, but can only afford 20." == limit["message"]
            await (await admit(adm, key, output=20)).settle(USED, status="ok")

    asyncio.run(main())
