"""The chat body: read, checked for its media type, parsed and validated straight from the raw JSON bytes."""

from __future__ import annotations

from pydantic import ValidationError
from starlette.requests import Request

from grokgate.api.errors import validation_error
from grokgate.core.errors import GatewayError
from grokgate.schemas.chat import ChatCompletionRequest


async def parse_body(request: Request) -> ChatCompletionRequest:
    content_type = request.headers.get("content-type", "")
    raw = await request.body()
    media = content_type.split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise GatewayError(400, "bad_request", "Send the body as JSON with 'Content-Type: application/json'.")
    if not raw.strip():
        raise GatewayError(400, "bad_request", "A JSON request body is required.")
    try:
        return ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error([dict(e) for e in exc.errors(include_url=False)]) from None
