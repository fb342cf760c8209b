"""What the routes need, wired once by create_app() and reached through `request.app.state`, and the
dependencies every route family shares: who is calling, the admin check, the holder's own token."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header
from starlette.requests import Request

from grokgate.core.accounts import AdminStore
from grokgate.core.admission import Admission, Principal
from grokgate.core.errors import GatewayError
from grokgate.observability.metrics import Metrics
from grokgate.providers.base import ModelTable
from grokgate.serving import Serving
from grokgate.serving.responses import ResponsesService
from grokgate.settings import Settings

NO_ACCOUNT = "The bootstrap admin token has no account (no balance, usage or ledger of its own); use /admin/*."


@dataclass
class Gateway:
    settings: Settings
    admission: Admission
    models: ModelTable
    serving: Serving
    responses: ResponsesService
    store: AdminStore | None = None
    metrics: Metrics = field(default_factory=Metrics)
    started_at: int = field(default_factory=lambda: int(time.time()))


async def gateway(request: Request) -> Gateway:
    # async on purpose: FastAPI runs a plain `def` dependency in a thread pool, a thread hop per request.
    gw: Gateway = request.app.state.gateway
    return gw


async def authenticate(gw: Annotated[Gateway, Depends(gateway)],
                       authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> Principal:
    return await gw.admission.authenticate(authorization)


async def require_admin(
    principal: Annotated[Principal, Depends(authenticate)],
    gw: Annotated[Gateway, Depends(gateway)],
) -> AdminStore:
    if not principal.admin:
        raise GatewayError(403, "forbidden", "This API needs the admin token.")
    assert gw.store is not None  # the admin routes are mounted only with accounts on
    return gw.store


def own_token_id(principal: Principal) -> int:
    """The calling holder's token id, for its own balance, usage and ledger. 403, not 400, for the bootstrap
    admin token: the request is well formed, this token just has no account (the OpenAPI document says so)."""
    if principal.token_id is None:
        raise GatewayError(403, "forbidden", NO_ACCOUNT)
    return principal.token_id
