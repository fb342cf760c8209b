"""The caller of an RPC, from its metadata: xai-sdk sends the key as `authorization: Bearer <key>` on every call."""

from __future__ import annotations

import grpc

from grokgate.core.admission import Admission, Principal


def authorization_of(context: grpc.aio.ServicerContext[object, object]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


async def authenticate(admission: Admission, context: grpc.aio.ServicerContext[object, object]) -> Principal:
    """The principal of the RPC's key; a GatewayError (401, 403) as for HTTP otherwise."""
    return await admission.authenticate(authorization_of(context))
