"""The ledger's JSON API, which the console and scripts read (the console's static files are api/console.py):

- `GET /admin/ledger/search` (admin): ledger rows filtered by token, model, status, kind, endpoint (chat |
  responses) and UTC date range, newest first, paginated with an opaque cursor, JSON or CSV.
- `GET /v1/ledger` (any account token): the same for the calling key's account (`scope=key`: the key's own rows).
- `GET /admin/ledger/errors` (admin) and `GET /v1/ledger/errors` (own): failed requests per day and status.
- `GET /admin/models` (admin): the routing table: each public model, its routes and its current price.

Every ledger query is a range of `ix_ledger_created`, `ix_ledger_token_created` or `ix_ledger_account_created`
(see store/reports.py).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, JsonValue
from starlette.responses import Response

from grokgate.api.account import Micro, SignedCredits
from grokgate.api.admin import LedgerEntry
from grokgate.api.deps import Gateway, authenticate, gateway, own_token_id, require_admin
from grokgate.core.accounts import AdminStore, ReportStore, format_credits
from grokgate.core.admission import Principal
from grokgate.core.errors import GatewayError

DAY_MS = 86_400_000
MAX_LIMIT = 10_000
MAX_ERROR_DAYS = 366

router = APIRouter()

# -- query parameters ----------------------------------------------------------------------------------------

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_CURSOR = re.compile(r"^(\d{1,15})\.(\d{1,15})$")
_STATUS = re.compile(r"^!?[a-z_]{1,32}$")
# What the OpenAPI document says of each parameter. The handlers below check them (with messages naming the
# parameter), so these only describe. An empty value means "not given", so the query forms allow it.
DATE_FORMAT: dict[str, JsonValue] = {"format": "date", "pattern": _DATE.pattern, "description": "A UTC day, YYYY-MM-DD"}
CURSOR_FORMAT: dict[str, JsonValue] = {"pattern": _CURSOR.pattern,
                                       "description": "`next_cursor` of the previous page (opaque)"}
DATE_QUERY: dict[str, JsonValue] = {"type": "string", "anyOf": [DATE_FORMAT, {"maxLength": 0}],
                                    "description": "A UTC day, YYYY-MM-DD, inclusive; empty: not given"}
CURSOR_QUERY: dict[str, JsonValue] = {"type": "string", "pattern": rf"^({_CURSOR.pattern[1:-1]})?$",
                                      "description": "`next_cursor` of the previous page (opaque); empty: the first"}
STATUS_QUERY: dict[str, JsonValue] = {"type": "string", "pattern": rf"^({_STATUS.pattern[1:-1]})?$",
                                      "description": "A status (ok, error, client_disconnected...); `!ok`: any other"}
Day = Annotated[str | None, Query(json_schema_extra=DATE_QUERY)]
Text = Annotated[str | None, Query(json_schema_extra={"maxLength": 200})]


def _bad(message: str, param: str) -> GatewayError:
    return GatewayError(400, "bad_request", message, param=param)


def parse_day(value: str | None, param: str) -> dt.date | None:
    if value is None or value == "":
        return None
    try:
        if not _DATE.match(value):
            raise ValueError
        return dt.date.fromisoformat(value)
    except ValueError:
        raise _bad(f"'{param}' must be a date written YYYY-MM-DD, got {value!r}.", param) from None


def day_ms(day: dt.date) -> int:
    return (day - dt.date(1970, 1, 1)).days * DAY_MS


def date_range(since: str | None, until: str | None) -> tuple[int | None, int | None]:
    """UTC days, both inclusive -> [since_ms, until_ms) epoch milliseconds."""
    start, end = parse_day(since, "since"), parse_day(until, "until")
    if start is not None and end is not None and start > end:
        raise _bad("'since' is after 'until'.", "since")
    return (day_ms(start) if start else None), (day_ms(end) + DAY_MS if end else None)


def parse_cursor(value: str | None) -> tuple[int, int] | None:
    if value is None or value == "":
        return None
    match = _CURSOR.match(value)
    if not match:
        raise _bad("'cursor' is not one this API handed out (use next_cursor of the previous page).", "cursor")
    return int(match.group(1)), int(match.group(2))


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise _bad(f"'limit' must be between 1 and {MAX_LIMIT}.", "limit")
    return limit


def check_status(status: str | None) -> str | None:
    if status is None or status == "":
        return None
    if not _STATUS.match(status):
        raise _bad("'status' is a status such as ok, error or client_disconnected; '!ok' means any other.",
                   "status")
    return status


def check_text(value: str | None, param: str) -> str | None:
    if value is None or value == "":
        return None
    if len(value) > 200:
        raise _bad(f"'{param}' is too long.", param)
    return value


# -- response bodies, for the OpenAPI document (the routes return plain dicts: nothing is validated at runtime) --


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


DayString = Annotated[str, Field(json_schema_extra=DATE_FORMAT)]


class LedgerRow(LedgerEntry):
    """A ledger row as the console shows it: times in seconds, money also as credits."""

    created_at: int = Field(description="Unix seconds")
    endpoint: Literal["chat", "responses", "grpc"] | None = Field(
        description="The API the request came through: chat (chat completions), responses, or grpc (xAI's native "
                    "API); null: a top-up")
    server_tool_calls: int = Field(description="Server-side tool calls (web search...) charged per call")
    amount_credits: SignedCredits
    cost_credits: SignedCredits


class LedgerPage(_Closed):
    object: Literal["list"]
    data: list[LedgerRow]
    has_more: bool
    next_cursor: str | None = Field(json_schema_extra=CURSOR_FORMAT)


class ErrorDay(_Closed):
    day: DayString
    count: int


class ErrorCounts(_Closed):
    object: Literal["errors"]
    since: DayString
    until: DayString
    total: int
    by_status: dict[str, int]
    by_day: list[ErrorDay]


class RouteInfo(_Closed):
    backend: str
    kind: str
    model: str
    priority: int
    weight: int
    ready: bool


class PriceInfo(_Closed):
    version: int
    input: Micro
    cached_input: Micro
    output: Micro
    unit: Literal["micro-credits per million tokens"]


class ModelRoutes(_Closed):
    id: str
    routes: list[RouteInfo]
    price: PriceInfo | None


class RoutingTable(_Closed):
    object: Literal["list"]
    data: list[ModelRoutes]


LEDGER_RESPONSES: dict[int | str, dict[str, Any]] = {200: {
    "model": LedgerPage,
    "description": "One page, newest first; `format=csv`: the same rows as CSV",
    "content": {"text/csv": {"schema": {"type": "string"}}},
    "headers": {"x-next-cursor": {"description": "CSV only: the cursor of the next page, absent on the last",
                                  "schema": {"type": "string", **CURSOR_FORMAT}}},
}}


# -- ledger --------------------------------------------------------------------------------------------------


def _row_json(row: dict[str, Any]) -> dict[str, Any]:
    """A ledger row as the console shows it: times in seconds, money also as credits."""
    return {**row, "created_at": row["created_at"] // 1000, "amount_credits": format_credits(int(row["amount"])),
            "cost_credits": format_credits(int(row["cost"]))}


@dataclass
class LedgerQuery:
    """The ledger filters both the admin's and a holder's endpoint take (as query parameters)."""

    model: Text = None
    status: Annotated[str | None, Query(json_schema_extra=STATUS_QUERY)] = None
    kind: Literal["usage", "topup"] | None = None
    endpoint: Literal["chat", "responses", "grpc"] | None = None
    since: Day = None
    until: Day = None
    cursor: Annotated[str | None, Query(json_schema_extra=CURSOR_QUERY)] = None
    limit: Annotated[int, Query(json_schema_extra={"minimum": 1, "maximum": MAX_LIMIT})] = 100
    format: Literal["json", "csv"] = "json"


async def _ledger(store: ReportStore, token_id: int | None, q: LedgerQuery, account_id: int | None = None) -> Any:
    since_ms, until_ms = date_range(q.since, q.until)
    rows, more = await store.ledger_page(
        token_id=token_id, account_id=account_id, model=check_text(q.model, "model"), status=check_status(q.status),
        kind=q.kind,
        endpoint=q.endpoint, since_ms=since_ms, until_ms=until_ms, cursor=parse_cursor(q.cursor),
        limit=check_limit(q.limit),
    )
    format = q.format
    data = [_row_json(r) for r in rows]
    last = rows[-1] if rows and more else None
    next_cursor = f"{last['created_at']}.{last['id']}" if last else None
    if format == "csv":
        headers = {"content-disposition": 'attachment; filename="ledger.csv"'}
        if next_cursor:
            headers["x-next-cursor"] = next_cursor
        return Response(store.to_csv(data), media_type="text/csv", headers=headers)
    return {"object": "list", "data": data, "has_more": more, "next_cursor": next_cursor}


Admin = Annotated[AdminStore, Depends(require_admin)]


@router.get("/admin/ledger/search", tags=["admin"], responses=LEDGER_RESPONSES,
            summary="Ledger rows filtered by token, model, status, kind, endpoint, UTC dates; paginated; JSON or CSV")
async def admin_ledger(store: Admin, q: Annotated[LedgerQuery, Depends()], token: Text = None,
                       account: Text = None) -> Any:
    """`token` (a key) or `account` (all its keys and its top-ups) narrow the rows; `status=!ok` lists every
    failed row; `since`/`until` are inclusive UTC days (YYYY-MM-DD); pass the answer's `next_cursor` as `cursor`
    for the next page (CSV: the `x-next-cursor` header)."""
    token_id, account_id = await whose(store, token, account)
    return await _ledger(store, token_id, q, account_id)


async def whose(store: AdminStore, token: str | None, account: str | None) -> tuple[int | None, int | None]:
    """The key id and the account id the admin's `token` and `account` filters name (None: not given)."""
    token = check_text(token, "token")
    account = check_text(account, "account")
    token_id = (await store.require_token(token)).id if token else None
    account_id = (await store.require_account(account)).id if account else None
    return token_id, account_id


