"""create_app(): the one place that wires concrete classes together."""

from __future__ import annotations

import base64
import hashlib
import inspect
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match, Mount
from starlette.routing import Route as StarletteRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from grokgate import __version__
from grokgate import config as routing
from grokgate.api import account, admin, chat, console, errors, meta
from grokgate.api.deps import Gateway
from grokgate.api.meta import metrics_token_missing
from grokgate.api.middleware import BodyLimitMiddleware, RequestIdMiddleware
from grokgate.core.admission import Admission, StaticKeyAdmission
from grokgate.core.billing import AccountAdmission, BillingPolicy
from grokgate.core.completion import FINISH_REASONS
from grokgate.core.limits import RateLimiter
from grokgate.core.pricing import default_prices
from grokgate.observability.metrics import backend_state
from grokgate.providers import base
from grokgate.providers.base import ModelTable, Provider, Route
from grokgate.providers.model_files import CATALOG
from grokgate.runtime import tune_gc
from grokgate.settings import Settings
from grokgate.store.limits_memory import MemoryRateLimiter
from grokgate.store.limits_redis import RedisRateLimiter
from grokgate.store.sql import SqlStore, default_url

DESCRIPTION = """The Grok Chat Completions API as AceData Cloud serves it: `POST /grok/chat/completions` with a
bearer token, OpenAI chat-completion bodies and SSE streaming. Errors use the envelope
`{"error": {"code", "message", "type", "param"}, "trace_id"}`; every response carries `x-request-id`."""


def build_routing(settings: Settings) -> ModelTable:
    """The routing file if there is one; else xAI when a key is set; else the local engine for every name."""
    import grokgate.providers.local
    import grokgate.providers.openai_compat
    import grokgate.providers.xai  # noqa: F401  (each registers its kind)

    def local() -> Provider:
        engine: Provider = base.create(
            "local",
            model_path=settings.model_path,
            catalog_model=CATALOG[settings.local_model],
            cache_dir=settings.cache_dir,
            threads=settings.threads,
            slots=settings.slots,
            ctx_per_slot=settings.ctx_per_slot,
        )
        return engine

    config = routing.load(settings.config, settings.environment()) if settings.config else None
    config = config or routing.default_config(settings)
    if config is not None:
        return routing.build(config, settings, local)
    engine = local()
    return ModelTable([Route(name, engine, name) for name in settings.models])


def create_app(
    settings: Settings | None = None,
    *,
    admission: Admission | None = None,
    models: ModelTable | None = None,
) -> FastAPI:
    settings = settings or Settings()
    _check_settings(settings)
    if models is None:
        models = build_routing(settings)
    store = None
    if admission is None and settings.accounts:
        admission, store = build_accounts(settings)
    gw = Gateway(
        settings=settings,
        admission=admission or StaticKeyAdmission(settings.api_keys),
        models=models,
        store=store,
    )
    gw.metrics.add_state("backends", backend_state(models.providers(), getattr(gw.admission, "limiter", None)))
    if store is not None:
        store.on_commit = gw.metrics.observe_commit

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if store is not None:
            await store.open(serve=True)
            await store.seed_prices(default_prices(models.names(), settings.credits_per_usd))
            # Whatever an earlier run of this instance held when it died is released before new traffic.
            await store.reclaim(owner=store.owner, older_than_ms=settings.reservation_lease_seconds * 1000)
        for provider in gw.models.providers():
            await provider.start()
        untune = tune_gc() if settings.tune_gc else None
        try:
            yield
        finally:
            if untune is not None:
                untune()
            for provider in gw.models.providers():
                await provider.close()
            if store is not None:
                await store.close()
            limiter = getattr(gw.admission, "limiter", None)
            if limiter is not None:
                await limiter.close()

    app = FastAPI(
        title="grokgate",
        version=__version__,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served by _mount_docs, under the docs' security headers
        # No redirect to the path with(out) a trailing slash: Starlette builds its Location from the Host
        # header, which any client sets. Such a path answers 404 in the envelope.
        redirect_slashes=False,
        lifespan=lifespan,
        # FastAPI's built-in OpenTelemetry hooks probe the environment on every request (5% of the hot path in
        # a profile); grokgate's metrics are its own.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.gateway = gw
    errors.install(app)
    _allow_on_405(app)
    app.include_router(chat.router)
    app.include_router(meta.router)
    if store is not None:
        app.include_router(account.router)
        app.include_router(admin.router)
        app.include_router(console.router)  # the web console at /console and its endpoints
    _mount_docs(app)
    _describe_api(app, settings)
    # The chat routes are also served by plain Starlette routes placed first: the same endpoint, minus
    # FastAPI's per-request machinery (route wrappers, exit stacks, empty dependency solving). The FastAPI
    # routes stay registered behind them, for the OpenAPI document.
    app.router.routes[0:0] = [StarletteRoute(p, chat.chat_completions, methods=["POST"]) for p in chat.PATHS]
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)  # outermost: even a 413 carries x-request-id
    return app


