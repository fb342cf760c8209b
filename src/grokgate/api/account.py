"""What a key holder may see of its own account: the account's balance and usage, the key's spending limit."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from grokgate.api.deps import Gateway, authenticate, gateway, own_token_id
from grokgate.api.openapi import ErrorEnvelope
from grokgate.core.accounts import format_credits, now_ms
from grokgate.core.admission import Principal
from grokgate.core.errors import GatewayError

router = APIRouter(tags=["account"])

# -- query parameters ------------------------------------------------------------------------------------------

_DAY = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
SINCE_QUERY: dict[str, JsonValue] = {"type": "string", "format": "date", "pattern": _DAY.pattern,
                                     "description": "The first UTC day to count, YYYY-MM-DD (inclusive)"}


def check_day(value: str | None, param: str) -> str | None:
    """A real calendar day written YYYY-MM-DD (what `format: date` says), or None. The store compares days as
    text, so "2024-02-30" would silently mean "from March"; it is refused instead."""
    if value is None:
        return None
    try:
        if not _DAY.fullmatch(value):  # fullmatch: `$` alone would let a trailing newline through
            raise ValueError
        dt.date.fromisoformat(value)
    except ValueError:
        raise GatewayError(400, "bad_request", f"'{param}' must be a date written YYYY-MM-DD, got {value!r}.",
                           param=param) from None
    return value


# -- response bodies, for the OpenAPI document (the routes return plain dicts: nothing is validated per request) --


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


Micro = Annotated[int, Field(description="Micro-credits (millionths of a credit)")]
SignedCredits = Annotated[str, Field(description="The same amount in credits, as a decimal string",
                                     pattern=r"^-?[0-9]+(\.[0-9]{1,6})?$")]
Count = Annotated[int, Field(ge=0)]


class _UsageTotals(_Closed):
    requests: Count
    prompt_tokens: Count
    cached_tokens: Count
    completion_tokens: Count
    reasoning_tokens: Count
    cost: Micro
    upstream_requests: Count = Field(description="Requests whose upstream reported its own cost (xAI's "
                                                 "cost_in_usd_ticks)")
    upstream_cost_ticks: Count = Field(description="That cost, in the upstream's ticks (1 USD = 1e10 ticks)")
    upstream_charged: Micro = Field(description="What grokgate charged for those same requests")


class UsageByDay(_UsageTotals):
    day: str = Field(description="A UTC day, YYYY-MM-DD", json_schema_extra={"format": "date"})


class UsageByModel(_UsageTotals):
    model: str


class UsageReport(_Closed):
    object: Literal["list"]
    by: Literal["day", "model"]
    data: list[UsageByDay] | list[UsageByModel] = Field(description="Rows keyed by `day` or by `model`, as `by` "
                                                                    "says, in that key's order")


class BalanceToken(_Closed):
    id: int
    name: str
    prefix: str


class BalanceAccount(_Closed):
    id: int
    name: str


class KeySpend(_Closed):
    """A key's spending limit and what it spent in the current period (core/budgets.py)."""

    limit: Micro | None = Field(description="The key's spending limit; null: only the account's balance bounds it")
    limit_credits: SignedCredits | None
    period: Literal["daily", "weekly", "monthly"] | None = Field(
        description="When the limit resets (UTC calendar days, ISO weeks from Monday, months); null: never")
    spent: Micro = Field(description="Settled in the current period")
    spent_credits: SignedCredits
    reserved: Micro = Field(description="Held in the current period by the key's requests in flight")
    remaining: Micro | None = Field(description="What the limit still allows this period; null: no limit")
    resets_at: int | None = Field(description="Unix seconds when the current period ends; null: never")


class Balance(_Closed):
    object: Literal["balance"]
    token: BalanceToken
    account: BalanceAccount
    balance: Micro = Field(description="The account's balance, shared by all its keys")
    reserved: Micro = Field(description="Micro-credits held for the account's requests in flight")
    balance_credits: SignedCredits
    unit: Literal["micro-credits"]
    key: KeySpend = Field(description="The calling key's own spending limit and this period's spend")


# The 403 a holder's own routes add to the usual ones (a disabled token); api/openapi.py adds the rest.
OWN_FORBIDDEN: dict[int | str, dict[str, Any]] = {403: {
    "model": ErrorEnvelope,
    "description": "`forbidden`: the bootstrap admin token (GROKGATE_API_KEYS) has no account; `disabled`: the "
                   "token is disabled",
}}


@router.get("/v1/balance", summary="The calling key's account balance, and the key's spending limit",
            response_model=None,
            responses={200: {"model": Balance, "description": "The balance, in micro-credits and in credits"},
                       **OWN_FORBIDDEN})
@router.get("/grok/balance", include_in_schema=False)
async def balance(
    principal: Annotated[Principal, Depends(authenticate)],
    gw: Annotated[Gateway, Depends(gateway)],
) -> dict[str, Any]:
    assert gw.store is not None
    record = await gw.store.require_token(own_token_id(principal))
    return {
        "object": "balance",
        "token": {"id": record.id, "name": record.name, "prefix": record.prefix},
        "account": {"id": record.account_id, "name": record.account_name},
        "key": record.cap(now_ms()),
        "balance": record.balance,
        "reserved": record.reserved,
        "balance_credits": format_credits(record.balance),
        "unit": "micro-credits",
    }


@router.get("/v1/usage", summary="The calling account's usage (or its key's), by day or by model", response_model=None,
            responses={200: {"model": UsageReport, "description": "Totals per UTC day or per model"},
                       **OWN_FORBIDDEN})
@router.get("/grok/usage", include_in_schema=False)
async def usage(
    principal: Annotated[Principal, Depends(authenticate)],
    gw: Annotated[Gateway, Depends(gateway)],
    since: Annotated[str | None, Query(json_schema_extra=SINCE_QUERY)] = None,
    by: Annotated[Literal["day", "model"], Query()] = "day",
    scope: Annotated[Literal["account", "key"], Query(description="account: all the account's keys; key: the "
                                                                  "calling key's own")] = "account",
) -> dict[str, Any]:
    assert gw.store is not None
    token_id = own_token_id(principal)
    if scope == "key":
        rows = await gw.store.usage(token_id=token_id, since=check_day(since, "since"), by=by)
    else:
        rows = await gw.store.usage(account_id=principal.account_id, since=check_day(since, "since"), by=by)
    return {"object": "list", "by": by, "data": rows}
