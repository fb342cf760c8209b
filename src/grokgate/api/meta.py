"""Model list, health probes and the Prometheus scrape (with its access rule)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse, Response

from grokgate.api.deps import Gateway, authenticate, gateway
from grokgate.core.admission import Principal
from grokgate.core.errors import GatewayError
from grokgate.settings import Settings

router = APIRouter()

# Headers a relaying proxy adds. A request that carries one came through a proxy, so its peer address (the
# proxy's) says nothing about the client: it is never a loopback scrape, whatever address the header names.
RELAY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


# -- response bodies, for the OpenAPI document (the routes return plain dicts: nothing is validated at runtime) --


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelCard(_Closed):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Closed):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Closed):
    status: Literal["ok"]


class Readiness(_Closed):
    status: Literal["ready", "loading", "draining"]
    backends: dict[str, dict[str, Any]]


METRICS_CONTENT = {"text/plain": {"schema": {"type": "string"},
                                  "example": "# HELP grokgate_requests_total Chat completion requests by outcome\n"}}


@router.get("/v1/models", tags=["models"], summary="List the public model names (OpenAI list shape)",
            response_model=None, responses={200: {"model": ModelList}})
@router.get("/grok/models", tags=["models"], include_in_schema=False)
async def list_models(
    gw: Annotated[Gateway, Depends(gateway)],
    principal: Annotated[Principal, Depends(authenticate)],
) -> dict[str, Any]:
    created = gw.started_at
    data = [{"id": name, "object": "model", "created": created, "owned_by": "grokgate"} for name in gw.models.names()]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model}", tags=["models"], summary="Describe one public model (OpenAI model object)",
            response_model=None, responses={200: {"model": ModelCard}})
@router.get("/grok/models/{model}", tags=["models"], include_in_schema=False)
async def retrieve_model(
    model: str,
    gw: Annotated[Gateway, Depends(gateway)],
    principal: Annotated[Principal, Depends(authenticate)],
) -> dict[str, Any]:
    """What the openai SDK's `client.models.retrieve(name)` reads; an unknown name is 404 `model_not_found`."""
    if gw.models.get(model) is None:
        available = ", ".join(gw.models.names())
        raise GatewayError(404, "model_not_found", f"The model '{model}' does not exist. Available models: "
                           f"{available}.", param="model")
    return {"id": model, "object": "model", "created": gw.started_at, "owned_by": "grokgate"}


@router.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response,
            responses={200: {"description": "The Prometheus text format", "content": METRICS_CONTENT}})
async def metrics(request: Request, gw: Annotated[Gateway, Depends(gateway)]) -> Response:
    """Who may scrape is `GROKGATE_METRICS_ACCESS`: `loopback` (the default: clients on this host only),
    `open`, `token` (`Authorization: Bearer` GROKGATE_METRICS_TOKEN) or `off`."""
    check_metrics_access(gw.settings, request)
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", tags=["health"], summary="Liveness: the process serves HTTP", response_model=None,
            responses={200: {"model": Health}})
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], summary="Readiness: every backend can take requests", response_model=None,
            responses={200: {"model": Readiness, "description": "Every backend is ready"},
                       503: {"model": Readiness, "description": "A backend is still loading or unavailable, "
                                                                 "or the process is stopping (draining)"}})
async def readyz(gw: Annotated[Gateway, Depends(gateway)]) -> JSONResponse:
    backends = {p.name: p.status() for p in gw.models.providers()}
    ready = all(p.ready() for p in gw.models.providers())
    # Draining (grokgate.drain): still serving, but a load balancer should send nothing new here.
    status = "draining" if gw.drain.draining else "ready" if ready else "loading"
    return JSONResponse({"status": status, "backends": backends}, status_code=200 if status == "ready" else 503)


# -- who may scrape ------------------------------------------------------------------------------------------


def metrics_token_missing(settings: Settings) -> bool:
    return settings.metrics_access == "token" and not (settings.metrics_token or "").strip()


def is_loopback(client: Any) -> bool:
    """Whether an ASGI scope's `client` is on this host: 127.0.0.0/8, ::1 or their IPv4-mapped form. Only
    the address the server's socket reports counts; no client (a server that cannot tell) is not local."""
    if not client or not isinstance(client[0], str):
        return False
    try:
        address = ipaddress.ip_address(client[0].split("%", 1)[0])  # an IPv6 zone id is not part of it
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def check_metrics_access(settings: Settings, request: Request) -> None:
    mode = settings.metrics_access
    if mode == "open":
        return
    if mode == "off":
        # The same answer as a path that does not exist: nothing tells a prober the scrape is merely closed.
        raise GatewayError(404, "no_api", f"The API {request.url.path} is not registered.")
    if mode == "loopback":
        if not is_loopback(request.scope.get("client")) or any(h in request.headers for h in RELAY_HEADERS):
            raise GatewayError(403, "forbidden", "The metrics are served to clients on this host only "
                                                 "(GROKGATE_METRICS_ACCESS=loopback).")
        return
    if metrics_token_missing(settings):  # create_app refuses to start like this; kept shut if built anyway
        raise GatewayError(403, "forbidden", "GROKGATE_METRICS_ACCESS=token needs GROKGATE_METRICS_TOKEN.")
    challenge = {"www-authenticate": 'Bearer realm="metrics"'}
    header = request.headers.get("authorization", "").strip()
    if not header:
        raise GatewayError(401, "no_token", "Send 'Authorization: Bearer <metrics token>'.", headers=challenge)
    scheme, _, presented = header.partition(" ")
    # Digests of equal length, compared in constant time: the time taken says nothing about the token.
    expected = _digest((settings.metrics_token or "").strip())
    if not hmac.compare_digest(_digest(presented.strip()), expected) or scheme.lower() != "bearer":
        raise GatewayError(401, "invalid_token", "The metrics token is invalid.", headers=challenge)
