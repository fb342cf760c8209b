"""GatewayErrors as gRPC statuses: the codes xai-sdk surfaces, never UNKNOWN or INTERNAL for bad input.

The HTTP status decides the code; the message is kept (AceData's text included, e.g. `used_up`'s), prefixed by the
error's code so a client can tell `used_up` from `disabled`; a rate limit's retry delay goes out as the
`retry-after` trailing metadata (seconds), as HTTP's header does.
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


def status_of(error: GatewayError) -> grpc.StatusCode:
    """The gRPC code of an HTTP status: any other 4xx is the caller's (INVALID_ARGUMENT), any other 5xx UNAVAILABLE."""
    code = _CODES.get(error.status)
    if code is not None:
        return code
    return grpc.StatusCode.INVALID_ARGUMENT if error.status < 500 else grpc.StatusCode.UNAVAILABLE


def details_of(error: GatewayError) -> str:
    """`<code>: <message>` (and the field, when the error names one), as one line."""
    text = f"{error.code}: {error.message}"
    if error.param:
        text += f" (param: {error.param})"
    return text


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
