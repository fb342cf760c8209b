"""`xai_api.Chat` over the serving lifecycle: what xai-sdk's `chat.sample()`, `sample_batch(n)`, `stream()` and
`parse()` call (GetCompletion, GetCompletionChunk), `defer()` (StartDeferredCompletion, GetDeferredCompletion:
serving/deferred.py, shared with HTTP's `deferred: true`), and stored completions (`store_messages`,
`previous_response_id`, GetStoredCompletion, DeleteStoredCompletion: serving/stored_chat.py, on the Responses
store, so a conversation goes on over /v1/responses and back). `CompactContext` is not served (UNIMPLEMENTED).

Each RPC does what api/chat.py does for HTTP: authenticate the `authorization` metadata, turn the message into the
chat request (rpc/convert.py, validated by the HTTP body's code), build the call with the options of its metadata
(`x-grokgate-cassette`, `x-grokgate-cache`, `x-grok-conv-id`, as HTTP's headers), serve it through the one
lifecycle with the xAI chat wire format (serving/xai_chat.py), and map the result to protobuf (rpc/chunks.py). A
refusal counts against the caller's rpm as over HTTP. The answer's metadata carries `x-request-id` and the
ticket's headers (credits left, limits), as HTTP's response headers do: trailing for GetCompletion, initial for
a stream (before its first chunk).

Endings: a client's cancel or deadline is a disconnect, settled as over HTTP (billed what was generated): a
collected answer's generation is stopped through the lifecycle's `until_gone`; a stream is closed, shielded.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from functools import partial
from typing import Any, TypeVar

import grpc
import orjson
from xai_sdk.proto.v6 import chat_pb2, chat_pb2_grpc, deferred_pb2

from grokgate.api.body import parse_raw
from grokgate.api.deps import OPTION_HEADERS, Gateway, options_of
from grokgate.core.admission import Principal
from grokgate.core.errors import GatewayError
from grokgate.core.tenancy import tenant_of
from grokgate.providers.base import Call
from grokgate.rpc.auth import authenticate, caller_check
from grokgate.rpc.chunks import FRAMING, completion_response
from grokgate.rpc.convert import chat_body, check_counts
from grokgate.rpc.errors import abort
from grokgate.rpc.handlers import add_servicer
from grokgate.rpc.info import answer
from grokgate.rpc.server import Register
from grokgate.schemas.chat import ChatCompletionRequest
from grokgate.serving import Collected, Streamed
from grokgate.serving.chat import chat_call
from grokgate.serving.deferred import FAILED, PENDING, DeferredResult
from grokgate.serving.lifecycle import INTERNAL_ERROR, Result
from grokgate.serving.stored_chat import Keeper, history, stored_completion
from grokgate.serving.stored_chat import delete as delete_stored
from grokgate.serving.xai_chat import XaiChatWire

Context = grpc.aio.ServicerContext[Any, Any]
_T = TypeVar("_T")


def metadata_of(context: Context) -> dict[str, str]:
    """The metadata HTTP would send as the headers of a call's options (api/deps.py `options_of`)."""
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if key in OPTION_HEADERS:
            found[key] = value if isinstance(value, str) else value.decode(errors="replace")
    return found


def _parsed(body: dict[str, Any], max_messages: int, max_tokens_limit: int) -> tuple[ChatCompletionRequest, bytes]:
    try:
        raw = orjson.dumps(body)
    except orjson.JSONEncodeError:  # nested past what JSON may hold here (convert.py bounds the known places)
        raise GatewayError(400, "bad_request", "The request is nested too deeply.") from None
    request = parse_raw(raw, max_messages)
    request.check_limits(max_messages=max_messages, max_tokens_limit=max_tokens_limit)
    return request, raw


