"""The Responses API, under both prefixes like chat: `POST /v1/responses` (and `/grok/responses`), `GET` and
`DELETE /responses/{id}`, `GET /responses/{id}/input_items`. Parse, prepare (serving/responses.py: the stored
conversation, the translation to the chat request every backend serves), serve through the same lifecycle as
chat (serving/lifecycle.py), map the result to a response."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from grokgate.api.body import parse_responses_body
from grokgate.api.deps import Gateway, call_options, refusal
from grokgate.api.sse import SSE_HEADERS, SSEResponse, until_disconnected
from grokgate.core.errors import GatewayError
from grokgate.serving import Collected, Streamed
from grokgate.serving.responses import responses_param

router = APIRouter(tags=["responses"], strict_content_type=False)

PREFIXES = ("/v1", "/grok")
PATHS = tuple(f"{prefix}/responses" for prefix in PREFIXES)
RESPONSES_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ResponsesRequest"}}}}}


def _json(payload: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json", headers=headers)


# Parsed here rather than by FastAPI, like chat (api/chat.py); app.py serves these paths as plain Starlette routes
# first, and the FastAPI routes below stay for the OpenAPI document.
@router.post("/v1/responses", summary="Create a response (OpenAI path)", openapi_extra=RESPONSES_BODY)
@router.post("/grok/responses", summary="Create a response (Grok API)", openapi_extra=RESPONSES_BODY)
async def create_response(request: Request) -> Response:
    started = time.perf_counter()
    gw: Gateway = request.app.state.gateway
    principal = await gw.admission.authenticate(request.headers.get("authorization"))  # before the body
    try:
        body = await parse_responses_body(request, gw, principal)
        body.check_limits(max_messages=gw.settings.max_messages, max_tokens_limit=gw.settings.max_tokens_limit)
        options = call_options(request, principal, started)  # the headers are checked before the chain is read
        call, wire = await gw.responses.prepare(body, options)
        try:
            result = await gw.serving.serve(call, principal, wire, lambda: until_disconnected(request.receive))
        except GatewayError as error:  # checked as chat by the backend: name the field this request sent
            error.param = responses_param(error.param, body)
            raise
    except GatewayError as error:  # a refusal counts against the caller's limits, as in api/chat.py
        raise await refusal(gw, principal, request, error) from None
    if isinstance(result, Streamed):
        return SSEResponse(result, headers={**SSE_HEADERS, **result.headers})
    if isinstance(result, Collected):
        return _json(result.body, result.headers)
    return Response(status_code=499)  # the client closed the connection; nobody will read a response


@router.get("/v1/responses/{response_id}", summary="Retrieve a stored response")
@router.get("/grok/responses/{response_id}", summary="Retrieve a stored response (Grok API)")
async def retrieve_response(request: Request, response_id: str) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.admission.authenticate(request.headers.get("authorization"))
    return _json(await gw.responses.retrieve(principal, response_id))


@router.delete("/v1/responses/{response_id}", summary="Delete a stored response")
@router.delete("/grok/responses/{response_id}", summary="Delete a stored response (Grok API)")
async def delete_response(request: Request, response_id: str) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.admission.authenticate(request.headers.get("authorization"))
    return _json(await gw.responses.delete(principal, response_id))


@router.get("/v1/responses/{response_id}/input_items", summary="List a stored response's input items")
@router.get("/grok/responses/{response_id}/input_items", summary="List a stored response's input items (Grok API)")
async def list_input_items(
    request: Request,
    response_id: str,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: Annotated[str | None, Query(max_length=200)] = None,
    before: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.admission.authenticate(request.headers.get("authorization"))
    return _json(await gw.responses.input_items(principal, response_id, limit=limit, order=order, after=after,
                                                before=before))
