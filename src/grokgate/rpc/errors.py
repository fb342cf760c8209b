"""GatewayErrors as gRPC statuses: the codes xai-sdk surfaces, never UNKNOWN or INTERNAL for bad input.

The error's code decides where the HTTP status alone says the wrong thing (`_BY_CODE`: AceData's `no_token` is an
HTTP 400, but over gRPC a missing key is UNAUTHENTICATED, as every other problem with the key; a refusal of a known
token is PERMISSION_DENIED); otherwise the HTTP status decides. The message is kept (AceData's text included,
e.g. `used_up`'s), prefixed by the error's code so a client can tell `used_up` from `disabled`; a rate limit's
retry delay goes out as the `retry-after` trailing metadata (seconds), as HTTP's header does.

Details are bounded (`bounded`, MAX_DETAILS_BYTES): they travel as the `grpc-message` trailer, percent-encoded
beyond ASCII, and a client drops a call whose trailers pass its metadata limit (8 KiB soft, 16 KiB hard by
default) as RESOURCE_EXHAUSTED "Stream removed": a message that quotes the caller's input (a 256 KiB model name
in model_not_found) would otherwise lose its own status.
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from grokgate.core.errors import GatewayError

_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    402: grpc.StatusCode.PERMISSION_DENIED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


# The errors of authentication (core/admission.py bearer_token, core/billing.py AccountAdmission) and of a known
# token's refusal, whatever their HTTP status: xai-sdk's callers tell "fix your key" from "your key may not" by these.
_BY_CODE: dict[str, grpc.StatusCode] = {
    "no_token": grpc.StatusCode.UNAUTHENTICATED,  # HTTP 400 (AceData's): no `authorization` metadata, or blank
    "invalid_token": grpc.StatusCode.UNAUTHENTICATED,  # not `Bearer <token>`, or no such token
    "token_expired": grpc.StatusCode.UNAUTHENTICATED,
    "disabled": grpc.StatusCode.PERMISSION_DENIED,
    "used_up": grpc.StatusCode.PERMISSION_DENIED,  # AceData's message kept (details_of)
    "model_not_allowed": grpc.StatusCode.PERMISSION_DENIED,
}


def status_of(error: GatewayError) -> grpc.StatusCode:
    """The gRPC code of the error's code (`_BY_CODE`), else of its HTTP status: any other 4xx is the caller's
    (INVALID_ARGUMENT), any other 5xx UNAVAILABLE."""
    code = _BY_CODE.get(error.code) or _CODES.get(error.status)
    if code is not None:
        return code
    return grpc.StatusCode.INVALID_ARGUMENT if error.status < 500 else grpc.StatusCode.UNAVAILABLE


# At most 3 bytes on the wire for each byte of UTF-8 (percent-encoding): 6 KiB, under the clients' 8 KiB.
MAX_DETAILS_BYTES = 2048


def bounded(details: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """`details` cut to `limit` bytes of UTF-8 (on a character's boundary), marked as cut."""
    data = details.encode()
    if len(data) <= limit:
        return details
    return data[: limit - 40].decode(errors="ignore") + f"... ({len(data)} bytes, cut)"


def details_of(error: GatewayError) -> str:
    """`<code>: <message>` (and the field, when the error names one), as one line, bounded."""
    text = f"{error.code}: {bounded(error.message)}"
    if error.param:
        text += f" (param: {error.param})"
    return bounded(text, MAX_DETAILS_BYTES + 200)  # a field's name: short


def trailers_of(error: GatewayError) -> tuple[tuple[str, str], ...]:
    retry = error.headers.get("retry-after")
    return (("retry-after", retry),) if retry else ()


async def abort(context: grpc.aio.ServicerContext[object, object], error: GatewayError) -> NoReturn:
    """End the RPC with the error's status (raises, as `context.abort` does)."""
    trailers = trailers_of(error)
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(status_of(error), details_of(error))
    raise AssertionError("context.abort returned")  # pragma: no cover (it raises)
