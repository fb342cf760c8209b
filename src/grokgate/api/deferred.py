"""`GET /v1/chat/deferred-completion/{request_id}` (and under `/grok`): the result of a chat request sent with
`deferred: true` (api/chat.py answered it `{"request_id"}`), as xAI's REST API serves it: 200 with the chat
completion once done, 202 `{"request_id", "status": "pending"}` while it runs, 404 `not_found` for an id that is
unknown, another token's or expired. A request that failed answers its error, in the envelope, with the status it
would have had undeferred (502 for an upstream failure, 504 past the deferred timeout, 503 when the server shut
down before it finished). The state is serving/deferred.py's, shared with the gRPC GetDeferredCompletion.

Polling is not counted against the caller's rpm (xai-sdk polls every 100 ms); the request was, when it started.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from grokgate.api.deps import Gateway
from grokgate.serving.deferred import DONE, MAX_ID, PENDING, not_found

router = APIRouter()

PENDING_SCHEMA: dict[str, Any] = {"type": "object", "required": ["request_id", "status"], "properties": {
    "request_id": {"type": "string"}, "status": {"const": "pending"}}}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The chat completion", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ChatCompletion"}}}},
    202: {"description": "Still running: poll again", "content": {"application/json": {"schema": PENDING_SCHEMA}}},
}
RequestId = Annotated[str, Path(min_length=1, max_length=MAX_ID, description="The `request_id` the deferred "
                                                                            "request was answered")]


@router.get("/v1/chat/deferred-completion/{request_id}", tags=["deferred"], response_model=None, responses=RESPONSES,
            summary="The result of a deferred chat completion (xAI's REST API)")
@router.get("/grok/chat/deferred-completion/{request_id}", tags=["deferred"], response_model=None,
            responses=RESPONSES, summary="The result of a deferred chat completion (Grok API path)")
async def deferred_completion(request: Request, request_id: RequestId) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.admission.authenticate(request.headers.get("authorization"))
    if gw.deferred is None:
        raise not_found(request_id)
    result = await gw.deferred.get(principal, request_id)
    if result.status == DONE:
        return Response(orjson.dumps(result.body), media_type="application/json")
    if result.status == PENDING:
        return Response(orjson.dumps({"request_id": request_id, "status": "pending"}), status_code=202,
                        media_type="application/json")
    assert result.error is not None
    raise result.error
