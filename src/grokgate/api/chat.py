"""`POST /grok/chat/completions` and `POST /v1/chat/completions`: one handler."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Request
from starlette.responses import Response

from grokgate.api.deps import Gateway, gateway
from grokgate.api.errors import request_id_of
from grokgate.api.sse import SSE_HEADERS, Pump, SSEResponse, collect, sse_events
from grokgate.core.admission import AdmissionRequest, Principal
from grokgate.core.completion import ChunkFactory, CompletionAccumulator, StreamAssembler
from grokgate.core.errors import GatewayError
from grokgate.core.events import Usage
from grokgate.schemas.chat import ChatCompletionRequest

log = logging.getLogger("grokgate.request")
router = APIRouter(tags=["chat"], strict_content_type=False)


def authenticate(
    gw: Annotated[Gateway, Depends(gateway)],
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    return gw.admission.authenticate(authorization)


@router.post("/grok/chat/completions", summary="Create a chat completion (Grok API)")
@router.post("/v1/chat/completions", summary="Create a chat completion (OpenAI path)")
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    principal: Annotated[Principal, Depends(authenticate)],
    gw: Annotated[Gateway, Depends(gateway)],
) -> Response:
    started = time.perf_counter()
    request_id = request_id_of(request)
    body.check_limits(max_messages=gw.settings.max_messages, max_tokens_limit=gw.settings.max_tokens_limit)
    route = gw.models.get(body.model)
    if route is None:
        available = ", ".join(gw.models.names())
        raise GatewayError(
            404, "model_not_found", f"The model '{body.model}' does not exist. Available models: {available}.",
            param="model",
        )
    route.provider.check(body)
    ticket = await gw.admission.admit(
        principal, AdmissionRequest(request_id, body.model, body.choices, body.output_limit)
    )
    pump = Pump(route.provider.generate(body, route.upstream_model))
    factory = ChunkFactory(body.model, route.provider.fingerprint)
    outcome: dict[str, Any] = {"status": 200}

    async def settle(usage: Usage | None, delivered: bool, failure: BaseException | None) -> None:
        await ticket.settle(usage, delivered=delivered)
        _log_request(request_id, principal, body, route.provider.name, outcome, usage, failure, started)

    try:
        # Read the first event before committing to 200, so errors raised before any output (a prompt
        # longer than the context, a busy backend) still get their proper status.
        first = await pump.next(gw.settings.keepalive_seconds)
    except GatewayError as exc:
        outcome["status"] = exc.status
        await pump.aclose()
        await settle(None, False, exc)
        raise

    if body.stream:
        assembler = StreamAssembler(factory, body.choices, body.include_usage)
        stream = sse_events(pump, assembler, first, gw.settings.keepalive_seconds, request_id, settle)
        return SSEResponse(stream, headers=SSE_HEADERS)

    accumulator = CompletionAccumulator(factory, body.choices)
    try:
        result = await collect(pump, accumulator, first, request.receive)
    except GatewayError as exc:
        outcome["status"] = exc.status
        await settle(accumulator.usage, False, exc)
        raise
    if result is None:
        outcome["status"] = 499  # the client closed the connection; nobody will read this
        await settle(accumulator.usage, False, None)
        return Response(status_code=499)
    await settle(accumulator.usage, True, None)
    return Response(orjson.dumps(result), media_type="application/json")


def _log_request(request_id: str, principal: Principal, body: ChatCompletionRequest, backend: str,
                 outcome: dict[str, Any], usage: Any, failure: BaseException | None, started: float) -> None:
    status = outcome["status"]
    if isinstance(failure, GatewayError):
        status = failure.status
    elif failure is not None:
        status = 500
    log.info(
        "chat completion",
        extra={
            "request_id": request_id,
            "key": principal.key_id,
            "model": body.model,
            "backend": backend,
            "stream": bool(body.stream),
            "n": body.choices,
            "status": status,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "latency_ms": round((time.perf_counter() - started) * 1000, 1),
        },
    )

