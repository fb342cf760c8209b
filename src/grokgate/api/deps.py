"""What the routes need, wired once by create_app() and reached through `request.app.state`, and the
dependencies every route family shares: who is calling, the admin check, the holder's own token."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header
from starlette.requests import Request

from grokgate.api.body import Parsing
from grokgate.api.errors import request_id_of
from grokgate.core.accounts import AdminStore
from grokgate.core.admission import OPEN, Admission, Gate, Principal
from grokgate.core.cassette import HEADER as CASSETTE_HEADER
from grokgate.core.cassette import cassette_name
from grokgate.core.draining import Drain
from grokgate.core.errors import GatewayError
from grokgate.core.response_cache import CACHE_HEADER, parse_option
from grokgate.core.tenancy import tenant_of
from grokgate.observability.metrics import Metrics
from grokgate.providers.base import ModelTable
from grokgate.schemas.chat import CONVERSATION_HEADER, conversation_header
from grokgate.serving import CallOptions, Serving
from grokgate.serving.deferred import Deferred
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
    # Deferred completions (serving/deferred.py): app.py always builds it; None only for a Gateway built bare.
    deferred: Deferred | None = None
    started_at: int = field(default_factory=lambda: int(time.time()))
    # Set when this process begins to stop (grokgate.drain): /readyz answers 503 "draining" from then on.
    drain: Drain = field(default_factory=Drain)
    # What admission does before and besides `admit` (refusals counted, large bodies gated), when it limits
    # callers at all; and the worker threads large bodies are parsed in (api/body.py).
    gate: Gate = field(init=False, default=OPEN)
    parsing: Parsing = field(init=False, default_factory=Parsing)

    def __post_init__(self) -> None:
        if isinstance(self.admission, Gate):
            self.gate = self.admission


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


OPTION_HEADERS = (CASSETTE_HEADER, CACHE_HEADER, CONVERSATION_HEADER)


def call_options(request: Request, principal: Principal, started: float) -> CallOptions:
    return options_of(request.headers.get, principal, started, request_id_of(request))


def options_of(header: Callable[[str], str | None], principal: Principal, started: float,
               request_id: str) -> CallOptions:
    """Whose the request is and what its headers (gRPC: its metadata) ask for, each checked (400 naming it): the
    cassette (`x-grokgate-cassette`), the response cache (`x-grokgate-cache`), the conversation id
    (`x-grok-conv-id`)."""
    return CallOptions(tenant=tenant_of(principal), request_id=request_id, started=started,
                       cassette=cassette_name(header(CASSETTE_HEADER)), cache=parse_option(header(CACHE_HEADER)),
                       conversation_id=conversation_header(header(CONVERSATION_HEADER)))


async def refusal(gw: Gateway, principal: Principal, request: Request, error: GatewayError) -> GatewayError:
    """What to answer for a request of `principal` refused with `error` after authentication: the refusal is
    counted against the caller's rpm (core/billing.py `AccountAdmission.refused`), so a caller that sends only
    refused requests is rate-limited like any other; 429 once it is past its rpm. Only errors reach this."""
    return await gw.gate.refused(principal, request_id_of(request), error)


def own_token_id(principal: Principal) -> int:
    """The calling holder's token id, for its own balance, usage and ledger. 403, not 400, for the bootstrap
    admin token: the request is well formed, this token just has no account (the OpenAPI document says so)."""
    if principal.token_id is None:
        raise GatewayError(403, "forbidden", NO_ACCOUNT)
    return principal.token_id
