"""`POST /grok/chat/completions` and `POST /v1/chat/completions`: parse, serve, map the result to a response.
Everything in between (model, admission, generation, streaming, settlement, metrics, log) is serving/lifecycle.py;
a body with `deferred: true` is admitted and answered `{"request_id"}` at once (serving/deferred.py)."""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from grokgate.api.body import parse_body
from grokgate.api.deps import Gateway, call_options, refusal
from grokgate.api.sse import CHAT_SSE, SSE_HEADERS, SSEResponse, until_disconnected
from grokgate.core.errors import GatewayError
from grokgate.serving import Collected, Streamed
from grokgate.serving.chat import ChatWire, chat_call

router = APIRouter(tags=["chat"], strict_content_type=False)
CHAT = ChatWire(CHAT_SSE)


# The body is parsed here rather than by FastAPI (its dependency solving was the largest item in the hot path's
# profile); the OpenAPI document still describes it. app.py serves these paths as plain Starlette routes first.
PATHS = ("/grok/chat/completions", "/v1/chat/completions")
CHAT_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}}


@router.post("/grok/chat/completions", summary="Create a chat completion (Grok API)", openapi_extra=CHAT_BODY)
@router.post("/v1/chat/completions", summary="Create a chat completion (OpenAI path)", openapi_extra=CHAT_BODY)
async def chat_completions(request: Request) -> Response:
    started = time.perf_counter()
    gw: Gateway = request.app.state.gateway
    principal = await gw.admission.authenticate(request.headers.get("authorization"))  # before the body
    try:
        body = await parse_body(request, gw, principal)
        body.check_limits(max_messages=gw.settings.max_messages, max_tokens_limit=gw.settings.max_tokens_limit)
        options = call_options(request, principal, started)
        call = chat_call(body, await request.body(), options)  # the body's bytes are kept
        if body.deferred and gw.deferred is not None:
            # Admitted now (a refusal is answered here, as undeferred), generated in the background: api/deferred.py
            # answers its result.
            deferred_id = await gw.deferred.start(call, principal, CHAT)
            return Response(orjson.dumps({"request_id": deferred_id}), media_type="application/json")
        result = await gw.serving.serve(call, principal, CHAT, lambda: until_disconnected(request.receive))
    except GatewayError as error:  # a refusal counts against the caller's limits like a request served
        raise await refusal(gw, principal, request, error) from None
    if isinstance(result, Streamed):
        return SSEResponse(result, headers={**SSE_HEADERS, **result.headers})
    if isinstance(result, Collected):
        return Response(orjson.dumps(result.body), media_type="application/json", headers=result.headers)
    return Response(status_code=499)  # the client closed the connection; nobody will read a response
