"""xAI's REST twins of its Models, Tokenize and Auth services, under `/v1` and `/grok` (the `/grok` paths are left
out of the OpenAPI document, as `/grok/models` is): `GET /v1/language-models`, `GET /v1/language-models/{model}`,
`POST /v1/tokenize-text`, `GET /v1/api-key`. What they answer is api/xai_info.py's, shared with the gRPC servicers
(rpc/info.py); here it is only rendered in xAI's REST shapes (docs.x.ai REST reference), errors in the envelope of
api/errors.py.

Differences from xAI, each documented in api/xai_info.py: prices are grokgate's, a language model also carries
`max_prompt_length` (as xAI's gRPC `LanguageModel` does), and a tokenize answer says in `x-grokgate-tokenizer`
whether its tokens are the model's own (`exact`) or an `estimate`.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from grokgate.api import xai_info
from grokgate.api.deps import Gateway, authenticate, gateway
from grokgate.api.errors import validation_error
from grokgate.core.admission import Principal
from grokgate.core.errors import GatewayError

router = APIRouter()


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenizeTextRequest(_Closed):
    text: str = Field(max_length=xai_info.MAX_TEXT_CHARS, description="The text to tokenize")
    model: str = Field(min_length=1, description="A public model name: its route's tokenizer is used")
    user: str | None = Field(default=None, description="The end user (accepted, as xAI does; not used)")


class TokenizeTextToken(_Closed):
    token_id: int = Field(description="The token's id in the model's vocabulary (0 for an estimate)")
    string_token: str = Field(description="The token as text (U+FFFD where its bytes are not whole UTF-8)")
    token_bytes: list[int] = Field(description="The token's bytes; all tokens' bytes in order are the text's UTF-8")


class TokenizeTextResponse(_Closed):
    token_ids: list[TokenizeTextToken]


class LanguageModelCard(_Closed):
    id: str
    fingerprint: str
    created: int = Field(description="Unix seconds")
    object: Literal["model"]
    owned_by: str
    version: str
    input_modalities: list[str]
    output_modalities: list[str]
    prompt_text_token_price: int = Field(description="USD cents per 100M tokens (= USD ticks per token)")
    cached_prompt_text_token_price: int = Field(description="USD cents per 100M tokens")
    prompt_image_token_price: int = Field(description="USD cents per 100M tokens")
    completion_text_token_price: int = Field(description="USD cents per 100M tokens")
    search_price: int = Field(description="USD ticks (1e-10 USD) per server-side tool call")
    aliases: list[str]
    max_prompt_length: int = Field(description="The context length, in tokens")


class LanguageModelList(_Closed):
    models: list[LanguageModelCard]


class ApiKey(_Closed):
    redacted_api_key: str
    user_id: str
    name: str
    create_time: str | None = Field(description="RFC 3339; null for a static key")
    modify_time: str | None
    modified_by: str
    team_id: str
    acls: list[str]
    api_key_id: str
    team_blocked: bool
    api_key_blocked: bool
    api_key_disabled: bool


# A text of MAX_TEXT_CHARS characters written as JSON escapes (12 bytes for a character beyond the BMP), and the rest.
MAX_BODY_BYTES = xai_info.MAX_TEXT_CHARS * 12 + 64 * 1024
TOKENIZE_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": TokenizeTextRequest.model_json_schema()}}}}
TOKENIZER_HEADER = {xai_info.TOKENIZER_HEADER: {
    "description": "`exact`: the model's own tokens; `estimate`: one per 3 bytes of UTF-8 (the route has no "
                   "tokenizer)", "schema": {"enum": ["exact", "estimate"]}}}


def _json(payload: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json", headers=headers)


def model_card(model: xai_info.LanguageModel) -> dict[str, Any]:
    return {"id": model.name, "fingerprint": model.fingerprint, "created": model.created, "object": "model",
            "owned_by": xai_info.OWNED_BY, "version": "", "input_modalities": list(model.input_modalities),
            "output_modalities": ["text"], "prompt_text_token_price": model.prompt_text_token_price,
            "cached_prompt_text_token_price": model.cached_prompt_text_token_price,
            "prompt_image_token_price": model.prompt_image_token_price,
            "completion_text_token_price": model.completion_text_token_price, "search_price": model.search_price,
            "aliases": [], "max_prompt_length": model.max_prompt_length}


@router.get("/v1/language-models", tags=["models"], summary="List the language models, with prices and context "
            "lengths (xAI's REST API)", response_model=None, responses={200: {"model": LanguageModelList}})
@router.get("/grok/language-models", tags=["models"], include_in_schema=False)
async def list_language_models(gw: Annotated[Gateway, Depends(gateway)],
                               principal: Annotated[Principal, Depends(authenticate)]) -> Response:
    return _json({"models": [model_card(m) for m in await xai_info.language_models(gw, principal)]})


@router.get("/v1/language-models/{model}", tags=["models"], summary="Describe one language model (xAI's REST API)",
            response_model=None, responses={200: {"model": LanguageModelCard}})
@router.get("/grok/language-models/{model}", tags=["models"], include_in_schema=False)
async def get_language_model(model: Annotated[str, Path(min_length=1)], gw: Annotated[Gateway, Depends(gateway)],
                             principal: Annotated[Principal, Depends(authenticate)]) -> Response:
    return _json(model_card(await xai_info.language_model(gw, principal, model)))


# The body is parsed here, after the request is counted against the caller's rpm, so an invalid one counts too.
@router.post("/v1/tokenize-text", tags=["tokenize"], summary="Tokenize a text with a model's tokenizer (xAI's REST "
             "API)", openapi_extra=TOKENIZE_BODY, response_model=None,
             responses={200: {"model": TokenizeTextResponse, "headers": TOKENIZER_HEADER}})
@router.post("/grok/tokenize-text", tags=["tokenize"], include_in_schema=False)
async def tokenize_text(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.admission.authenticate(request.headers.get("authorization"))
    await xai_info.count_request(gw, principal)
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:  # more than any text within the bound can take, even all \u-escaped
        raise GatewayError(413, "request_too_large", f"A tokenize request is at most {MAX_BODY_BYTES:,} bytes: its "
                           f"text at most {xai_info.MAX_TEXT_CHARS:,} characters.")
    try:
        body = TokenizeTextRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error([dict(e) for e in exc.errors(include_url=False, include_input=False)]) from None
    tokenized = await xai_info.tokenize_text(gw, principal, body.text, body.model)
    tokens = [{"token_id": t.id, "string_token": t.text, "token_bytes": list(t.piece)} for t in tokenized.tokens]
    return _json({"token_ids": tokens}, {xai_info.TOKENIZER_HEADER: tokenized.tokenizer})


def _rfc3339(ms: int | None) -> str | None:
    if ms is None:
        return None
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


@router.get("/v1/api-key", tags=["auth"], summary="The calling token's info: name, redacted key, models, flags "
            "(xAI's REST API)", response_model=None, responses={200: {"model": ApiKey}})
@router.get("/grok/api-key", tags=["auth"], include_in_schema=False)
async def get_api_key(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    info = await xai_info.api_key_info(gw, request.headers.get("authorization"))
    return _json({"redacted_api_key": info.redacted_api_key, "user_id": info.user_id, "name": info.name,
                  "create_time": _rfc3339(info.create_time), "modify_time": _rfc3339(info.modify_time),
                  "modified_by": info.modified_by, "team_id": info.team_id, "acls": list(info.acls),
                  "api_key_id": info.api_key_id, "team_blocked": info.team_blocked,
                  "api_key_blocked": info.api_key_blocked, "api_key_disabled": info.disabled})
