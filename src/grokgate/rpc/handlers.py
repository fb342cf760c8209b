"""Servicers registered so that a request that is not the method's message answers INVALID_ARGUMENT.

gRPC parses a request with the method's deserializer before any servicer code runs, and a `DecodeError` there ends
the RPC as UNKNOWN ("Unexpected <class DecodeError>"): a client's bad input reported as the server's fault. So each
servicer is registered through `add_servicer`: the generated `add_<Service>Servicer_to_server` of xai_sdk/proto/v6
is run against a recorder, and each method it would register gets a deserializer that turns a corrupt message into
a `Malformed` marker, which the method's wrapper answers with INVALID_ARGUMENT before the servicer sees it. Unary
and server-streaming methods (every method xai-sdk calls is one of them).

The caller first, then its message: grpc.aio receives a unary request's whole message (up to the receive bound,
16 MiB) before any servicer code runs, so anyone could make the server hold that much per RPC without a valid
key. With `before` (rpc/auth.py `caller_check`: the `authorization` metadata), each method is registered as
taking a stream of requests, which on the wire is the same (a unary client sends one message and half-closes):
the wrapper runs `before` on the metadata, and only then reads the one message; until it does, HTTP/2 flow
control holds the client to the stream's window.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from grokgate.rpc.errors import bounded

# grpc.RpcMethodHandler, whose stub types its behaviours as sync (grpc.aio's are coroutines and async generators).
Handler = Any


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request whose bytes are not the method's message."""

    reason: str


class _Recorder:
    """Stands for the server in a generated `add_..._to_server`: keeps what it registers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Handler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        return None  # the same methods come to add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Handler]) -> None:
        self.service = service
        self.handlers = dict(handlers)


Before = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]
"""Runs on an RPC's metadata before its message is read; ends the RPC (aborts) to refuse it."""


def add_servicer(server: grpc.aio.Server, add: Callable[[Any, Any], None], servicer: object, *,
                 raw_responses: Collection[str] = (), before: Before | None = None) -> str:
    """Register `servicer` as `add` (a generated `add_<Service>Servicer_to_server`) would, each method's request
    checked; returns the service's full name (xai_api.Models, ...). Methods it does not implement are left to
    rpc/unimplemented.py (`_overrides`). The methods named in `raw_responses` answer bytes their servicer has
    serialized already (a stream's chunks: rpc/chunks.py), sent as they are."""
    recorder = _Recorder()
    add(servicer, recorder)
    handlers = {name: checked(handler, raw=name in raw_responses, before=before)
                for name, handler in recorder.handlers.items() if _overrides(servicer, name)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(recorder.service, handlers),))
    server.add_registered_method_handlers(recorder.service, handlers)
    return recorder.service


def _overrides(servicer: object, method: str) -> bool:
    """Whether `servicer` implements `method` rather than inheriting the generated base class's stub. A stub is
    left unregistered, so the server's last handler (rpc/unimplemented.py) answers it UNIMPLEMENTED naming what
    grokgate serves: the stub itself raises NotImplementedError, which grpc.aio reports as "Unexpected <class
    'NotImplementedError'>: Method not implemented!" and logs as the servicer's error."""
    for cls in type(servicer).__mro__:
        if method in vars(cls):
            return not cls.__module__.endswith("_pb2_grpc")
    return False


def _safe(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Malformed(str(exc) or "the message is corrupt")

    return parse


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], request: Malformed) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(
        f"bad_request: the request is not a valid message of this method ({request.reason})"))


async def _first(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    """The request message of a unary method registered as taking a stream (see the module's docstring)."""
    async for request in requests:
        return request
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad_request: the request message is missing.")


def checked(handler: Handler, *, raw: bool = False, before: Before | None = None) -> Handler:
    """`handler` with its request checked (see the module's docstring); `raw`: its answers are bytes already;
    `before`: run on the metadata before the message is read."""
    parse, serialize = _safe(handler.request_deserializer), None if raw else handler.response_serializer
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, Malformed):
                await _refuse(context, request)
            return await unary(request, context)

        if before is None:
            return grpc.unary_unary_rpc_method_handler(call, request_deserializer=parse,
                                                       response_serializer=serialize)

        async def call_after(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await before(context)
            return await call(await _first(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(call_after, request_deserializer=parse,
                                                    response_serializer=serialize)
    if handler.unary_stream is not None:
        streaming = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await _refuse(context, request)
            async for response in streaming(request, context):
                yield response

        if before is None:
            return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=parse,
                                                        response_serializer=serialize)

        async def stream_after(requests: AsyncIterator[Any],
                               context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await before(context)
            async for response in stream(await _first(requests, context), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(stream_after, request_deserializer=parse,
                                                     response_serializer=serialize)
    return handler  # client streaming: none of xAI's methods that grokgate serves
