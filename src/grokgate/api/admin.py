"""The admin HTTP API (admin token only): tokens, credits, prices, usage. The CLI does the same on the store."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Coroutine
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from grokgate.api.chat import authenticate
from grokgate.api.deps import Gateway, gateway
from grokgate.core.accounts import parse_credits
from grokgate.core.admission import Principal
from grokgate.core.errors import GatewayError
from grokgate.core.pricing import MICRO, Price
from grokgate.store.sql import SqlStore


async def require_admin(
    principal: Annotated[Principal, Depends(authenticate)],
    gw: Annotated[Gateway, Depends(gateway)],
) -> SqlStore:
    if not principal.admin:
        raise GatewayError(403, "forbidden", "This API needs the admin token.")
    assert gw.store is not None
    return gw.store


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
Store = Annotated[SqlStore, Depends(require_admin)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


INT32_MAX = 2_147_483_647  # the limit columns are 32-bit integers
LAST_SECOND = 253_402_300_799  # 9999-12-31: expiries beyond it would overflow as milliseconds
Amount = StrictStr | StrictInt | StrictFloat  # strict: JSON `true` must not become 1 credit


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
    credits: Amount | None = Field(default=None, description="Initial credits, e.g. \"10\" or \"0.5\"")


class KeyUpdate(_Strict):
    """Fields left out are unchanged; `null` clears the nullable ones (limits, models, expiry)."""

    name: str | None = Field(default=None, min_length=1, max_length=200, json_schema_extra=TOKEN_NAME)
    disabled: bool | None = None
    allowed_models: list[str] | None = None
    expires_at: int | None = Field(default=None, gt=0, le=LAST_SECOND)
    rpm: int | None = Field(default=None, ge=1, le=INT32_MAX)
    tpm: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_concurrency: int | None = Field(default=None, ge=1, le=INT32_MAX)


NOT_NULLABLE = ("name", "disabled")


class CreditsAdd(_Strict):
    amount: Amount = Field(description="Credits to add, e.g. \"10\" or \"0.5\"")
    note: str | None = Field(default=None, max_length=500)


class PriceSet(_Strict):
    input: Amount = Field(description="Credits per million input tokens")
    cached_input: Amount = Field(description="Credits per million cached input tokens")
    output: Amount = Field(description="Credits per million output (and reasoning) tokens")


def parse_price(value: str | int | float, field: str) -> int:
    try:
        amount = Decimal(str(value).strip()) * MICRO
    except (InvalidOperation, ValueError):
        raise GatewayError(400, "bad_request", f"Not a price: {value!r}.", param=field) from None
    if not amount.is_finite() or amount < 0 or amount != amount.to_integral_value() or amount > 10**15:
        raise GatewayError(400, "bad_request",
                           "A price is a non-negative number of credits with at most 6 decimals.", param=field)
    return int(amount)


@router.post("/keys", status_code=201, summary="Create a token (its secret is shown only in this answer)")
async def create_key(body: KeyCreate, store: Store) -> dict[str, Any]:
    initial = parse_credits(body.credits) if body.credits is not None else 0
    record, secret = await store.create_token(
        body.name, allowed_models=body.allowed_models, rpm=body.rpm, tpm=body.tpm,
        max_concurrency=body.max_concurrency, expires_at=body.expires_at * 1000 if body.expires_at else None,
    )
    if initial:
        record = await store.add_credits(record.id, initial, note="initial credits")
    return {"token": secret, "key": record.public()}


@router.get("/keys", summary="List tokens (by prefix; secrets are never shown again)")
async def list_keys(store: Store) -> dict[str, Any]:
    return {"object": "list", "data": [r.public() for r in await store.list_tokens()]}


@router.get("/keys/{ref}", summary="One token, by id, name or prefix")
async def show_key(ref: str, store: Store) -> dict[str, Any]:
    return (await store.require_token(ref)).public()


@router.patch("/keys/{ref}", summary="Change a token's name, limits, models, expiry or disabled flag")
async def update_key(ref: str, body: KeyUpdate, store: Store) -> dict[str, Any]:
    record = await store.require_token(ref)
    fields = body.model_dump(exclude_unset=True)
    for name in NOT_NULLABLE:
        if name in fields and fields[name] is None:
            raise GatewayError(400, "bad_request", f"{name} cannot be null.", param=name)
    if "expires_at" in fields and fields["expires_at"] is not None:
        fields["expires_at"] *= 1000
    return (await store.update_token(record.id, **fields)).public()


@router.delete("/keys/{ref}", summary="Delete a token (its ledger rows stay)")
async def delete_key(ref: str, store: Store) -> dict[str, Any]:
    record = await store.require_token(ref)
    await store.delete_token(record.id)
    return {"deleted": True, "id": record.id}


@router.post("/keys/{ref}/credits", summary="Top up a token's balance (recorded in the ledger)")
async def add_credits(ref: str, body: CreditsAdd, store: Store) -> dict[str, Any]:
    record = await store.require_token(ref)
    return (await store.add_credits(record.id, parse_credits(body.amount), note=body.note)).public()


def _price_json(p: Price) -> dict[str, Any]:
    return {"model": p.model, "version": p.version, "input": p.input, "cached_input": p.cached_input,
            "output": p.output, "unit": "micro-credits per million tokens"}


@router.get("/prices", summary="Current prices and every earlier version")
async def list_prices(store: Store) -> dict[str, Any]:
    current = await store.current_prices()
    history = await store.price_history()
    return {"current": [_price_json(p) for p in current.values()], "history": [_price_json(p) for p in history]}


@router.put("/prices/{model}", summary="Set a model's prices (creates a new version)")
async def set_price(model: Annotated[str, Path(json_schema_extra={**_TEXT, "maxLength": 200})], body: PriceSet,
                    store: Store) -> dict[str, Any]:
    price = Price(model, parse_price(body.input, "input"), parse_price(body.cached_input, "cached_input"),
                  parse_price(body.output, "output"))
    return _price_json(await store.set_price(price))


@router.get("/usage", summary="Usage by day or model, for all tokens or one; CSV with format=csv")
async def usage(
    store: Store,
    token: str | None = None,
    since: Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}-\d{2}$")] = None,
    by: Literal["day", "model"] = "day",
    format: Literal["json", "csv"] = "json",
) -> Any:
    token_id = (await store.require_token(token)).id if token else None
    rows = await store.usage(token_id=token_id, since=since, by=by)
    if format == "csv":
        return Response(to_csv(rows), media_type="text/csv")
    return {"object": "list", "by": by, "data": rows}


@router.get("/ledger", summary="Ledger rows, newest first: usage and top-ups")
async def ledger(
    store: Store,
    token: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> dict[str, Any]:
    token_id = (await store.require_token(token)).id if token else None
    return {"object": "list", "data": await store.ledger_rows(token_id=token_id, limit=limit)}


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()
