"""/openapi.json made true to what the server answers: FastAPI's document, plus the error envelope (400, not
422), the statuses each operation can answer, the chat body (the chat routes parse it by hand, for speed) with
its JSON and SSE answers, bearer authentication, and CSV where `format=csv` applies. Built once."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from grokgate.core.completion import FINISH_REASONS
from grokgate.settings import Settings


class LimitDetail(BaseModel):
    """Which limit refused a request (core/billing.py): beside AceData's code and message, never instead of them."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="balance | key_limit (403); rpm | tpm | concurrency (429); store_unavailable")
    scope: str = Field(description="account (its balance, or a limit of all its keys together) | key")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str
    message: str
    type: str
    param: str | None
    limit: LimitDetail | None = Field(default=None, description="Only on a refusal for a limit: which, and how "
                                                                "much (required, available, affordable_tokens...)")


class ErrorEnvelope(BaseModel):
    """Every error answer (api/errors.py); `trace_id` equals the response's `x-request-id`."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail
    trace_id: str


ERRORS = {
    "400": "Bad request: an invalid parameter or body (`bad_request`), or no `Authorization` header (`no_token`)",
    "401": "The token is invalid or has expired (`invalid_token`, `token_expired`)",
    "403": "Not allowed: a disabled token or account (`disabled`), not the admin token or the bootstrap admin token "
           "on a holder's own routes (`forbidden`), a model the token may not use (`model_not_allowed`), not "
           "enough credits (`used_up`), the key's spending limit reached (`key_limit_exceeded`); a refusal for a "
           "limit says which in `error.limit` and the `x-grokgate-limit` header",
    "404": "Not found: the token named (`token_not_found`), the account (`account_not_found`), the model "
           "(`model_not_found`), a stored response of this account (`not_found`)",
    "409": "The reference names more than one token or account (`ambiguous_reference`): use its id or prefix",
    "413": "The request body is larger than GROKGATE_MAX_BODY_BYTES (`request_too_large`)",
    "429": "Rate limited, by this key's limits, its account's (all its keys together) or by every upstream "
           "(`too_many_requests`); see `retry-after`, and `error.limit` for which limit",
    "500": "Internal error (`api_error`)",
    "502": "The upstream failed or sent something unreadable (`api_error`)",
    "503": "Unavailable: every upstream is cooling down, the rate limiter's store is unreachable, or the model "
           "is loading",
    "504": "The upstream did not answer in time (`timeout`)",
}
_AUTH = ("400", "401", "403", "500")
# What each tag's operations can answer besides their success. Also: 404 and 409 where a token is named (a
# `ref` path or `token` query parameter), 413 where there is a body.
_ERRORS_BY_TAG = {
    "chat": ("400", "401", "403", "404", "413", "429", "500", "502", "503", "504"),
    "responses": ("400", "401", "403", "404", "413", "429", "500", "502", "503", "504"),
    # GET .../chat/deferred-completion/{id} (api/deferred.py): a failed deferred request answers its own error.
    "deferred": ("400", "401", "403", "404", "429", "500", "502", "503", "504"),
    "models": _AUTH,
    # xAI's POST /v1/tokenize-text (api/xai_routes.py): forwarded to xAI for its routes, counted against the rpm.
    "tokenize": ("400", "401", "403", "404", "413", "429", "500", "502", "503", "504"),
    # xAI's GET /v1/api-key (api/xai_routes.py); 404: the calling token was deleted a moment ago, as for "account".
    "auth": (*_AUTH, "404"),
    "admin": _AUTH,
    "account": (*_AUTH, "404"),  # 404: the calling token was deleted a moment ago (authentication is cached 2 s)
    "health": ("500",),
}
_SECURED_TAGS = {"chat", "responses", "models", "admin", "account", "tokenize", "auth", "deferred"}
_TOKENS = {"type": "integer", "minimum": 0}
_USAGE: dict[str, Any] = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": _TOKENS, "completion_tokens": _TOKENS, "total_tokens": _TOKENS,
        "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": _TOKENS}},
        "completion_tokens_details": {"type": "object", "properties": {"reasoning_tokens": _TOKENS}},
    },
}
_TOOL_CALLS: dict[str, Any] = {"type": "array", "items": {"type": "object", "properties": {
    "index": {"type": "integer"}, "id": {"type": "string"}, "type": {"type": "string"},
    "function": {"type": "object", "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}}}}
_LOGPROBS: dict[str, Any] = {"type": ["object", "null"]}
_FINISH: dict[str, Any] = {"enum": sorted(FINISH_REASONS)}
CHAT_CHUNK: dict[str, Any] = {
    "title": "ChatCompletionChunk",
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion.chunk"},
        "created": {"type": "integer", "description": "Unix seconds; the same on every chunk"},
        "model": {"type": "string"},
        "system_fingerprint": {"type": ["string", "null"]},
        "choices": {"type": "array", "items": {
            "type": "object",
            "required": ["index", "delta", "finish_reason"],
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                "delta": {"type": "object", "properties": {
                    "role": {"const": "assistant"}, "content": {"type": "string"},
                    "reasoning_content": {"type": "string"}, "tool_calls": _TOOL_CALLS}},
                "logprobs": _LOGPROBS,
                "finish_reason": {"anyOf": [_FINISH, {"type": "null"}]},
            },
        }},
        "usage": {"anyOf": [_USAGE, {"type": "null"}],
                  "description": "null except on the last chunk (`choices: []`), sent with "
                                 "`stream_options.include_usage`"},
    },
    "additionalProperties": True,  # keys an upstream adds (xAI's `citations`) are passed through
}
# What a chat request with `deferred: true` answers (api/chat.py): its id for GET .../deferred-completion/{id}.
DEFERRED_STARTED: dict[str, Any] = {"type": "object", "required": ["request_id"], "additionalProperties": False,
                                    "properties": {"request_id": {"type": "string"}}}
# Schemathesis and OpenAPI 3.1 read an event stream's `schema` as the schema of each event.
CHAT_EVENT: dict[str, Any] = {
    "title": "ChatCompletionEvent",
    "description": "One server-sent event: a `chat.completion.chunk`, `[DONE]` last, or, when the stream fails "
                   "after its first event, the error envelope (and no `[DONE]`). `: keep-alive` comments go out "
                   "during silences.",
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"const": "message"},
        "data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"anyOf": [{"$ref": "#/components/schemas/ChatCompletionChunk"},
                                         {"$ref": "#/components/schemas/ErrorEnvelope"}]}},
        ]},
    },
}
CHAT_COMPLETION: dict[str, Any] = {
    "title": "ChatCompletion",
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer", "description": "Unix seconds"},
        "model": {"type": "string"},
        "system_fingerprint": {"type": ["string", "null"]},
        "choices": {"type": "array", "items": {
            "type": "object",
            "required": ["index", "message", "finish_reason"],
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                "message": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {
                        "role": {"const": "assistant"},
                        "content": {"type": ["string", "null"]},
                        "reasoning_content": {"type": "string"},
                        "tool_calls": _TOOL_CALLS,
                    },
                },
                "logprobs": _LOGPROBS,
                "finish_reason": _FINISH,
            },
        }},
        "usage": _USAGE,
    },
    # Top-level keys an upstream adds (xAI's `citations`) are passed through.
    "additionalProperties": True,
}


# The Responses API's answers (serving/responses.py builds them as the openai SDK's types describe them).
RESPONSE_OBJECT: dict[str, Any] = {
    "title": "Response",
    "type": "object",
    "required": ["id", "object", "created_at", "status", "model", "output"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "response"},
        "created_at": {"type": "number", "description": "Unix seconds"},
        "status": {"enum": ["completed", "incomplete", "failed", "in_progress"]},
        "model": {"type": "string"},
        "output": {"type": "array", "items": {"type": "object", "required": ["type"]}},
        "usage": {"type": ["object", "null"]},
    },
    "additionalProperties": True,
}
RESPONSES_EVENT: dict[str, Any] = {
    "title": "ResponseStreamEvent",
    "description": "One server-sent event: `event: <type>` and a JSON `data` with that `type` and a strictly "
                   "increasing `sequence_number`, from `response.created` to `response.completed`, "
                   "`response.incomplete` or `response.failed` (after an `error` event). `: keep-alive` comments "
                   "go out during silences.",
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"type": "object", "required": ["type", "sequence_number"]}},
    },
}
RESPONSE_DELETED: dict[str, Any] = {
    "title": "ResponseDeleted",
    "type": "object",
    "required": ["id", "object", "deleted"],
    "properties": {"id": {"type": "string"}, "object": {"const": "response.deleted"}, "deleted": {"const": True}},
}
INPUT_ITEMS: dict[str, Any] = {
    "title": "ResponseInputItemList",
    "type": "object",
    "required": ["object", "data", "has_more"],
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": {"type": "object"}},
        "first_id": {"type": ["string", "null"]},
        "last_id": {"type": ["string", "null"]},
        "has_more": {"type": "boolean"},
    },
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_response(status: str) -> dict[str, Any]:
    return {"description": ERRORS[status], "content": {"application/json": {"schema": _ref("ErrorEnvelope")}}}


def _without_null(schema: dict[str, Any]) -> None:
    """A query or path parameter is a string or absent, never JSON null: FastAPI's `X | None` says it may be."""
    members = schema.get("anyOf")
    if isinstance(members, list):
        rest = [m for m in members if m != {"type": "null"}]
        if len(rest) == 1 < len(members):
            del schema["anyOf"]
            schema.update({**rest[0], **schema})


