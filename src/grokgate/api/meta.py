"""Model list and health probes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response

from grokgate.api.chat import authenticate
from grokgate.api.deps import Gateway, gateway
from grokgate.core.admission import Principal

router = APIRouter()


@router.get("/v1/models", tags=["models"], summary="List the public model names (OpenAI list shape)")
@router.get("/grok/models", tags=["models"], include_in_schema=False)
async def list_models(
    gw: Annotated[Gateway, Depends(gateway)],
    principal: Annotated[Principal, Depends(authenticate)],
) -> dict[str, Any]:
    created = gw.started_at
    data = [{"id": name, "object": "model", "created": created, "owned_by": "grokgate"} for name in gw.models.names()]
    return {"object": "list", "data": data}


@router.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
async def metrics(gw: Annotated[Gateway, Depends(gateway)]) -> Response:
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", tags=["health"], summary="Liveness: the process serves HTTP")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], summary="Readiness: every backend can take requests")
async def readyz(gw: Annotated[Gateway, Depends(gateway)]) -> JSONResponse:
    backends = {p.name: p.status() for p in gw.models.providers()}
    ready = all(p.ready() for p in gw.models.providers())
    body = {"status": "ready" if ready else "loading", "backends": backends}
    return JSONResponse(body, status_code=200 if ready else 503)