class Chat(chat_pb2_grpc.ChatServicer):  # type: ignore[misc]
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def _call(self, message: chat_pb2.GetCompletionsRequest, context: Context, principal: Principal,
                    started: float, request_id: str, *, stream: bool) -> tuple[Call, XaiChatWire]:
        """The lifecycle's call and this request's wire format. A stored conversation (`previous_response_id`)
        comes before the request's messages; `store_messages` keeps the answer under the completion's id."""
        gw = self.gw
        settings = gw.settings
        gw.gate.precheck(principal)  # a caller known to be past its rpm is refused before any work
        check_counts(message, settings.max_messages)  # before anything is built from the message's lists
        options = options_of(metadata_of(context).get, principal, started, request_id)
        large = message.ByteSize() > settings.parse_offload_bytes
        if large:  # as HTTP's large bodies: parsed at length only for a caller that can be served
            await gw.gate.servable(principal)
        convert = partial(chat_body, message, stream=stream)
        body = await gw.parsing.run(options.tenant, convert) if large else convert()
        turn = body["messages"]
        previous = message.previous_response_id if message.HasField("previous_response_id") else None
        if previous is not None:  # a stored conversation may be up to max_chain_bytes: validated off the loop too
            body["messages"] = await history(gw.responses, options.tenant, previous, len(turn)) + turn
        parse = partial(_parsed, body, settings.max_messages, settings.max_tokens_limit)
        offload = large or previous is not None  # as HTTP's large bodies are
        request, raw = await gw.parsing.run(options.tenant, parse) if offload else parse()
        keeper = (Keeper(gw.responses, options.tenant, turn, previous_id=previous, request=request)
                  if message.store_messages else None)
        return chat_call(request, raw, options), XaiChatWire(FRAMING, keeper)

    async def _serve(self, message: chat_pb2.GetCompletionsRequest, context: Context, *, stream: bool,
                     then: Callable[[Call, Principal, XaiChatWire], Awaitable[_T]]) -> tuple[_T, str]:
        """Authenticate, build the call and hand it to `then` (serve it, or start it deferred); the RPC ends with
        the error's status otherwise, a refusal counted against the caller's limits, as in api/chat.py."""
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        try:
            principal = await authenticate(self.gw.admission, context)
        except GatewayError as error:
            await abort(context, error)
        try:
            call, wire = await self._call(message, context, principal, started, request_id, stream=stream)
            return await then(call, principal, wire), request_id
        except GatewayError as error:
            await abort(context, await self.gw.gate.refused(principal, request_id, error))

    async def _served(self, call: Call, principal: Principal, wire: XaiChatWire) -> Result:
        """Serve in a task of its own, so that a cancelled RPC (the client's cancel or deadline) reaches the
        lifecycle as a disconnect, never as a cancellation in the middle of it: during admission (a reservation
        being written would be left held, nobody's to settle), during a collected answer (its `until_gone`), or
        between a stream's admission and its first read (the stream is closed: settled with what it used)."""
        gone = asyncio.Event()

        async def until_gone() -> None:
            await gone.wait()

        task = asyncio.ensure_future(self.gw.serving.serve(call, principal, wire, until_gone))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            gone.set()
            await asyncio.wait((task,))  # admitted and settled as a disconnect, or refused
            if not task.cancelled() and task.exception() is None:
                result = task.result()
                if isinstance(result, Streamed):
                    await asyncio.shield(result.aclose())
            raise

    async def GetCompletion(self, request: chat_pb2.GetCompletionsRequest,
                            context: Context) -> chat_pb2.GetChatCompletionResponse:
        result, request_id = await self._serve(request, context, stream=False, then=self._served)
        assert isinstance(result, Collected)  # ABANDONED only after a cancel, which `_served` raises
        # Trailing, not initial: gRPC then sends the message and its status in one batch (an initial metadata of
        # its own is one more round through grpc.aio's completion queue, measured by bench/grpc.py).
        context.set_trailing_metadata(_metadata(request_id, result.headers))
        return completion_response(result.body)

    async def GetCompletionChunk(self, request: chat_pb2.GetCompletionsRequest,
                                 context: Context) -> AsyncIterator[bytes]:
        result, request_id = await self._serve(request, context, stream=True, then=self._served)
        assert isinstance(result, Streamed)
        try:
            await context.send_initial_metadata(_metadata(request_id, result.headers))
            try:
                async for chunk in result:
                    yield chunk
            except GatewayError as error:  # after the first chunk: the RPC's status says it
                await abort(context, error)
        finally:
            await asyncio.shield(result.aclose())

    # -- deferred completions ----------------------------------------------------------------------------------

    async def StartDeferredCompletion(self, request: chat_pb2.GetCompletionsRequest,
                                      context: Context) -> deferred_pb2.StartDeferredResponse:
        """Admitted now (a refusal is this RPC's status), generated in the background (serving/deferred.py)."""
        deferred = self.gw.deferred
        assert deferred is not None  # app.py always builds it
        deferred_id, _ = await self._serve(request, context, stream=False, then=deferred.start)
        return deferred_pb2.StartDeferredResponse(request_id=deferred_id)

    async def GetDeferredCompletion(self, request: deferred_pb2.GetDeferredRequest,
                                    context: Context) -> chat_pb2.GetDeferredCompletionResponse:
        """PENDING, or DONE with the answer; a failed generation ends the RPC with its status (xai-sdk's poll knows
        only DONE, PENDING and EXPIRED: a FAILED status would be a ValueError in the client); an unknown, expired
        or another tenant's id is NOT_FOUND."""
        deferred = self.gw.deferred
        assert deferred is not None  # app.py always builds it

        async def work() -> DeferredResult:
            principal = await authenticate(self.gw.admission, context)
            return await deferred.get(principal, request.request_id)

        result = await answer(context, work())
        if result.status == PENDING:
            return chat_pb2.GetDeferredCompletionResponse(status=deferred_pb2.PENDING)
        if result.status == FAILED or result.body is None:
            await abort(context, result.error or INTERNAL_ERROR)
        assert result.body is not None
        return chat_pb2.GetDeferredCompletionResponse(status=deferred_pb2.DONE,
                                                      response=completion_response(result.body))

    # -- stored completions ------------------------------------------------------------------------------------

    async def GetStoredCompletion(self, request: chat_pb2.GetStoredCompletionRequest,
                                  context: Context) -> chat_pb2.GetChatCompletionResponse:
        async def work() -> dict[str, Any]:
            principal = await authenticate(self.gw.admission, context)
            return await stored_completion(self.gw.responses, tenant_of(principal), request.response_id)

        return completion_response(await answer(context, work()))

    async def DeleteStoredCompletion(self, request: chat_pb2.DeleteStoredCompletionRequest,
                                     context: Context) -> chat_pb2.DeleteStoredCompletionResponse:
        async def work() -> str:
            principal = await authenticate(self.gw.admission, context)
            return await delete_stored(self.gw.responses, tenant_of(principal), request.response_id)

        return chat_pb2.DeleteStoredCompletionResponse(response_id=await answer(context, work()))


def _metadata(request_id: str, headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id), *((k.lower(), v) for k, v in headers.items() if v.isascii()))


def register(gw: Gateway) -> Register:
    def add(server: grpc.aio.Server) -> Iterable[str]:
        return [add_servicer(server, chat_pb2_grpc.add_ChatServicer_to_server, Chat(gw),
                             raw_responses={"GetCompletionChunk"}, before=caller_check(gw.admission))]

    return add
