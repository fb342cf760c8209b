"""`POST /grok/chat/completions` and `POST /v1/chat/completions`: one handler."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

import anyio
import orjson
from fastapi import APIRouter, Depends, Header, Request
from starlette.responses import Response

from grokgate.api.body import parse_body
from grokgate.api.deps import Gateway, gateway
from grokgate.api.errors import request_id_of
from grokgate.api.sse import SSE_HEADERS, Pump, SSEResponse, collect, sse_events
from grokgate.core.admission import AdmissionRequest, Principal, Ticket
from grokgate.core.completion import ChunkFactory, CompletionAccumulator, StreamAssembler
from grokgate.core.errors import GatewayError
from grokgate.core.events import Usage
from grokgate.core.pricing import prompt_token_bound
from grokgate.observability.metrics import Metrics
from grokgate.providers.router import prompt_shape
from grokgate.schemas.chat import ChatCompletionRequest

log = logging.getLogger("grokgate.request")
router = APIRouter(tags=["chat"], strict_content_type=False)


async def authenticate(
    gw: Annotated[Gateway, Depends(gateway)],
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    return await gw.admission.authenticate(authorization)


# The body is parsed here rather than by FastAPI: its dependency solving and dict-based validation were the
# largest item in the hot path's profile, and pydantic validates the raw JSON bytes directly. The OpenAPI
# document still describes the body (components added in app.py).
PATHS = ("/grok/chat/completions", "/v1/chat/completions")
CHAT_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}}


@router.post("/grok/chat/completions", summary="Create a chat completion (Grok API)", openapi_extra=CHAT_BODY)
@router.post("/v1/chat/completions", summary="Create a chat completion (OpenAI path)", openapi_extra=CHAT_BODY)
async def chat_completions(request: Request) -> Response:
    started = time.perf_counter()
    gw: Gateway = request.app.state.gateway
    principal = await gw.admission.authenticate(request.headers.get("authorization"))  # before the body
    body = await parse_body(request)
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
    # The prompt's upper bound, from the raw body (Starlette kept the bytes parse_body read; this call is free):
    # it covers tools, schemas and tool-call arguments as well as message text (core/pricing.py).
    copies = getattr(route.provider, "prompt_copies", None)
    prompt = prompt_token_bound(await request.body(), prompt_shape(body)) * (copies(body) if copies else 1)
    ticket = await gw.admission.admit(
        principal, AdmissionRequest(request_id, body.model, body.choices, body.output_limit, prompt)
    )
    hold_output(body, ticket.output_limit)
    run = _Run(request_id, principal, body, route.provider.name, ticket, started, gw.metrics)
    try:
        pump = Pump(route.provider.generate(body, route.upstream_model))
        run.pump = pump
        # Read the first event before committing to 200, so errors raised before any output (a prompt
        # longer than the context, a busy backend) still get their proper status.
        first = await pump.next(gw.settings.keepalive_seconds)
        gw.metrics.first_event.labels(body.model).observe(time.perf_counter() - started)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            if run.pump is not None:
                await run.pump.aclose()
            await run.finish(None, "error", exc)
        raise

    run.backend = getattr(pump.generation, "backend", None) or run.backend
    fingerprint = getattr(pump.generation, "fingerprint", None) or route.provider.fingerprint
    factory = ChunkFactory(body.model, fingerprint)
    if body.stream:
        assembler = StreamAssembler(factory, body.choices, body.include_usage)
        stream = sse_events(pump, assembler, first, gw.settings.keepalive_seconds, request_id, run.finish)
        return SSEResponse(stream, headers={**SSE_HEADERS, **ticket.headers, **run.overhead(pump)})

    accumulator = CompletionAccumulator(factory, body.choices)
    try:
        result = await collect(pump, accumulator, first, request.receive)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await run.finish(accumulator.usage, "error", exc)
        raise
    if result is None:  # the client closed the connection; nobody will read a response
        await run.finish(accumulator.usage, "client_disconnected", None)
        return Response(status_code=499)
    # Zero loss: the settlement is committed before the client receives the answer.
    await run.finish(accumulator.usage, "ok", None)
    return Response(orjson.dumps(result), media_type="application/json", headers={**ticket.headers,
                                                                                   **run.overhead(pump)})


def hold_output(body: ChatCompletionRequest, limit: int | None) -> None:
    """Ask the backend for no more output per choice than the admission paid for: a request without a cap gets
    the reserved one (xai.py sends it as max_completion_tokens, openai_compat forwards it, the local engine
    reads `output_limit`). When both caps are set, `max_completion_tokens` is the one reserved, and an upstream
    that reads only `max_tokens` must not be given a larger one."""
    if limit is None:
        return
    if body.max_completion_tokens is None and body.max_tokens is None:
        body.max_tokens = limit
    elif body.max_completion_tokens is not None and body.max_tokens is not None:
        body.max_tokens = body.max_completion_tokens


class _Run:
    """Settles one request exactly once, whatever way it ends, and logs it."""

    def __init__(self, request_id: str, principal: Principal, body: ChatCompletionRequest, backend: str,
                 ticket: Ticket, started: float, metrics: Metrics) -> None:
        self.request_id = request_id
        self.principal = principal
        self.body = body
        self.backend = backend
        self.ticket = ticket
        self.started = started
        self.pump: Pump | None = None
        self.finished = False
        self.overhead_ms: float | None = None
        self.metrics = metrics
        metrics.in_flight.inc()

    def overhead(self, pump: Pump) -> dict[str, str]:
        """Time spent in grokgate itself so far: everything but the wait on the backend."""
        if self.overhead_ms is None:  # measured once: at the response start, or at the end of a collected one
            own = max(time.perf_counter() - self.started - pump.waited, 0.0)
            self.overhead_ms = own * 1000
            self.metrics.overhead.observe(own)
        return {"x-grokgate-overhead-ms": f"{self.overhead_ms:.3f}"}

    async def finish(self, usage: Usage | None, status: str, failure: BaseException | None) -> None:
        if self.finished:
            return
        self.finished = True
        estimated = usage is not None and usage.estimated  # the router's estimate for a backend without usage
        if usage is None and self.pump is not None:
            # Cut short: bill what the backend had consumed so far, counted by grokgate.
            partial = getattr(self.pump.generation, "usage_so_far", None)
            if partial is not None:
                usage = partial()
                estimated = usage is not None
        try:
            with anyio.CancelScope(shield=True):
                await self.ticket.settle(usage, status=status, estimated=estimated, backend=self.backend)
            if getattr(self.ticket, "overrun", False):
                self.metrics.overruns.labels(self.body.model).inc()
        finally:
            if self.pump is not None and status == "ok":
                self.overhead(self.pump)
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - self.started
            http_status = 200 if status == "ok" else 499 if status == "client_disconnected" else 500
            if isinstance(failure, GatewayError):
                http_status = failure.status
            cost = getattr(self.ticket, "cost", 0)
            self.metrics.observe_request(model=self.body.model, backend=self.backend, status=http_status,
                                         stream=bool(self.body.stream), seconds=seconds, usage=usage, charged=cost)
            if log.isEnabledFor(logging.INFO):
                self._log(http_status, status, usage, estimated, cost, seconds)

    def _log(self, http_status: int, outcome: str, usage: Usage | None, estimated: bool, cost: int,
             seconds: float) -> None:
        """One structured line per request: ids, counts, money and timings; never the token or the text."""
        log.info("chat completion", extra={
            "request_id": self.request_id,
            "token": self.principal.prefix or self.principal.key_id,
            "model": self.body.model,
            "backend": self.backend,
            "stream": bool(self.body.stream),
            "n": self.body.choices,
            "status": http_status,
            "outcome": outcome,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "estimated": estimated,
            "cost": cost,
            "latency_ms": round(seconds * 1000, 2),
            "overhead_ms": round(self.overhead_ms, 3) if self.overhead_ms is not None else None,
        })