def build_accounts(settings: Settings) -> tuple[AccountAdmission, SqlStore]:
    store = SqlStore(settings.database_url or default_url(settings.data_dir), owner=settings.instance(),
                     writer_process=settings.sqlite_writer == "process",
                     heartbeat_seconds=settings.instance_heartbeat_seconds,
                     dead_after_seconds=settings.instance_dead_after_seconds)
    limiter: RateLimiter
    if settings.redis_url:
        limiter = RedisRateLimiter(settings.redis_url, on_store_error=settings.rate_limit_store_error,
                                   max_connections=settings.redis_max_connections,
                                   pool_timeout=settings.redis_pool_timeout_seconds)
    else:
        limiter = MemoryRateLimiter()
    policy = BillingPolicy(default_output_reservation=settings.default_output_reservation)
    return AccountAdmission(store, limiter, settings.api_keys, policy), store


def _check_settings(settings: Settings) -> None:
    """Settings that are valid one by one but not together; raised as the settings errors the CLI prints."""
    if metrics_token_missing(settings):
        raise ValidationError.from_exception_data("Settings", [{
            "type": PydanticCustomError("metrics_token_missing",
                                        "GROKGATE_METRICS_ACCESS=token needs a non-empty GROKGATE_METRICS_TOKEN"),
            "loc": ("metrics_token",), "input": None,
        }])


# -- 405 ------------------------------------------------------------------------------------------------------

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves at this path. Starlette's own `Allow` names only the first route that
    matched the path (GET of /admin/keys/{ref}, not its PATCH and DELETE), so each method is tried in turn.
    A mount (static files) decides inside itself: it gives no answer here."""
    allowed = []
    for method in _METHODS:
        probe = {"type": "http", "method": method, "path": scope["path"], "root_path": scope.get("root_path", ""),
                 "headers": [], "query_string": b""}
        for route in app.router.routes:
            match, _ = route.matches(probe)
            if match is Match.FULL:
                if not isinstance(route, Mount):
                    allowed.append(method)
                break
    return allowed


def _allow_on_405(app: FastAPI) -> None:
    """Every 405 carries `Allow` (RFC 9110 15.5.6), in the envelope errors.install renders."""
    render = app.exception_handlers[StarletteHTTPException]

    async def on_http_error(request: Request, exc: Exception) -> Response:
        result = render(request, exc)
        response: Response = await result if inspect.isawaitable(result) else result
        if isinstance(exc, StarletteHTTPException) and exc.status_code == 405:
            allowed = allowed_methods(app, request.scope)
            if not allowed:  # a mount: static files name their own methods
                allowed = [m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()]
            if allowed:
                response.headers["allow"] = ", ".join(allowed)
        return response

    app.add_exception_handler(StarletteHTTPException, on_http_error)


# -- the OpenAPI document -------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str
    message: str
    type: str
    param: str | None


class ErrorEnvelope(BaseModel):
    """Every error answer (api/errors.py); `trace_id` equals the response's `x-request-id`."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail
    trace_id: str