async def _own(
    principal: Annotated[Principal, Depends(authenticate)],
    gw: Annotated[Gateway, Depends(gateway)],
    scope: Annotated[Literal["account", "key"], Query(description="account: every key of the caller's account "
                                                                  "(and its top-ups); key: the calling key's own")]
    = "account",
) -> tuple[ReportStore, int | None, int | None]:
    assert gw.store is not None
    token_id = own_token_id(principal)
    if scope == "key":
        return gw.store, token_id, None
    return gw.store, None, principal.account_id


Own = Annotated[tuple[ReportStore, int | None, int | None], Depends(_own)]


@router.get("/v1/ledger", tags=["account"], responses=LEDGER_RESPONSES,
            summary="The calling account's ledger rows, or its key's (filters as the admin's)")
async def own_ledger(own: Own, q: Annotated[LedgerQuery, Depends()]) -> Any:
    store, token_id, account_id = own
    return await _ledger(store, token_id, q, account_id)


async def _errors(store: ReportStore, token_id: int | None, since: str | None, until: str | None,
                  account_id: int | None = None) -> dict[str, Any]:
    today = dt.datetime.now(dt.UTC).date()
    end = parse_day(until, "until") or today
    # The default window is the 30 days up to `until`, cut short at 0001-01-01 (before it, no date exists).
    start = parse_day(since, "since") or end - dt.timedelta(days=min(29, (end - dt.date.min).days))
    if start > end:
        raise _bad("'since' is after 'until'.", "since")
    if (end - start).days >= MAX_ERROR_DAYS:
        raise _bad(f"Ask for at most {MAX_ERROR_DAYS} days of errors at a time.", "since")
    rows = await store.ledger_errors(token_id=token_id, since_ms=day_ms(start), until_ms=day_ms(end) + DAY_MS,
                                     account_id=account_id)
    by_status: dict[str, int] = {}
    by_day: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + r["count"]
        by_day[r["day"]] = by_day.get(r["day"], 0) + r["count"]
    return {"object": "errors", "since": start.isoformat(), "until": end.isoformat(),
            "total": sum(by_status.values()), "by_status": by_status,
            "by_day": [{"day": d, "count": n} for d, n in by_day.items()]}


