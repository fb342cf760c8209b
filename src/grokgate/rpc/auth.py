"""The caller of an RPC, from its metadata: xai-sdk sends the key as `authorization: Bearer <key>` on every call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from grokgate.core.admission import Admission, Principal
from grokgate.core.errors import GatewayError
from grokgate.rpc.errors import abort


def authorization_of(context: grpc.aio.ServicerContext[object, object]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


async def authenticate(admission: Admission, context: grpc.aio.ServicerContext[object, object]) -> Principal:
    """The principal of the RPC's key; a GatewayError (401, 403) as for HTTP otherwise."""
    return await admission.authenticate(authorization_of(context))


BLOCKED = frozenset({"disabled", "token_expired"})  # a known key, refused: still told about itself (Auth)


def caller_check(admission: Admission, *, known: bool = False
                 ) -> Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]:
    """rpc/handlers.py's `before`: an RPC without a valid key ends with its status before its message is read
    (the servicer authenticates again for its principal: a cached lookup). `known`: a disabled or expired key
    passes too (xAI's `get_api_key_info` answers for a blocked key)."""

    async def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            await admission.authenticate(authorization_of(context))
        except GatewayError as error:
            if not (known and error.code in BLOCKED):
                await abort(context, error)

    return check