ERRORS = {
    "400": "Bad request: an invalid parameter or body (`bad_request`), or no `Authorization` header (`no_token`)",
    "401": "The token is invalid or has expired (`invalid_token`, `token_expired`)",
    "403": "Not allowed: a disabled token (`disabled`), not the admin token (`forbidden`), a model the token may "
           "not use (`model_not_allowed`), not enough credits (`used_up`)",
    "404": "Not found: the token named (`token_not_found`), the model (`model_not_found`)",
    "409": "The reference names more than one token (`ambiguous_reference`): use its id or prefix",
    "413": "The request body is larger than GROKGATE_MAX_BODY_BYTES (`request_too_large`)",
    "429": "Rate limited, by this token's limits or by every upstream (`too_many_requests`); see `retry-after`",
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
    "models": _AUTH,
    "admin": _AUTH,
    "account": (*_AUTH, "404"),  # 404: the calling token was deleted a moment ago (authentication is cached 2 s)
    "health": ("500",),
}
_SECURED_TAGS = {"chat", "models", "admin", "account"}
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
    if parameters & {"ref", "token"}:
        statuses |= {"404", "409"}
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
        responses["200"] = {"description": "The completion; with `stream: true`, server-sent events", "content": {
            "application/json": {"schema": _ref("ChatCompletion")},
            "text/event-stream": {"schema": _ref("ChatCompletionEvent")},
        }}


def _describe_api(app: FastAPI, settings: Settings) -> None:
    """Build the document once: FastAPI's, made true to what the server answers (errors in the envelope with
    400, not 422; the statuses each operation can answer; the chat body, which the chat routes parse by hand
    for speed, and its JSON and SSE answers; bearer authentication)."""
    from fastapi.openapi.utils import get_openapi

    from grokgate.schemas.chat import ChatCompletionRequest

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            body = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(body.pop("$defs", {}))
            schemas["ChatCompletionRequest"] = body
            schemas["ChatCompletion"] = CHAT_COMPLETION
            schemas["ChatCompletionChunk"] = CHAT_CHUNK
            schemas["ChatCompletionEvent"] = CHAT_EVENT
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


# -- /docs ----------------------------------------------------------------------------------------------------

# The console's discipline (api/console.py): nothing sniffed, nothing framed, no referrer. The docs page's one
# inline script (Swagger UI's start-up) is allowed by its hash, nothing else inline; Swagger UI needs no eval.
_DOCS_POLICY = ("default-src 'self'; script-src 'self' {scripts}; style-src 'self'; img-src 'self' data:; "
                "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                "form-action 'self'")
DOCS_FILE_HEADERS = {"content-security-policy": "default-src 'none'; frame-ancestors 'none'",
                     "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


def _script_hashes(html: str) -> str:
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)


class _DocsFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(DOCS_FILE_HEADERS)
        return response


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI from assets shipped in a package, so /docs works offline; the document at /openapi.json."""
    import fastapi_offline

    static = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/docs-static", _DocsFiles(directory=static), name="docs-static")
    page = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="grokgate API",
        swagger_js_url="/docs-static/swagger-ui-bundle.js",
        swagger_css_url="/docs-static/swagger-ui.css",
        swagger_favicon_url="/docs-static/favicon.png",
        # Swagger UI's default sends the document's URL to validator.swagger.io for a badge.
        swagger_ui_parameters={"validatorUrl": None},
    ).body
    page_headers = {**DOCS_FILE_HEADERS, "cache-control": "no-cache",
                    "content-security-policy": _DOCS_POLICY.format(scripts=_script_hashes(bytes(page).decode()))}
    document: list[bytes] = []  # serialised on first request, once

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return Response(page, media_type="text/html", headers=page_headers)

    async def openapi_json(request: Request) -> Response:
        if not document:
            document.append(orjson.dumps(app.openapi()))
        return Response(document[0], media_type="application/json", headers=DOCS_FILE_HEADERS)

    app.add_route("/openapi.json", openapi_json, methods=["GET"], include_in_schema=False)