def _describe_operation(path: str, op: dict[str, Any], settings: Settings) -> None:
    for parameter in op.get("parameters", ()):
        _without_null(parameter.setdefault("schema", {}))
    responses: dict[str, Any] = op.setdefault("responses", {})
    responses.pop("422", None)  # FastAPI's; grokgate answers 400 in the envelope
    tags = set(op.get("tags", ()))
    statuses = {s for tag in tags for s in _ERRORS_BY_TAG.get(tag, ("500",))}
    parameters = {p["name"] for p in op.get("parameters", ())}
    if parameters:
        statuses.add("400")
    if parameters & {"ref", "token", "account"} or (path == "/admin/keys" and "requestBody" in op):  # its `account`
        statuses |= {"404", "409"}
    if "model" in parameters:  # /v1/models/{model}: model_not_found
        statuses.add("404")
    if "requestBody" in op:
        statuses |= {"400", "413"}
    if path == "/metrics":
        statuses |= {"loopback": {"403"}, "token": {"401"}}.get(settings.metrics_access, set())
        if settings.metrics_access == "token":
            op["security"] = [{"metricsBearer": []}]
    if path == "/readyz":
        statuses.discard("503")  # described by its own body (meta.Readiness)
    for status in sorted(statuses):
        responses.setdefault(status, _error_response(status))
    if tags & _SECURED_TAGS:
        op["security"] = [{"bearer": []}]
    formats = next((p["schema"].get("enum", ()) for p in op.get("parameters", ()) if p["name"] == "format"), ())
    if "csv" in formats:  # `format=csv` answers the same rows as CSV
        responses.setdefault("200", {}).setdefault("content", {}).setdefault(
            "text/csv", {"schema": {"type": "string"}})
    if "chat" in tags:
        responses["200"] = {"description": "The completion; with `stream: true`, server-sent events; with "
                            "`deferred: true`, the `request_id` to poll", "content": {
            "application/json": {"schema": {"anyOf": [_ref("ChatCompletion"), DEFERRED_STARTED]}},
            "text/event-stream": {"schema": _ref("ChatCompletionEvent")},
        }}
    if "responses" in tags:
        if "requestBody" in op:
            answer = {"description": "The response; with `stream: true`, server-sent events", "content": {
                "application/json": {"schema": _ref("Response")},
                "text/event-stream": {"schema": _ref("ResponseStreamEvent")},
            }}
        else:
            name = ("ResponseInputItemList" if path.endswith("/input_items")
                    else "ResponseDeleted" if op.get("operationId", "").startswith("delete") else "Response")
            answer = {"description": "OK", "content": {"application/json": {"schema": _ref(name)}}}
        responses["200"] = answer


