"""The admin HTTP API of accounts (admin token only): the customers, their balance, their keys.

An account holds the balance; its keys spend from it, each within its own spending limit (core/budgets.py). Keys
themselves are also reached at /admin/keys (api/admin.py); usage and ledger per account are `?account=` there.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import Field

from grokgate.api.account import Micro, SignedCredits
from grokgate.api.admin import (
    INT32_MAX,
    TOKEN_NAME,
    AdminRoute,
    CreditsAdd,
    KeyCreate,
    KeyCreated,
    OptionalAmount,
    Period,
    TokenPublic,
    _ok,
    _Strict,
    new_key,
)
from grokgate.api.deps import require_admin
from grokgate.core.accounts import AdminStore, now_ms, parse_credits
from grokgate.core.errors import GatewayError

router = APIRouter(prefix="/admin", tags=["admin"], route_class=AdminRoute)
Store = Annotated[AdminStore, Depends(require_admin)]


class AccountCreate(_Strict):
    name: str = Field(min_length=1, max_length=200, json_schema_extra=TOKEN_NAME)
    credits: OptionalAmount = Field(default=None, description="Initial credits (zero or more); null: none")
    rpm: int | None = Field(default=None, ge=1, le=INT32_MAX, description="Requests per minute, all keys together")
    tpm: int | None = Field(default=None, ge=1, le=INT32_MAX, description="Tokens per minute, all keys together")
    max_concurrency: int | None = Field(default=None, ge=1, le=INT32_MAX,
                                        description="Requests in flight, all keys together")


class AccountUpdate(_Strict):
    """Fields left out are unchanged; `null` clears a limit."""

    name: str | None = Field(default=None, min_length=1, max_length=200, json_schema_extra=TOKEN_NAME)
    disabled: bool | None = None
    rpm: int | None = Field(default=None, ge=1, le=INT32_MAX)
    tpm: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_concurrency: int | None = Field(default=None, ge=1, le=INT32_MAX)


class AccountKeyCreate(_Strict):
    """A key of this account: its own limits, models and expiry, and an optional spending limit."""

    name: str = Field(min_length=1, max_length=200, json_schema_extra=TOKEN_NAME)
    allowed_models: list[str] | None = None
    expires_at: int | None = Field(default=None, description="Unix seconds", gt=0, le=253_402_300_799)
    rpm: int | None = Field(default=None, ge=1, le=INT32_MAX)
    tpm: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_concurrency: int | None = Field(default=None, ge=1, le=INT32_MAX)
    spend_limit: OptionalAmount = Field(default=None, description="Credits the key may spend per period; null: "
                                                                  "only the account's balance bounds it")
    period: Period | None = Field(default=None, description="When the limit resets (UTC calendar); null: never")


class AccountPublic(_Strict):
    """An account as every admin answer shows it (core/budgets.py AccountRecord.public)."""

    object: Literal["account"]
    id: int
    name: str
    created_at: int = Field(description="Unix seconds")
    disabled: bool = Field(description="A disabled account's keys are all refused (403 `disabled`)")
    rpm: int | None = Field(description="Requests per minute across all its keys; null: no limit")
    tpm: int | None = Field(description="Tokens per minute across all its keys; null: no limit")
    max_concurrency: int | None = Field(description="Requests in flight across all its keys; null: no limit")
    balance: Micro = Field(description="Shared by all its keys")
    reserved: Micro = Field(description="Held for requests in flight")
    balance_credits: SignedCredits
    keys: int = Field(description="How many keys it has")


class AccountDetail(AccountPublic):
    data: list[TokenPublic] = Field(description="Its keys, each with its spending limit and this period's spend")


class AccountList(_Strict):
    object: Literal["list"]
    data: list[AccountPublic]


async def _detail(store: AdminStore, account_id: int) -> dict[str, Any]:
    account = await store.require_account(account_id)
    now = now_ms()
    return {**account.public(), "data": [k.public(now) for k in await store.account_keys(account_id)]}


@router.post("/accounts", status_code=201, summary="Create an account (a customer: it holds the balance)",
             response_model=None, responses=_ok(AccountPublic, "The account", 201))
async def create_account(body: AccountCreate, store: Store) -> dict[str, Any]:
    initial = parse_credits(body.credits, "credits", allow_zero=True) if body.credits is not None else 0
    account = await store.create_account(body.name, rpm=body.rpm, tpm=body.tpm, max_concurrency=body.max_concurrency)
    if initial:
        account = await store.add_account_credits(account.id, initial, note="initial credits")
    return account.public()


@router.get("/accounts", summary="List accounts", response_model=None, responses=_ok(AccountList, "Every account"))
async def list_accounts(store: Store) -> dict[str, Any]:
    return {"object": "list", "data": [a.public() for a in await store.list_accounts()]}


@router.get("/accounts/{ref}", summary="One account (by id or name), with its keys", response_model=None,
            responses=_ok(AccountDetail, "The account and its keys"))
async def show_account(ref: str, store: Store) -> dict[str, Any]:
    return await _detail(store, (await store.require_account(ref)).id)


@router.patch("/accounts/{ref}", summary="Rename, disable or enable an account, or change its shared limits",
              response_model=None, responses=_ok(AccountPublic, "The account as changed"))
async def update_account(ref: str, body: AccountUpdate, store: Store) -> dict[str, Any]:
    account = await store.require_account(ref)
    fields = body.model_dump(exclude_unset=True)
    for name in ("name", "disabled"):
        if name in fields and fields[name] is None:
            raise GatewayError(400, "bad_request", f"{name} cannot be null.", param=name)
    return (await store.update_account(account.id, **fields)).public()


@router.post("/accounts/{ref}/disable", summary="Disable an account: all its keys are refused",
             response_model=None, responses=_ok(AccountPublic, "The account, disabled"))
async def disable_account(ref: str, store: Store) -> dict[str, Any]:
    account = await store.require_account(ref)
    return (await store.update_account(account.id, disabled=True)).public()


@router.post("/accounts/{ref}/credits", summary="Top up an account (recorded in the ledger)", response_model=None,
             responses=_ok(AccountPublic, "The account with its new balance"))
async def add_account_credits(ref: str, body: CreditsAdd, store: Store) -> dict[str, Any]:
    amount = parse_credits(body.amount, "amount")
    account = await store.require_account(ref)
    return (await store.add_account_credits(account.id, amount, note=body.note)).public()


@router.post("/accounts/{ref}/keys", status_code=201, summary="Create a key of the account (its secret is shown "
                                                               "only in this answer)",
             response_model=None, responses=_ok(KeyCreated, "The key, with its secret", 201))
async def create_account_key(ref: str, body: AccountKeyCreate, store: Store) -> dict[str, Any]:
    account = await store.require_account(ref)
    return await new_key(store, KeyCreate(**body.model_dump()), 0, account.id)
