"""xAI's native chat (the `xai_api.Chat` service xai-sdk calls over gRPC) as a wire format of the serving lifecycle.

The transport (rpc/chat.py) turns the protobuf request into the chat request every backend serves and turns the
payloads made here into protobuf messages (rpc/chunks.py); everything else is the lifecycle's, as for HTTP. A
collected answer is the chat completion object (core/completion.py `CompletionAccumulator`), converted whole.

A stream follows what xai-sdk does with chunks (xai_sdk/chat.py `process_chunk`, `Chunk.choices`):
- every output of every chunk carries the assistant role: the SDK keeps only outputs whose `delta.role` is the
  assistant's, and sets the message's role from each chunk;
- a tool call goes out whole, once its choice has finished: the SDK appends each chunk's tool calls as separate
  calls and `json.loads` their arguments, so fragments (OpenAI's streaming shape) would be many broken calls. A
  call whose arguments are not JSON (a call cut by the output cap) is dropped, and the choice ends as `length`;
- a choice's finish reason goes out on its last output (the SDK keeps the last one it sees for each index);
- usage comes once, on the last chunk (the SDK copies each chunk's usage over the previous one), always: the SDK
  has no `include_usage` switch.

Payloads are plain dicts (`id`, `created`, `model`, `system_fingerprint`, `outputs`, `usage`, `citations`); each
output is `{"index", "content", "reasoning_content", "tool_calls", "logprobs", "finish_reason"}` with only what it
has. A failure after the stream started is raised, and the transport ends the RPC with its status: gRPC has no
error payload inside a stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import orjson

from grokgate.core.completion import (
    ChunkFactory,
    CompletionAccumulator,
    merge_tool_call,
    normalise_finish_reason,
)
from grokgate.core.errors import GatewayError
from grokgate.core.events import Delta, Event, Extra, Finish, Usage, UsageReport
from grokgate.schemas.chat import ChatCompletionRequest
from grokgate.serving.wire import Framing, Payload

NOTHING: tuple[Payload, ...] = ()


class Keeping(Protocol):
    """What keeps a stored completion (`store_messages`: serving/stored_chat.py `Keeper`): its id is the
    completion's; `keep` runs once the settlement is committed, before the client gets the end of the answer."""

    @property
    def id(self) -> str: ...

    async def keep(self, completion: Mapping[str, Any], usage: Usage | None = None) -> bool: ...


class XaiChatWire:
    """One `xai_api.Chat` completion: `XaiChunkStream` renders a stream, `CompletionAccumulator` collects; with a
    `keeper`, the answer is stored (under the keeper's id, which is the completion's) before the client has it."""

    label = "xai chat completion"
    endpoint = "grpc"

    def __init__(self, framing: Framing, keeper: Keeping | None = None) -> None:
        self.framing = framing
        self.keeper = keeper

    def _factory(self, request: ChatCompletionRequest, fingerprint: str) -> ChunkFactory:
        return ChunkFactory(request.model, fingerprint, self.keeper.id if self.keeper is not None else None)

    def renderer(self, request: ChatCompletionRequest, fingerprint: str) -> XaiChunkStream:
        factory = self._factory(request, fingerprint)
        if self.keeper is None:
            return XaiChunkStream(factory, request.choices)
        return KeptChunkStream(factory, request.choices, self.keeper)

    def collector(self, request: ChatCompletionRequest, fingerprint: str) -> CompletionAccumulator:
        factory = self._factory(request, fingerprint)
        if self.keeper is None:
            return CompletionAccumulator(factory, request.choices)
        return KeptCompletion(factory, request.choices, self.keeper)


class KeptCompletion(CompletionAccumulator):
    """A collected answer that is stored once settled."""

    def __init__(self, factory: ChunkFactory, choices: int, keeper: Keeping) -> None:
        super().__init__(factory, choices)
        self.keeper = keeper

    async def commit(self) -> None:
        await self.keeper.keep(self.result(), self.usage)


