"""Provider events -> chat-completion objects: chunks for a stream, or one whole completion.

These are the chat wire format's renderers: `StreamAssembler` is a `serving.wire.StreamRenderer` and
`CompletionAccumulator` a `serving.wire.Collector` (serving/chat.py builds them per request). The stream side
enforces what clients rely on (docs/architecture.md, "Events, not wire formats"): the same `id` and `created`
on every chunk, a role delta first for each choice, exactly one chunk with a non-null `finish_reason` per
choice, `usage: null` everywhere but the final `choices: []` usage chunk (sent only when asked for).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from grokgate.core.errors import GatewayError
from grokgate.core.events import JSON, Delta, Event, Extra, Finish, Item, JSONObject, Usage, UsageReport

FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}
NOTHING: tuple[dict[str, Any], ...] = ()


def normalise_finish_reason(reason: str) -> str:
    if reason in FINISH_REASONS:
        return reason
    if reason in ("end_turn", "eos", "stop_sequence"):
        return "stop"
    if reason in ("max_tokens", "limit"):
        return "length"
    return "stop"


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChunkFactory:
    """Builds chunk dicts that share one id, creation time, model name and fingerprint."""

    def __init__(self, model: str, fingerprint: str, completion_id: str | None = None,
                 created: int | None = None) -> None:
        self.id = completion_id or new_completion_id()
        self.created = created if created is not None else int(time.time())
        self.model = model
        self.fingerprint = fingerprint

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
            "usage": usage,
        }


def _choice(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


class StreamAssembler:
    """Turns events into chunk dicts, keeping the stream invariants whatever the provider does."""

    def __init__(self, factory: ChunkFactory, choices: int, include_usage: bool) -> None:
        self.factory = factory
        self.choices = choices
        self.include_usage = include_usage
        self._finished: set[int] = set()
        self.usage: Usage | None = None
        self._extras: dict[str, Any] = {}
        self._last_finish: list[dict[str, Any]] | None = None

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        chunk = self.factory.chunk(choices, usage)
        if self._extras:  # passed-through keys ride on the next chunk out
            chunk.update(self._extras)
            self._extras = {}
        return chunk

    def opening(self) -> list[dict[str, Any]]:
        return [self.factory.chunk([_choice(i, {"role": "assistant", "content": ""})]) for i in range(self.choices)]

    def on_event(self, event: Event) -> tuple[dict[str, Any], ...]:
        """The chunks this event makes: one, or none (held back, dropped, or not a chunk of its own)."""
        if isinstance(event, Delta | Finish) and not 0 <= event.index < self.choices:
            return NOTHING  # an upstream answering more choices than asked for: not ours to forward
        if isinstance(event, Delta):
            if event.index in self._finished:
                return NOTHING
            delta: dict[str, Any] = {}
            if event.content is not None:
                delta["content"] = event.content
            if event.reasoning_content is not None:
                delta["reasoning_content"] = event.reasoning_content
            if event.tool_calls is not None:
                delta["tool_calls"] = event.tool_calls
            logprobs = {"content": event.logprobs} if event.logprobs is not None else None
            return (self._chunk([_choice(event.index, delta, logprobs)]),)
        if isinstance(event, Finish):
            if event.index in self._finished:
                return NOTHING
            self._finished.add(event.index)
            finish = [_choice(event.index, {}, None, normalise_finish_reason(event.reason))]
            if len(self._finished) == self.choices:
                # The last finish waits for the end of the stream, so top-level keys that come late
                # (xAI's citations ride on its final chunk) can still go out with it.
                self._last_finish = finish
                return NOTHING
            return (self._chunk(finish),)
        if isinstance(event, UsageReport):
            self.usage = event.usage  # the last report wins: providers never send running sums
        elif isinstance(event, Extra):
            self._extras.update(event.fields)
        return NOTHING  # an Item: the Responses API's alone (serving/responses.py)

    async def commit(self) -> None:
        """Nothing to keep once a chat stream is settled (serving/wire.py StreamRenderer.commit)."""

    def closing(self) -> list[dict[str, Any]]:
        """Finish any choice the provider left open, then the usage chunk if the client asked for it."""
        chunks = [self._chunk(self._last_finish)] if self._last_finish else []
        chunks += [self._chunk([_choice(i, {}, None, "stop")]) for i in range(self.choices) if i not in self._finished]
        self._finished.update(range(self.choices))
        self._last_finish = None
        if self.include_usage:
            chunks.append(self._chunk([], (self.usage or Usage()).as_dict()))
        return chunks

    def failed(self, error: GatewayError, trace_id: str) -> list[dict[str, Any]]:
        """After the first byte an error is one `data:` event in the envelope, and the stream ends without
        `[DONE]` (the framing adds nothing after it)."""
        return [{"error": error.body(), "trace_id": trace_id}]


class _ChoiceState:
    __slots__ = ("content", "finish", "logprobs", "reasoning", "tool_calls")

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.logprobs: list[dict[str, Any]] | None = None
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None


class CompletionAccumulator:
    """Collects events into one `chat.completion` object (non-streaming responses)."""

    def __init__(self, factory: ChunkFactory, choices: int) -> None:
        self.factory = factory
        self._choices = [_ChoiceState() for _ in range(choices)]
        self.usage: Usage | None = None
        self._extras: dict[str, Any] = {}

    def on_event(self, event: Event) -> None:
        if isinstance(event, UsageReport):
            self.usage = event.usage
            return
        if isinstance(event, Extra):
            self._extras.update(event.fields)
            return
        if isinstance(event, Item) or not 0 <= event.index < len(self._choices):
            return
        state = self._choices[event.index]
        if isinstance(event, Finish):
            state.finish = state.finish or normalise_finish_reason(event.reason)
            return
        if event.content:
            state.content.append(event.content)
        if event.reasoning_content:
            state.reasoning.append(event.reasoning_content)
        if event.logprobs is not None:
            state.logprobs = (state.logprobs or []) + event.logprobs
        for fragment in event.tool_calls or ():
            merge_tool_call(state.tool_calls, fragment)

    async def commit(self) -> None:
        """Nothing to keep once a chat completion is settled (serving/wire.py Collector.commit)."""

    def result(self) -> dict[str, Any]:
        choices = []
        for index, state in enumerate(self._choices):
            message: dict[str, Any] = {"role": "assistant", "content": "".join(state.content)}
            if state.reasoning:
                message["reasoning_content"] = "".join(state.reasoning)
            if state.tool_calls:
                message["tool_calls"] = [state.tool_calls[k] for k in sorted(state.tool_calls)]
                message["content"] = message["content"] or None
            choices.append({
                "index": index,
                "message": message,
                "logprobs": {"content": state.logprobs} if state.logprobs is not None else None,
                "finish_reason": state.finish or "stop",
            })
        return {
            "id": self.factory.id,
            "object": "chat.completion",
            "created": self.factory.created,
            "model": self.factory.model,
            "system_fingerprint": self.factory.fingerprint,
            "choices": choices,
            "usage": (self.usage or Usage()).as_dict(),
            **self._extras,
        }


def merge_tool_call(calls: dict[int, dict[str, Any]], fragment: JSONObject) -> None:
    """Tool-call deltas: the first fragment of an index carries id and name, later ones append arguments."""
    index = fragment.get("index")
    call = calls.setdefault(index if isinstance(index, int) else len(calls),
                            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    if _text(fragment.get("id")):
        call["id"] = fragment["id"]
    if _text(fragment.get("type")):
        call["type"] = fragment["type"]
    function = fragment.get("function")
    if not isinstance(function, dict):
        return
    if name := _text(function.get("name")):
        call["function"]["name"] = name
    if arguments := _text(function.get("arguments")):
        call["function"]["arguments"] += arguments


def _text(value: JSON) -> str:
    return value if isinstance(value, str) else ""
