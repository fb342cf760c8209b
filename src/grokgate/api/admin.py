"""The admin HTTP API (admin token only): tokens, credits, prices, usage. The CLI does the same on the store."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, WithJsonSchema
from starlette.requests import Request
from starlette.responses import Response

from grokgate.api.account import SINCE_QUERY, KeySpend, Micro, SignedCredits, UsageReport, check_day
from grokgate.api.deps import Gateway, require_admin
from grokgate.core.accounts import AdminStore, credits_schema, parse_credits, parse_price
from grokgate.core.errors import GatewayError
from grokgate.core.pricing import Price


class AdminRoute(APIRoute):
    """Checks the admin token before anything reads the body. FastAPI reads and parses a route's body before it
    solves its dependencies, so with `require_admin` alone a client without a token could make the server
    read (up to the body limit) and validate a body, and would get that body's 400 instead of the auth error."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def admin_first(request: Request) -> Response:
            gw: Gateway = request.app.state.gateway
            principal = await gw.admission.authenticate(request.headers.get("authorization"))
            if not principal.admin:
                raise GatewayError(403, "forbidden", "This API needs the admin token.")
            return await handler(request)

        return admin_first


router = APIRouter(prefix="/admin", tags=["admin"], route_class=AdminRoute)
Store = Annotated[AdminStore, Depends(require_admin)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Period = Literal["daily", "weekly", "monthly"]
GRACE_SECONDS = 3600  # a rotated key's old secret works this long by default: time to roll the new one out
MAX_GRACE_SECONDS = 30 * 86400


INT32_MAX = 2_147_483_647  # the limit columns are 32-bit integers
LAST_SECOND = 253_402_300_799  # 9999-12-31: expiries beyond it would overflow as milliseconds
# Strict: JSON `true` must not become 1 credit. Floats pass pydantic only so that parse_credits can take `2.0` (an
# integer by JSON Schema's rule) and refuse `2.5` with a message naming the field; the document states the rule.
_Number = StrictStr | StrictInt | StrictFloat
Amount = Annotated[_Number, WithJsonSchema(credits_schema(positive=False))]
PositiveAmount = Annotated[_Number, WithJsonSchema(credits_schema(positive=True))]
OptionalAmount = Annotated[_Number | None, WithJsonSchema(credits_schema(positive=False, nullable=True))]


# What check_token_name and check_text (core/accounts.py) accept, for the OpenAPI document; the store checks.
_CONTROL = "\\u0000-\\u001f\\u007f-\\u009f"
_TEXT = {"pattern": f"^[^{_CONTROL}]*[^\\s{_CONTROL}][^{_CONTROL}]*$"}
TOKEN_NAME: dict[str, Any] = {
    **_TEXT,
    "not": {"anyOf": [{"pattern": "^\\s*[0-9]+\\s*$"}, {"pattern": "^\\s*[gG][gG]-"}]},
    "description": "Not blank, no control characters, not a number and not starting with 'gg-' (those read as "
                   "a token's id or prefix)",
}


class KeyCreate(_Strict):
    name: str = Field(min_length=1, max_length=200, json_schema_extra=TOKEN_NAME)
    allowed_models: list[str] | None = None
    expires_at: int | None = Field(default=None, description="Unix seconds", gt=0, le=LAST_SECOND)
    rpm: int | None = Field(default=None, ge=1, le=INT32_MAX)
    tpm: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_concurrency: int | None = Field(default=None, ge=1, le=INT32_MAX)
    credits: OptionalAmount = Field(default=None, description="Credits added to the key's account (zero or more), "
                                                              "e.g. \"10\" or \"0.5\"; null or left out: none")
    account: str | None = Field(default=None, min_length=1, max_length=200,
                                description="The account (id or name) the key spends from; left out: a new "
                                            "account of its own, named like the key")
    spend_limit: OptionalAmount = Field(default=None, description="The key's spending limit in credits; null: "
                                                                  "only the account's balance bounds it")
    period: Period | None = Field(default=None, description="When the spending limit resets (UTC calendar); "
                                                            "null: never")


class KeyUpdate(_Strict):
    """Fields left out are unchanged; `null` clears the nullable ones (limits, models, expiry)."""

    name: str | None = Field(default=None, min_length=1, max_length=200, json_schema_extra=TOKEN_NAME)
    disabled: bool | None = None
    allowed_models: list[str] | None = None
    expires_at: int | None = Field(default=None, gt=0, le=LAST_SECOND)
    rpm: int | None = Field(default=None, ge=1, le=INT32_MAX)
    tpm: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_concurrency: int | None = Field(default=None, ge=1, le=INT32_MAX)
    spend_limit: OptionalAmount = Field(default=None, description="Credits; null: no limit")
    period: Period | None = Field(default=None, description="daily | weekly | monthly; null: never resets")


NOT_NULLABLE = ("name", "disabled")


class KeyRotate(_Strict):
    grace_seconds: int = Field(default=GRACE_SECONDS, ge=0, le=MAX_GRACE_SECONDS,
                               description="How long the old secret keeps working (0: it stops at once)")


class CreditsAdd(_Strict):
    amount: PositiveAmount = Field(description="Credits to add (more than zero), e.g. \"10\" or \"0.5\"")
    note: str | None = Field(default=None, max_length=500)


class PriceSet(_Strict):
    input: Amount = Field(description="Credits per million input tokens")
    cached_input: Amount = Field(description="Credits per million cached input tokens")
    output: Amount = Field(description="Credits per million output (and reasoning) tokens")


# -- response bodies, for the OpenAPI document (the routes return plain dicts: nothing is validated per request) --


class TokenPublic(_Strict):
    """A token as every admin answer shows it (core/accounts.py TokenRecord.public): never its secret."""

    id: int
    name: str
    prefix: str = Field(description="The secret's first characters (gg-xxxxxxxx): a reference to the token")
    created_at: int = Field(description="Unix seconds")
    expires_at: int | None = Field(description="Unix seconds; null: never expires")
    disabled: bool
    allowed_models: list[str] | None = Field(description="null: every model")
    rpm: int | None = Field(description="Requests per minute; null: no limit")
    tpm: int | None = Field(description="Tokens per minute; null: no limit")
    max_concurrency: int | None = Field(description="Requests in flight; null: no limit")
    account_id: int = Field(description="The account the key spends from")
    account_name: str
    balance: Micro = Field(description="The account's balance (all its keys share it)")
    reserved: Micro = Field(description="Micro-credits the account holds for requests in flight")
    balance_credits: SignedCredits
    spend: KeySpend = Field(description="The key's own spending limit and this period's spend")
    rotated_at: int | None = Field(description="Unix seconds of the last rotation; null: never rotated")
    previous_valid_until: int | None = Field(description="Unix seconds until which the secret before the last "
                                                         "rotation still works; null: it does not")


class KeyCreated(_Strict):
    token: str = Field(description="The secret: shown in this answer only")
    key: TokenPublic


class KeyList(_Strict):
    object: Literal["list"]
    data: list[TokenPublic]


class KeyDeleted(_Strict):
    deleted: Literal[True]
    id: int


class PriceVersion(_Strict):
    model: str
    version: int = Field(description="1 for a model's first price, one more for each change")
    input: Micro
    cached_input: Micro
    output: Micro = Field(description="Also charged for reasoning tokens")
    unit: Literal["micro-credits per million tokens"]


class PriceList(_Strict):
    current: list[PriceVersion]
    history: list[PriceVersion] = Field(description="Every version of every model, the current ones included")


class LedgerEntry(_Strict):
    """A ledger row as the store holds it. Unlike every other time in this API, `created_at` is in
    milliseconds (the console's /admin/ledger/search shows the same rows in seconds)."""

    id: int
    request_id: str
    token_id: int | None = Field(description="The key; null: the bootstrap admin token, or a top-up of an account")
    account_id: int | None = Field(description="The account whose balance moved; null: the bootstrap admin token")
    kind: str = Field(description="usage or topup")
    model: str | None
    backend: str | None
    endpoint: Literal["chat", "responses", "grpc"] | None = Field(
        description="The API the request came through: chat (chat completions), responses, or grpc (xAI's native "
                    "API); null: a top-up")
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    server_tool_calls: int = Field(description="Server-side tool calls (web search...) charged per call")
    amount: int = Field(description="The balance's movement in micro-credits: negative for usage")
    cost: Micro
    price_version: int | None
    status: str = Field(description="ok (top-ups too), error, client_disconnected...")
    estimated: bool = Field(description="Token counts estimated by grokgate, not reported by the backend")
    duration_ms: int | None
    upstream_cost_ticks: int | None = Field(description="What the upstream said the request cost it (xAI's "
                                                        "cost_in_usd_ticks; 1 USD = 1e10 ticks); null: not reported")
    note: str | None
    created_at: int = Field(description="Unix milliseconds (not seconds)")


class LedgerList(_Strict):
    object: Literal["list"]
    data: list[LedgerEntry]


def _ok(model: type[BaseModel], description: str, status: int = 200) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": model, "description": description}}


@router.post("/keys", status_code=201, summary="Create a token (its secret is shown only in this answer)",
             response_model=None, responses=_ok(KeyCreated, "The token, with its secret", 201))
async def create_key(body: KeyCreate, store: Store) -> dict[str, Any]:
    # Zero is a valid starting balance (a token funded later); a top-up, by contrast, must add something.
    initial = parse_credits(body.credits, "credits", allow_zero=True) if body.credits is not None else 0
    return await new_key(store, body, initial, body.account)


async def new_key(store: AdminStore, body: KeyCreate, initial: int, account: str | int | None) -> dict[str, Any]:
    """A key of `account` (a reference), or of a new account of its own (None); `initial` credits are added to
    its account (a ledger row naming the key)."""
    account_id = None if account is None else (await store.require_account(account)).id
    limit = parse_credits(body.spend_limit, "spend_limit", allow_zero=True) if body.spend_limit is not None else None
    record, secret = await store.create_token(
        body.name, allowed_models=body.allowed_models, rpm=body.rpm, tpm=body.tpm,
        max_concurrency=body.max_concurrency, expires_at=body.expires_at * 1000 if body.expires_at else None,
        account_id=account_id, spend_limit=limit, limit_period=body.period,
    )
    if initial:
        record = await store.add_credits(record.id, initial, note="initial credits")
    return {"token": secret, "key": record.public()}


@router.get("/keys", summary="List tokens (by prefix; secrets are never shown again)", response_model=None,
            responses=_ok(KeyList, "Every token, by id"))
async def list_keys(store: Store) -> dict[str, Any]:
    return {"object": "list", "data": [r.public() for r in await store.list_tokens()]}


@router.get("/keys/{ref}", summary="One token, by id, name or prefix", response_model=None,
            responses=_ok(TokenPublic, "The token"))
async def show_key(ref: str, store: Store) -> dict[str, Any]:
    return (await store.require_token(ref)).public()


@router.patch("/keys/{ref}", summary="Change a token's name, limits, models, expiry or disabled flag",
              response_model=None, responses=_ok(TokenPublic, "The token as changed"))
async def update_key(ref: str, body: KeyUpdate, store: Store) -> dict[str, Any]:
    record = await store.require_token(ref)
    fields = body.model_dump(exclude_unset=True)
    for name in NOT_NULLABLE:
        if name in fields and fields[name] is None:
            raise GatewayError(400, "bad_request", f"{name} cannot be null.", param=name)
    if "expires_at" in fields and fields["expires_at"] is not None:
        fields["expires_at"] *= 1000
    if "spend_limit" in fields and fields["spend_limit"] is not None:
        fields["spend_limit"] = parse_credits(fields["spend_limit"], "spend_limit", allow_zero=True)
    if "period" in fields:
        fields["limit_period"] = fields.pop("period")
    return (await store.update_token(record.id, **fields)).public()


@router.post("/keys/{ref}/rotate", summary="A new secret for the same key (the old one works for a grace period)",
             response_model=None, responses=_ok(KeyCreated, "The key, with its new secret (shown only here)"))
async def rotate_key(ref: str, body: KeyRotate, store: Store) -> dict[str, Any]:
    record = await store.require_token(ref)
    record, secret = await store.rotate_token(record.id, body.grace_seconds * 1000)
    return {"token": secret, "key": record.public()}


@router.delete("/keys/{ref}", summary="Delete a token (its ledger rows stay)", response_model=None,
               responses=_ok(KeyDeleted, "The token is deleted"))
async def delete_key(ref: str, store: Store) -> dict[str, Any]:
    record = await store.require_token(ref)
    await store.delete_token(record.id)
    return {"deleted": True, "id": record.id}


@router.post("/keys/{ref}/credits", summary="Top up the balance of a key's account (recorded in the ledger)",
             response_model=None, responses=_ok(TokenPublic, "The key with its account's new balance"))
async def add_credits(ref: str, body: CreditsAdd, store: Store) -> dict[str, Any]:
    amount = parse_credits(body.amount, "amount")
    record = await store.require_token(ref)
    return (await store.add_credits(record.id, amount, note=body.note)).public()


def _price_json(p: Price) -> dict[str, Any]:
    return {"model": p.model, "version": p.version, "input": p.input, "cached_input": p.cached_input,
            "output": p.output, "unit": "micro-credits per million tokens"}


@router.get("/prices", summary="Current prices and every earlier version", response_model=None,
            responses=_ok(PriceList, "Prices in micro-credits per million tokens"))
async def list_prices(store: Store) -> dict[str, Any]:
    current = await store.current_prices()
    history = await store.price_history()
    return {"current": [_price_json(p) for p in current.values()], "history": [_price_json(p) for p in history]}


@router.put("/prices/{model}", summary="Set a model's prices (creates a new version)", response_model=None,
            responses=_ok(PriceVersion, "The new version"))
async def set_price(model: Annotated[str, Path(json_schema_extra={**_TEXT, "maxLength": 200})], body: PriceSet,
                    store: Store) -> dict[str, Any]:
    price = Price(model, parse_price(body.input, "input"), parse_price(body.cached_input, "cached_input"),
                  parse_price(body.output, "output"))
    return _price_json(await store.set_price(price))


@router.get("/usage", summary="Usage by day or model, for all, one account or one key; CSV with format=csv",
            response_model=None, responses=_ok(UsageReport, "Totals per UTC day or per model, oldest day first; "
                                                            "`format=csv`: the same rows as CSV"))
async def usage(
    store: Store,
    token: str | None = None,
    since: Annotated[str | None, Query(json_schema_extra=SINCE_QUERY)] = None,
    by: Literal["day", "model"] = "day",
    format: Literal["json", "csv"] = "json",
    account: str | None = None,
) -> Any:
    since = check_day(since, "since")
    token_id = (await store.require_token(token)).id if token else None
    account_id = (await store.require_account(account)).id if account else None
    rows = await store.usage(token_id=token_id, since=since, by=by, account_id=account_id)
    if format == "csv":
        return Response(store.to_csv(rows), media_type="text/csv")
    return {"object": "list", "by": by, "data": rows}


@router.get("/ledger", summary="Ledger rows, newest first: usage and top-ups", response_model=None,
            responses=_ok(LedgerList, "The newest rows; `created_at` in milliseconds"))
async def ledger(
    store: Store,
    token: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    account: str | None = None,
) -> dict[str, Any]:
    token_id = (await store.require_token(token)).id if token else None
    account_id = (await store.require_account(account)).id if account else None
    return {"object": "list", "data": await store.ledger_rows(token_id=token_id, limit=limit, account_id=account_id)}
