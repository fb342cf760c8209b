"""The error envelope: `{"error": {"code", "message", "type", "param"}, "trace_id"}` (AceData's shape and codes).

AceData clients read `error.code`, `error.message` and `trace_id`; the OpenAI SDK reads `body.error`.
`trace_id` always equals the response's `x-request-id`.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match, Mount
from starlette.types import Scope

from grokgate.core.errors import GatewayError

log = logging.getLogger("grokgate.errors")

# Path segments pydantic adds for union members and wrappers; they are not field names.
_TYPE_SEGMENTS = {"str", "int", "float", "bool", "dict", "list", "none", "json-or-python"}


# pydantic-core's JSON parser (jiter) stops at a fixed depth, with this error: 200 levels of arrays and objects
# always parse (a 201st array level does too, a 201st object level does not).
_RECURSION = "recursion limit exceeded"
MAX_JSON_DEPTH = 200


def request_id_of(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


def _count(request: Request, error: GatewayError) -> None:
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is not None:
        gateway.metrics.errors.labels(error.code).inc()


def error_response(error: GatewayError, request_id: str) -> Response:
    body = orjson.dumps({"error": error.body(), "trace_id": request_id})
    headers = {"x-request-id": request_id, **error.headers}
    return Response(body, status_code=error.status, headers=headers, media_type="application/json")


def _param_of(loc: tuple[Any, ...]) -> str | None:
    parts: list[str] = []
    for segment in loc:
        if segment == "body":
            continue
        if isinstance(segment, int):
            parts.append(f"[{segment}]")
            continue
        text = str(segment)
        if text in _TYPE_SEGMENTS or "[" in text or "-" in text:
            continue
        parts.append(("." if parts else "") + text)
    return "".join(parts) or None


def _is_type_mismatch(error: dict[str, Any]) -> bool:
    kind = str(error.get("type", ""))
    return kind.endswith("_type") or kind in ("literal_error", "model_attributes_type")


def validation_error(errors: list[dict[str, Any]], body: Any = None) -> GatewayError:
    """Turn pydantic's error list into one 400 `bad_request` naming the first offending field."""
    if isinstance(body, bytes | bytearray):
        return GatewayError(400, "bad_request", "Send the body as JSON with 'Content-Type: application/json'.")
    invalid = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if invalid is not None:
        if _RECURSION in str((invalid.get("ctx") or {}).get("error", "")):
            return GatewayError(400, "bad_request", f"The request body is nested too deeply: at most {MAX_JSON_DEPTH} "
                                                    "levels of arrays and objects are accepted.")
        return GatewayError(400, "bad_request", "The request body is not valid JSON.")
    if not errors:
        return GatewayError(400, "bad_request", "The request body is invalid.")
    first = _param_of(tuple(errors[0].get("loc", ()))) or ""
    related = [e for e in errors if (_param_of(tuple(e.get("loc", ()))) or "").startswith(first)]
    # For a union (`stop`: string or list; content: string or parts), the specific complaint beats
    # "not a valid string".
    chosen = next((e for e in related if not _is_type_mismatch(e)), related[0])
    param = _param_of(tuple(chosen.get("loc", ())))
    message = str(chosen.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None:
        if chosen.get("type") == "missing":
            return GatewayError(400, "bad_request", "A JSON request body is required.")
        if _is_type_mismatch(chosen):
            return GatewayError(400, "bad_request", "The request body must be a JSON object.")
        return GatewayError(400, "bad_request", f"Invalid request body: {message}.")
    return GatewayError(400, "bad_request", f"Invalid '{param}': {message}.", param=param)


def too_large(exc: StarletteHTTPException) -> GatewayError:
    return GatewayError(413, "request_too_large", str(exc.detail))


def install(app: FastAPI) -> None:
    async def on_gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        _count(request, exc)
        return error_response(exc, request_id_of(request))

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        error = validation_error(list(exc.errors()), exc.body)
        _count(request, error)
        return error_response(error, request_id_of(request))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 413:
            error = too_large(exc)
        elif exc.status_code == 404:
            error = GatewayError(404, "no_api", f"The API {request.url.path} is not registered.")
        elif exc.status_code == 405:
            error = GatewayError(405, "method_not_allowed", f"{request.method} is not allowed here.")
            # Every 405 carries Allow (RFC 9110 15.5.6); a mount (static files) names its own methods.
            allowed = allowed_methods(request.app, request.scope) or [
                m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()]
            if allowed:
                error.headers["allow"] = ", ".join(allowed)
        else:
            error = GatewayError(exc.status_code, "bad_request", str(exc.detail))
        _count(request, error)
        return error_response(error, request_id_of(request))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        rid = request_id_of(request)
        log.exception("unhandled error", extra={"request_id": rid})
        error = GatewayError(500, "api_error", "Internal server error.")
        _count(request, error)
        return error_response(error, rid)

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        # The client left while its body was arriving (or grokgate.server gave up waiting for it): a normal
        # ending, not a 500 with a traceback anyone could flood the log with. Nobody reads this answer.
        return Response(status_code=400, headers={"x-request-id": request_id_of(request)})

    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)



_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: Any, scope: Scope) -> list[str]:
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