def whole_calls(calls: dict[int, dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """The merged calls in order, without those whose arguments are not a JSON value; and whether one was dropped."""
    kept: list[dict[str, Any]] = []
    for index in sorted(calls):
        call = calls[index]
        arguments = call["function"]["arguments"] or "{}"
        try:
            orjson.loads(arguments)
        except orjson.JSONDecodeError:
            continue
        call["function"]["arguments"] = arguments
        kept.append(call)
    return kept, len(kept) < len(calls)


class XaiChunkStream:
    """Events -> chunk payloads for xai-sdk (see the module's docstring)."""

    __slots__ = ("_calls", "_citations", "_finished", "choices", "factory", "usage")

    def __init__(self, factory: ChunkFactory, choices: int) -> None:
        self.factory = factory
        self.choices = choices
        self.usage: Usage | None = None
        self._finished: set[int] = set()
        self._calls: dict[int, dict[int, dict[str, Any]]] = {}  # choice -> call index -> merged call
        self._citations: list[str] = []

    def _chunk(self, outputs: list[dict[str, Any]], usage: Usage | None = None) -> Payload:
        factory = self.factory
        chunk: Payload = {"id": factory.id, "created": factory.created, "model": factory.model,
                          "system_fingerprint": factory.fingerprint, "outputs": outputs, "usage": usage}
        if self._citations:
            chunk["citations"], self._citations = self._citations, []
        return chunk

    def opening(self) -> Sequence[Payload]:
        return NOTHING

    def on_event(self, event: Event) -> Sequence[Payload]:
        if isinstance(event, Delta):
            index = event.index
            if not 0 <= index < self.choices or index in self._finished:
                return NOTHING
            output: dict[str, Any] = {"index": index}
            if event.content:
                output["content"] = event.content
            if event.reasoning_content:
                output["reasoning_content"] = event.reasoning_content
            if event.logprobs:
                output["logprobs"] = event.logprobs
            for fragment in event.tool_calls or ():
                merge_tool_call(self._calls.setdefault(index, {}), fragment)
            return (self._chunk([output]),) if len(output) > 1 else NOTHING
        if isinstance(event, Finish):
            if not 0 <= event.index < self.choices or event.index in self._finished:
                return NOTHING
            return (self._chunk([self._finish(event.index, normalise_finish_reason(event.reason))]),)
        if isinstance(event, UsageReport):
            self.usage = event.usage
        elif isinstance(event, Extra):
            citations = event.fields.get("citations")
            if isinstance(citations, list):
                self._citations += [c for c in citations if isinstance(c, str)]
        return NOTHING

    def _finish(self, index: int, reason: str) -> dict[str, Any]:
        self._finished.add(index)
        output: dict[str, Any] = {"index": index, "finish_reason": reason}
        calls = self._calls.pop(index, None)
        if calls:
            kept, dropped = whole_calls(calls)
            if kept:
                output["tool_calls"] = kept
            if dropped:
                output["finish_reason"] = "length"
        return output

    async def commit(self) -> None:
        """Nothing is kept of a chat stream."""

    def closing(self) -> Sequence[Payload]:
        """Finish the choices the backend left open, then the usage on a chunk of its own."""
        outputs = [self._finish(i, "stop") for i in range(self.choices) if i not in self._finished]
        return [self._chunk(outputs, self.usage or Usage())]

    def failed(self, error: GatewayError, trace_id: str) -> Sequence[Payload]:
        # A copy: `error` may be a shared one (the lifecycle's INTERNAL_ERROR), whose traceback and context would
        # grow with every raise, keeping each failed stream's frames alive.
        raise GatewayError(error.status, error.code, error.message, param=error.param, headers=error.headers)


class KeptChunkStream(XaiChunkStream):
    """A stream whose whole answer is also collected, and stored once settled (before the last chunk goes out)."""

    __slots__ = ("_whole", "keeper")

    def __init__(self, factory: ChunkFactory, choices: int, keeper: Keeping) -> None:
        super().__init__(factory, choices)
        self.keeper = keeper
        self._whole = CompletionAccumulator(factory, choices)

    def on_event(self, event: Event) -> Sequence[Payload]:
        self._whole.on_event(event)
        return super().on_event(event)

    async def commit(self) -> None:
        await self.keeper.keep(self._whole.result(), self._whole.usage)
