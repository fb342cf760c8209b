"""Every xAI service or method grokgate does not serve answers UNIMPLEMENTED, naming what it does serve (gRPC's
own answer, "Method not found!", says nothing of where to go instead)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable

import grpc

from grokgate.rpc.errors import bounded


class Unimplemented(grpc.GenericRpcHandler):
    """The last handler of the server: any method no servicer took. `served` lists what is, for the message."""

    def __init__(self, served: Callable[[], Iterable[str]]) -> None:
        self._served = served

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method = str(handler_call_details.method)
        served = ", ".join(sorted(self._served())) or "none"
        # The method's name as the client sent it: bounded, as any details that quote the caller (rpc/errors.py).
        message = (f"grokgate does not serve {bounded(method.lstrip('/'), 512)}. It serves: {served} (and the HTTP "
                   "API: /v1/chat/completions, /v1/responses).")

        async def refuse(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
            return b""  # pragma: no cover (abort raises)

        # Registered as taking a stream, and answered before any message is read (a unary handler would first
        # receive the whole message, up to the receive bound, from anyone: rpc/handlers.py); raw bytes, so
        # whatever the method's messages are, nothing of them is parsed.
        return grpc.stream_unary_rpc_method_handler(refuse)
