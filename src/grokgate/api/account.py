"""What a key holder may see of its own account: balance and usage."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query

from grokgate.api.chat import authenticate
from grokgate.api.deps import Gateway, gateway
from grokgate.core.accounts import format_credits
from grokgate.core.admission import Principal
from grokgate.core.errors import GatewayError

router = APIRouter(tags=["account"])


def _own_token_id(principal: Principal) -> int:
    if principal.token_id is None:
        raise GatewayError(400, "bad_request", "The bootstrap admin token has no account; use /admin/keys.")
    return principal.token_id


@router.get("/v1/balance", summary="The calling token's balance")
@router.get("/grok/balance", include_in_schema=False)
async def balance(
    principal: Annotated[Principal, Depends(authenticate)],
    gw: Annotated[Gateway, Depends(gateway)],
) -> dict[str, Any]:
    assert gw.store is not None
    record = await gw.store.require_token(_own_token_id(principal))
    return {
        "object": "balance",
        "token": {"id": record.id, "name": record.name, "prefix": record.prefix},
        "balance": record.balance,
        "reserved": record.reserved,
        "balance_credits": format_credits(record.balance),
        "unit": "micro-credits",
    }


@router.get("/v1/usage", summary="The calling token's usage, by day or by model")
@router.get("/grok/usage", include_in_schema=False)
async def usage(
    principal: Annotated[Principal, Depends(authenticate)],
    gw: Annotated[Gateway, Depends(gateway)],
    since: Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}-\d{2}$", description="YYYY-MM-DD")] = None,
    by: Annotated[Literal["day", "model"], Query()] = "day",
) -> dict[str, Any]:
    assert gw.store is not None
    rows = await gw.store.usage(token_id=_own_token_id(principal), since=since, by=by)
    return {"object": "list", "by": by, "data": rows}