def describe_api(app: FastAPI, settings: Settings) -> None:
    """Build the document once: FastAPI's, made true to what the server answers (errors in the envelope with
    400, not 422; the statuses each operation can answer; the chat body, which the chat routes parse by hand
    for speed, and its JSON and SSE answers; bearer authentication)."""
    from fastapi.openapi.utils import get_openapi

    from grokgate.schemas.chat import ChatCompletionRequest
    from grokgate.schemas.responses import ResponsesRequest

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            body = ChatCompletionRequest.openapi_schema(settings.max_messages, settings.max_tokens_limit)
            schemas.update(body.pop("$defs", {}))
            schemas["ChatCompletionRequest"] = body
            schemas["ChatCompletion"] = CHAT_COMPLETION
            schemas["ChatCompletionChunk"] = CHAT_CHUNK
            schemas["ChatCompletionEvent"] = CHAT_EVENT
            body = ResponsesRequest.openapi_schema(settings.max_messages, settings.max_tokens_limit)
            schemas.update(body.pop("$defs", {}))
            schemas["ResponsesRequest"] = body
            for extra in (RESPONSE_OBJECT, RESPONSES_EVENT, RESPONSE_DELETED, INPUT_ITEMS):
                schemas[extra["title"]] = extra
            envelope = ErrorEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(envelope.pop("$defs", {}))
            schemas["ErrorEnvelope"] = envelope
            components["securitySchemes"] = {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "A token from GROKGATE_API_KEYS (admin) or one the admin API created"}}
            if settings.metrics_access == "off":
                schema["paths"].pop("/metrics", None)
            elif settings.metrics_access == "token":
                components["securitySchemes"]["metricsBearer"] = {
                    "type": "http", "scheme": "bearer", "description": "GROKGATE_METRICS_TOKEN"}
            for path, item in schema["paths"].items():
                for op in item.values():
                    _describe_operation(path, op, settings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
