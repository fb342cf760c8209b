"""The Responses API's wire format over the serving lifecycle (serving/lifecycle.py): provider events rendered as
a `response` object (collected) or as the Responses stream events (streamed), and the response stored once the
request is settled (`commit`).

Shapes follow openai-python: the object is `openai.types.responses.Response`, the stream events the members of
`ResponseStreamEvent`, in the order `client.responses.stream()` consumes them
(src/openai/lib/streaming/responses/_responses.py): `response.created`, `response.in_progress`, then per output
item `response.output_item.added`, its content events and `response.output_item.done`, then one of
`response.completed` / `response.incomplete`, or after a failure an `error` event and `response.failed`. Every
payload has `type` and a strictly increasing `sequence_number`; the framing (api/sse.py) writes
`event: <type>` + `data: <json>`.

Output items, in the order the events make them: a `message` (text deltas), a `reasoning` item (reasoning
deltas, as summary text), `function_call`s (tool-call fragments, one item per call), and items a backend passes
through whole (`Item`: xAI's reasoning with its encrypted content, server-side tool calls). A reasoning `Item`
that follows reasoning deltas completes the item those deltas opened, keeping that item's id: the SDK refuses an
item whose id changes between `added` and `done`. Items stay open until another kind of item starts (function
calls stay open together, so interleaved fragments of parallel calls are fine) or the response ends.

Storing: `commit` saves the response (this turn's input items and the response object) when `store` is true. One
larger than `max_stored_bytes` of JSON, or one the store fails to save, is answered all the same but not kept,
and the final object says so (`store: false`): `commit` runs before the final object goes out (the collected
answer, or the stream's `response.completed`), although `response.created` already said `store: true`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from grokgate.core.completion import normalise_finish_reason
from grokgate.core.errors import GatewayError
from grokgate.core.events import JSON, Delta, Event, Extra, Finish, Item, JSONObject, Usage, UsageReport
from grokgate.core.responses import ResponseStore, StoredResponse
from grokgate.observability.metrics import Metrics
from grokgate.schemas.chat import ChatCompletionRequest
from grokgate.serving.wire import Framing, Payload

log = logging.getLogger("grokgate.responses")
NOTHING: Final[tuple[Payload, ...]] = ()
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def new_id(prefix: str) -> str:
    """A random id (128 bits, as a uuid4's hex, without building a UUID object)."""
    return f"{prefix}_{os.urandom(16).hex()}"


def usage_object(usage: Usage | None) -> dict[str, Any]:
    """The Responses usage object. `output_tokens` includes the reasoning tokens (as chat's completion tokens);
    `cache_write_tokens` is 0: no backend reports it, and openai-python's type requires it."""
    usage = usage or Usage()
    body: dict[str, Any] = {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }
    if usage.server_tool_calls:
        body["num_server_side_tools_used"] = usage.server_tool_calls  # xAI's name for it
    return body


@dataclass(frozen=True, slots=True)
class Keeping:
    """Where and how responses are stored (built once by serving/responses.py `ResponsesService`)."""

    store: ResponseStore
    metrics: Metrics
    retention_ms: int
    max_stored_bytes: int


class ResponsesWire:
    """One Responses API request's wire format: what it echoes, where it is stored."""

    label = "response"
    endpoint = "responses"

    def __init__(self, framing: Framing, keeping: Keeping, base: dict[str, Any], *, owner: str,
                 input_items: list[JSONObject], created_ms: int) -> None:
        self.framing = framing
        self.keeping = keeping
        self.base = base  # the response object before any output: id, created_at, the echoed settings
        self.owner = owner
        self.input_items = input_items  # this turn's items, each with its id: what GET .../input_items lists
        self.created_ms = created_ms

    @property
    def id(self) -> str:
        return str(self.base["id"])

    def renderer(self, request: ChatCompletionRequest, fingerprint: str) -> ResponseStream:
        return ResponseStream(self)

    def collector(self, request: ChatCompletionRequest, fingerprint: str) -> ResponseCollector:
        return ResponseCollector(self)

    async def keep(self, response: dict[str, Any]) -> None:
        """Store a complete response if asked to; never raises (the client was charged already)."""
        if response.get("store") is False:
            return
        keeping = self.keeping
        metrics = keeping.metrics
        previous = response.get("previous_response_id")
        stored = StoredResponse(id=self.id, owner=self.owner, created_at=self.created_ms,
                                expires_at=int(time.time() * 1000) + keeping.retention_ms,
                                previous_id=previous if isinstance(previous, str) else None,
                                input_items=self.input_items, response=response)
        try:
            # The store serializes once, checks the bound, and completes the save even if this task is cancelled
            # (a complete, charged answer is kept also when its client has left: core/responses.py).
            size = await keeping.store.save(stored, max_bytes=keeping.max_stored_bytes)
            if size is None:
                response["store"] = False
                metrics.responses_not_stored.labels("too_large").inc()
                log.info("response not stored: too large", extra={"response_id": self.id})
                return
        except Exception:
            response["store"] = False
            metrics.responses_not_stored.labels("error").inc()
            log.exception("response not stored", extra={"response_id": self.id})
            return
        metrics.responses_stored.inc()
        metrics.responses_stored_bytes.inc(size)


class _Builder:
    """Events -> output items (and, when streaming, the payloads announcing them)."""

    def __init__(self, wire: ResponsesWire, streaming: bool) -> None:
        self.wire = wire
        self.streaming = streaming
        self.seq = 0
        self.out: list[Payload] = []  # payloads not yet handed out (streaming only)
        self.output: list[JSONObject] = []  # the items, in order; an open item's dict grows until it is closed
        self.pieces: dict[int, list[str]] = {}  # an open item's text or arguments, by output index
        self.open: list[int] = []  # output indexes not closed yet, oldest first
        self.message: int | None = None  # the open message
        self.reasoning: int | None = None  # the open reasoning item made from deltas
        self.calls: dict[int, int] = {}  # a tool call's fragment index -> its output index
        self.annotations: list[JSON] = []  # annotations for the open message (xAI's citations)
        self.extras: dict[str, JSON] = {}  # top-level keys a backend adds
        self.finish: str | None = None
        self.usage: Usage | None = None
        self.response: dict[str, Any] | None = None  # the final object, once sealed

    def emit(self, payload: Payload) -> None:
        payload["sequence_number"] = self.seq
        self.seq += 1
        self.out.append(payload)

    def drain(self) -> Sequence[Payload]:
        if not self.out:
            return NOTHING
        out, self.out = self.out, []
        return out

    # -- events ------------------------------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        if isinstance(event, Delta):
            if event.index != 0:
                return  # one choice: the Responses API has no `n`
            if event.reasoning_content:
                self._reasoning_delta(event.reasoning_content)
            if event.content:
                self._text_delta(event.content)
            for fragment in event.tool_calls or ():
                self._call_fragment(fragment)
        elif isinstance(event, Finish):
            if event.index == 0 and self.finish is None:
                self.finish = normalise_finish_reason(event.reason)
        elif isinstance(event, UsageReport):
            self.usage = event.usage  # the last report wins
        elif isinstance(event, Extra):
            for key, value in event.fields.items():
                if key == "annotations" and isinstance(value, list):
                    self.annotations.extend(value)
                else:
                    self.extras[key] = value
        elif isinstance(event, Item) and event.index == 0:
            self._whole_item(event.item)

    def _start(self, item: JSONObject) -> int:
        index = len(self.output)
        self.output.append(item)
        self.open.append(index)
        self.pieces[index] = []
        if self.streaming:
            self.emit({"type": "response.output_item.added", "output_index": index, "item": dict(item)})
        return index

    def _reasoning_delta(self, text: str) -> None:
        index = self.reasoning
        if index is None:
            self.close_all()
            item_id = new_id("rs")
            index = self.reasoning = self._start({"id": item_id, "type": "reasoning", "summary": [],
                                                  "status": "in_progress"})
            if self.streaming:
                self.emit({"type": "response.reasoning_summary_part.added", "item_id": item_id,
                           "output_index": index, "summary_index": 0, "part": {"type": "summary_text", "text": ""}})
        self.pieces[index].append(text)
        if self.streaming:
            self.emit({"type": "response.reasoning_summary_text.delta", "item_id": self.output[index]["id"],
                       "output_index": index, "summary_index": 0, "delta": text})

    def _open_message(self) -> int:
        self.close_all()
        item_id = new_id("msg")
        index = self.message = self._start({"id": item_id, "type": "message", "role": "assistant",
                                            "status": "in_progress", "content": []})
        if self.streaming:
            self.emit({"type": "response.content_part.added", "item_id": item_id, "output_index": index,
                       "content_index": 0,
                       "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})
        return index

    def _text_delta(self, text: str) -> None:
        index = self.message if self.message is not None else self._open_message()
        self.pieces[index].append(text)
        if self.streaming:
            self.emit({"type": "response.output_text.delta", "item_id": self.output[index]["id"],
                       "output_index": index, "content_index": 0, "delta": text, "logprobs": []})

    def _call_fragment(self, fragment: JSONObject) -> None:
        key = fragment.get("index")
        position = key if isinstance(key, int) else len(self.calls)
        function = fragment.get("function")
        function = function if isinstance(function, dict) else {}
        name, arguments = function.get("name"), function.get("arguments")
        index = self.calls.get(position)
        if index is None:
            self._close_kind(("message", "reasoning"))
            call_id = fragment.get("id")
            index = self.calls[position] = self._start({
                "id": new_id("fc"), "type": "function_call", "status": "in_progress", "arguments": "",
                "call_id": call_id if isinstance(call_id, str) and call_id else new_id("call"),
                "name": name if isinstance(name, str) else ""})
        item = self.output[index]
        if isinstance(name, str) and name and not item["name"]:
            item["name"] = name  # a name after the first fragment (the call id is fixed by then)
        if not isinstance(arguments, str) or not arguments:
            return
        if index not in self.open:  # a fragment of a call already closed: kept, no event to put it in
            item["arguments"] = str(item["arguments"]) + arguments
            return
        self.pieces[index].append(arguments)
        if self.streaming:
            self.emit({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                       "output_index": index, "delta": arguments})

    def _whole_item(self, item: JSONObject) -> None:
        if item.get("type") == "reasoning" and self.reasoning is not None:
            index = self.reasoning  # completes the reasoning its deltas opened, under that item's id
            self.output[index] = {**item, "id": self.output[index]["id"]}
            self._close(index)
            return
        self.close_all()
        index = len(self.output)
        self.output.append(dict(item))
        if self.streaming:
            self.emit({"type": "response.output_item.added", "output_index": index, "item": item})
            self.emit({"type": "response.output_item.done", "output_index": index, "item": item})

    # -- closing items -----------------------------------------------------------------------------------------

    def close_all(self) -> None:
        for index in list(self.open):
            self._close(index)

    def _close_kind(self, kinds: tuple[str, ...]) -> None:
        for index in list(self.open):
            if self.output[index].get("type") in kinds:
                self._close(index)

    def _close(self, index: int, status: str | None = None) -> None:
        """Finish an open item: its text or arguments, its status, and (streaming) its closing events."""
        self.open.remove(index)
        item = self.output[index]
        text = "".join(self.pieces.pop(index, ()))
        kind = item.get("type")
        status = status or ("incomplete" if self.finish in INCOMPLETE else "completed")
        item_id = item.get("id")
        emit = self.emit if self.streaming else None
        if kind == "message":
            self.message = None
            part: JSONObject = {"type": "output_text", "text": text, "annotations": self.annotations, "logprobs": []}
            self.annotations = []
            item["content"] = [part]
            item["status"] = status
            if emit:
                emit({"type": "response.output_text.done", "item_id": item_id, "output_index": index,
                      "content_index": 0, "text": text, "logprobs": []})
                emit({"type": "response.content_part.done", "item_id": item_id, "output_index": index,
                      "content_index": 0, "part": part})
        elif kind == "function_call":
            item["arguments"] = text
            item["status"] = status
            if emit:
                emit({"type": "response.function_call_arguments.done", "item_id": item_id, "output_index": index,
                      "arguments": text, "name": item.get("name")})
        elif kind == "reasoning":
            self.reasoning = None
            if "encrypted_content" not in item and not item.get("summary"):  # made from deltas alone
                summary: JSONObject = {"type": "summary_text", "text": text}
                item["summary"] = [summary]
                item["status"] = status
            if emit:
                part = {"type": "summary_text", "text": text}
                emit({"type": "response.reasoning_summary_text.done", "item_id": item_id, "output_index": index,
                      "summary_index": 0, "text": text})
                emit({"type": "response.reasoning_summary_part.done", "item_id": item_id, "output_index": index,
                      "summary_index": 0, "part": part})
        if emit:
            emit({"type": "response.output_item.done", "output_index": index, "item": item})

    # -- the response ------------------------------------------------------------------------------------------

    def seal(self) -> dict[str, Any]:
        """The final response object (once; later calls return the same dict)."""
        if self.response is not None:
            return self.response
        if not self.output:  # nothing came: an empty message, so `output_text` reads "" as with OpenAI
            self._open_message()
        self.close_all()
        response = self._object()
        reason = INCOMPLETE.get(self.finish or "")
        if reason is not None:
            response["status"] = "incomplete"
            response["incomplete_details"] = {"reason": reason}
        else:
            response["status"] = "completed"
            response["completed_at"] = int(time.time())
        self.response = response
        return response

    def _object(self) -> dict[str, Any]:
        response = dict(self.wire.base)
        for key, value in self.extras.items():
            response.setdefault(key, value)  # a backend's keys never replace the object's own
        if self.annotations:  # came after their message was closed: the last message gets them
            for item in reversed(self.output):
                content = item.get("content")
                if item.get("type") == "message" and isinstance(content, list) and content:
                    part = content[0]
                    if isinstance(part, dict):
                        earlier = part.get("annotations")
                        part["annotations"] = [*(earlier if isinstance(earlier, list) else []), *self.annotations]
                    break
            self.annotations = []
        response["output"] = self.output
        response["usage"] = usage_object(self.usage)
        return response

    def failed(self, error: GatewayError) -> dict[str, Any]:
        """The response of a stream that broke: what it had so far, open items marked incomplete."""
        for index in list(self.open):
            self._close(index, "incomplete")
        self.out = []  # those items' closing events are not sent: the response failed
        response = self.response if self.response is not None else self._object()
        response["status"] = "failed"
        response.pop("completed_at", None)
        response["error"] = {"code": "rate_limit_exceeded" if error.status == 429 else "server_error",
                             "message": error.message, "param": error.param, "type": error.type}
        return response


class ResponseStream:
    """The stream renderer (a serving.wire.StreamRenderer)."""

    def __init__(self, wire: ResponsesWire) -> None:
        self.wire = wire
        self.builder = _Builder(wire, streaming=True)

    @property
    def usage(self) -> Usage | None:
        return self.builder.usage

    def opening(self) -> Sequence[Payload]:
        builder = self.builder
        response = dict(self.wire.base)
        builder.emit({"type": "response.created", "response": response})
        builder.emit({"type": "response.in_progress", "response": response})
        return builder.drain()

    def on_event(self, event: Event) -> Sequence[Payload]:
        self.builder.on_event(event)
        return self.builder.drain()

    async def commit(self) -> None:
        await self.wire.keep(self.builder.seal())

    def closing(self) -> Sequence[Payload]:
        builder = self.builder
        response = builder.seal()
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        builder.emit({"type": kind, "response": response})
        return builder.drain()

    def failed(self, error: GatewayError, trace_id: str) -> Sequence[Payload]:
        """An `error` event (openai-python's ResponseErrorEvent, with grokgate's code and the trace id), then
        `response.failed` with the output so far."""
        builder = self.builder
        response = builder.failed(error)
        builder.emit({"type": "error", "code": error.code, "message": error.message, "param": error.param,
                      "trace_id": trace_id})
        builder.emit({"type": "response.failed", "response": response})
        return builder.drain()


class ResponseCollector:
    """The collector (a serving.wire.Collector): the same items, no payloads."""

    def __init__(self, wire: ResponsesWire) -> None:
        self.wire = wire
        self.builder = _Builder(wire, streaming=False)

    @property
    def usage(self) -> Usage | None:
        return self.builder.usage

    def on_event(self, event: Event) -> None:
        self.builder.on_event(event)

    def result(self) -> Payload:
        return self.builder.seal()

    async def commit(self) -> None:
        """Runs after `result` and before the client gets it: the object it returned may say `store: false`."""
        await self.wire.keep(self.builder.seal())