@router.get("/admin/ledger/errors", tags=["admin"], summary="Failed requests per UTC day and status",
            response_model=None, responses={200: {"model": ErrorCounts}})
async def admin_errors(store: Admin, token: Text = None, since: Day = None, until: Day = None,
                       account: Text = None) -> dict[str, Any]:
    """Requests whose status is not `ok`, over [since, until] (UTC days; default the last 30)."""
    token_id, account_id = await whose(store, token, account)
    return await _errors(store, token_id, since, until, account_id)


@router.get("/v1/ledger/errors", tags=["account"], summary="The calling token's failed requests per day and status",
            response_model=None, responses={200: {"model": ErrorCounts}})
async def own_errors(own: Own, since: Day = None, until: Day = None) -> dict[str, Any]:
    store, token_id, account_id = own
    return await _errors(store, token_id, since, until, account_id)


# -- routing table -------------------------------------------------------------------------------------------


def _routes(route: Any) -> list[dict[str, Any]]:
    """A RoutedModel's candidates, or the one provider of a plain route (the local engine)."""
    provider = route.provider
    candidates = getattr(provider, "candidates", None)
    if candidates is None:
        return [{"backend": provider.name, "kind": getattr(provider, "kind", provider.name),
                 "model": route.upstream_model, "priority": 0, "weight": 1, "ready": bool(provider.ready())}]
    return [{"backend": c.backend.name, "kind": getattr(c.backend, "kind", c.backend.name), "model": c.model,
             "priority": c.priority, "weight": c.weight, "ready": bool(c.backend.ready())} for c in candidates]


@router.get("/admin/models", tags=["admin"], summary="The routing table: public models, their routes and prices",
            response_model=None, responses={200: {"model": RoutingTable}})
async def admin_models(store: Admin, gw: Annotated[Gateway, Depends(gateway)]) -> dict[str, Any]:
    prices = await store.current_prices()
    data = []
    for name in gw.models.names():
        route = gw.models.get(name)
        assert route is not None
        price = prices.get(name)
        data.append({
            "id": name,
            "routes": _routes(route),
            "price": None if price is None else {"version": price.version, "input": price.input,
                                                 "cached_input": price.cached_input, "output": price.output,
                                                 "unit": "micro-credits per million tokens"},
        })
    return {"object": "list", "data": data}
