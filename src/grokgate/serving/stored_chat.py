"""xAI's stored chat completions (`store_messages`, `previous_response_id`, `GetStoredCompletion`,
`DeleteStoredCompletion`) on grokgate's Responses store, in chat-completion dicts: the gRPC `Chat` service
converts protobuf to and from these at its boundary, so nothing here knows a wire.

One store for both APIs: a chat answer kept here is a Responses API response (its input items, and a response
object built by the Responses wire format's own builder, serving/responses_wire.py), so `GET /v1/responses/{id}`,
its `input_items` and a `/v1/responses` request with `previous_response_id` read it like any other; and a chat
request's `previous_response_id` may name a response made by `/v1/responses` (`history` translates it with the
Responses API's own translation, serving/responses.py `chat_messages`). A stored response belongs to its owner
(core/responses.py `owner_of`): another owner's id is not found (404 `not_found`, gRPC's NOT_FOUND).

The ids are the Responses API's (`resp_...`, `new_stored_id`): the chat completion that is kept answers with it
as its `id`, since that is the id the client names later.

What is kept of a chat turn: the messages the client sent in this request (not the history `previous_response_id`
prepended) as Responses input items, messages keeping their role (`name` is dropped: the Responses API has none),
an assistant's tool calls as `function_call` items, a tool message as a `function_call_output`; and the answer's
choice 0 as the response's output (reasoning text as a reasoning summary, text as an `output_text` message, tool
calls as `function_call` items). With n > 1 (xai-sdk's `sample_batch`), every choice is kept besides, in the
response object's `chat_choices` (a grokgate key: `GetStoredCompletion` returns them all, as xAI does); a
conversation continued from it continues from choice 0, the one the Responses API's output holds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from grokgate.core.events import JSON, Delta, Event, Finish, JSONObject, Usage, UsageReport
from grokgate.core.usage import normalise_responses_usage, normalise_usage
from grokgate.schemas.chat import ChatCompletionRequest, Message
from grokgate.serving.responses import ResponsesService, chat_messages, not_found
from grokgate.serving.responses_wire import INCOMPLETE, ResponseCollector, ResponsesWire, new_id

ChatMessage = Message | Mapping[str, Any]
_FINISH = {reason: finish for finish, reason in INCOMPLETE.items()}  # an incomplete response's reason -> chat's


def new_stored_id() -> str:
    """The id of a chat completion that is stored: a Responses API id, so `/v1/responses/{id}` names it too."""
    return new_id("resp")


async def history(responses: ResponsesService, owner: str, previous_id: str,
                  turn_messages: int) -> list[dict[str, Any]]:
    """The stored conversation ending with `previous_id` (made here or by `/v1/responses`), oldest first, as chat
    messages: what goes before this request's `turn_messages` messages. Raises 404 `not_found` naming
    `previous_response_id` when this owner has none of that id (or it expired), 400 naming it when the
    conversation is longer than the server's bounds (`max_messages` items with this turn's, `max_chain_bytes`)."""
    items: list[JSONObject] = []
    for stored in await responses.chain(owner, previous_id, turn_messages):
        items += stored.input_items
        items += stored.output
    return chat_messages(None, items)


async def stored_completion(responses: ResponsesService, owner: str, response_id: str) -> dict[str, Any]:
    """The stored answer as a chat completion (`GetStoredCompletion`): id, created, model, choices (every choice
    of a kept n > 1 answer; otherwise one, rebuilt from the response's output), usage. 404 `not_found` naming
    `response_id` when this owner has none of that id."""
    stored = await responses.store.get(owner, response_id)
    if stored is None:
        raise not_found(response_id, "response_id")
    response = stored.response
    kept = response.get("chat_choices")
    choices = ([dict(c) for c in kept if isinstance(c, dict)] if isinstance(kept, list) and kept
               else [_choice(stored.output, response)])
    created = response.get("created_at")
    return {
        "id": stored.id,
        "object": "chat.completion",
        "created": created if isinstance(created, int) else stored.created_at // 1000,
        "model": str(response.get("model") or ""),
        "choices": choices,
        "usage": _chat_usage(response.get("usage")),
    }


async def delete(responses: ResponsesService, owner: str, response_id: str) -> str:
    """Delete a stored response (`DeleteStoredCompletion`, whichever API made it); its id. 404 `not_found`
    naming `response_id` when this owner has none of that id."""
    if not await responses.store.delete(owner, response_id):
        raise not_found(response_id, "response_id")
    return response_id


class Keeper:
    """Keeps one chat request's answer (`store_messages: true`). Built before the generation (its `id` is the
    completion's id, on every chunk of a stream); `keep` runs in the wire format's `commit`, once the settlement is
    committed and before the client gets the answer, so a charged answer is never lost to the store.

    `messages` are this request's own messages (not the history of `previous_id`); `request`, when given, supplies
    the settings the response object echoes (model, tools, sampling, format, reasoning effort)."""

    def __init__(self, responses: ResponsesService, owner: str, messages: Sequence[ChatMessage], *,
                 previous_id: str | None = None, request: ChatCompletionRequest | None = None,
                 response_id: str | None = None) -> None:
        self.responses = responses
        self.owner = owner
        self.id = response_id or new_stored_id()
        self.previous_id = previous_id
        self.request = request
        self.input_items = input_items(messages)  # converted now: the ids are fixed before the answer

    async def keep(self, completion: Mapping[str, Any], usage: Usage | None = None) -> bool:
        """Store the completed chat completion (`usage`: the generation's own, else read from the completion);
        whether it was kept. Never raises: the client was charged already. One larger than the store's bound
        (`max_stored_bytes`), or one the store fails to save, is not kept (logged and counted, as the Responses
        API does); the answer goes out all the same."""
        now = time.time()
        created = completion.get("created")
        model = completion.get("model") or (self.request.model if self.request is not None else "")
        base = _echo(self.id, created if isinstance(created, int) else int(now), str(model), self.previous_id,
                     self.request)
        wire = ResponsesWire(self.responses.framing, self.responses.keeping, base, owner=self.owner,
                             input_items=self.input_items, created_ms=int(now * 1000))
        collector = ResponseCollector(wire)
        choices = [c for c in completion.get("choices") or () if isinstance(c, Mapping)]
        first = next((c for c in choices if c.get("index", 0) == 0), choices[0] if choices else {})
        for event in _events(first, usage or _usage(completion.get("usage"))):
            collector.on_event(event)
        response = collector.result()
        if len(choices) > 1:
            response["chat_choices"] = [_kept_choice(c, i) for i, c in enumerate(choices)]
        await wire.keep(response)
        return response.get("store") is not False


# -- chat -> Responses -----------------------------------------------------------------------------------------


def input_items(messages: Sequence[ChatMessage]) -> list[JSONObject]:
    """Chat messages as Responses input items, each with an id (as serving/responses.py `turn_item` gives them),
    in the shapes `chat_messages` translates back to the same messages."""
    items: list[JSONObject] = []
    for message in messages:
        data: dict[str, Any] = (message.model_dump(exclude_none=True) if isinstance(message, BaseModel)
                                else dict(message))
        role = str(data.get("role"))
        content = data.get("content")
        if role == "tool":
            items.append({"type": "function_call_output", "id": new_id("fco"),
                          "call_id": str(data.get("tool_call_id") or ""), "output": _text(content),
                          "status": "completed"})
        elif role == "assistant":
            parts = _parts(content, "output_text")
            refusal = data.get("refusal")
            if isinstance(refusal, str) and refusal:
                parts.append({"type": "refusal", "refusal": refusal})
            calls = [c for c in data.get("tool_calls") or () if isinstance(c, Mapping)]
            if parts or not calls:
                items.append({"type": "message", "id": new_id("msg"), "role": "assistant", "status": "completed",
                              "content": parts})
            items += (_function_call(call) for call in calls)
        else:
            items.append({"type": "message", "id": new_id("msg"), "role": role, "status": "completed",
                          "content": _parts(content, "input_text")})
    return items


def _parts(content: Any, text_type: str) -> list[JSON]:
    """Chat content (a string, text and image parts) as Responses content parts; "" or null as none."""
    if isinstance(content, str):
        if not content:
            return []
        content = [{"type": "text", "text": content}]
    parts: list[JSON] = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, Mapping):
            continue
        if part.get("type") == "image_url":
            image = part.get("image_url")
            image = image if isinstance(image, Mapping) else {}
            parts.append({"type": "input_image", "image_url": str(image.get("url") or ""),
                          "detail": str(image.get("detail") or "auto")})
        else:
            text: JSONObject = {"type": text_type, "text": str(part.get("text") or "")}
            if text_type == "output_text":
                text["annotations"] = []
            parts.append(text)
    return parts


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") for p in content if isinstance(p, Mapping))
    return content if isinstance(content, str) else ""


def _function_call(call: Mapping[str, Any]) -> JSONObject:
    function = call.get("function")
    function = function if isinstance(function, Mapping) else {}
    return {"type": "function_call", "id": new_id("fc"), "call_id": str(call.get("id") or new_id("call")),
            "name": str(function.get("name") or ""), "arguments": str(function.get("arguments") or ""),
            "status": "completed"}


def _events(choice: Mapping[str, Any], usage: Usage) -> list[Event]:
    """A chat choice as the provider events that make it, for the Responses wire format's builder."""
    message = choice.get("message")
    message = message if isinstance(message, Mapping) else {}
    events: list[Event] = []
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        events.append(Delta(index=0, reasoning_content=reasoning))
    text = _text(message.get("content"))
    if text:
        events.append(Delta(index=0, content=text))
    calls: list[JSONObject] = []
    for position, call in enumerate(c for c in message.get("tool_calls") or () if isinstance(c, Mapping)):
        function = call.get("function")
        function = function if isinstance(function, Mapping) else {}
        calls.append({"index": position, "id": str(call.get("id") or ""), "type": "function",
                      "function": {"name": str(function.get("name") or ""),
                                   "arguments": str(function.get("arguments") or "")}})
    if calls:
        events.append(Delta(index=0, tool_calls=calls))
    events.append(Finish(index=0, reason=str(choice.get("finish_reason") or "stop")))
    events.append(UsageReport(usage))
    return events


def _usage(value: Any) -> Usage:
    """A chat usage object (`prompt_tokens`, `completion_tokens`, their details) as grokgate's Usage."""
    return normalise_usage(value) if isinstance(value, dict) else Usage()


def _kept_choice(choice: Mapping[str, Any], position: int) -> JSONObject:
    """A choice of an n > 1 answer as `GetStoredCompletion` returns it (logprobs are not kept)."""
    message = choice.get("message")
    message = message if isinstance(message, Mapping) else {}
    index = choice.get("index")
    kept: dict[str, JSON] = {"role": "assistant", "content": message.get("content")}
    for key in ("reasoning_content", "tool_calls", "refusal"):
        if message.get(key) is not None:
            kept[key] = message[key]
    return {"index": index if isinstance(index, int) else position, "message": kept, "logprobs": None,
            "finish_reason": str(choice.get("finish_reason") or "stop")}


def _echo(response_id: str, created: int, model: str, previous_id: str | None,
          request: ChatCompletionRequest | None) -> dict[str, Any]:
    """The response object before any output, with the chat request's settings in the Responses API's shape (as
    serving/responses.py `echo` makes it for a Responses request)."""
    text: dict[str, Any] = {"format": {"type": "text"}}
    tools: list[dict[str, Any]] = []
    tool_choice: Any = "auto"
    effort = max_tokens = temperature = top_p = user = top_logprobs = None
    parallel = True
    metadata: dict[str, str] = {}
    if request is not None:
        fmt = request.response_format
        if fmt is not None:
            spec = fmt.model_dump(by_alias=True, exclude_none=True)
            schema = spec.pop("json_schema", None)
            text["format"] = {**spec, **schema} if isinstance(schema, dict) else spec
        tools = [{"type": "function", **t.function.model_dump(exclude_none=True)} for t in request.tools or ()]
        choice = request.tool_choice
        if isinstance(choice, BaseModel):
            tool_choice = {"type": "function", "name": choice.function.name}
        elif choice is not None:
            tool_choice = choice
        effort = request.reasoning_effort
        max_tokens = request.max_completion_tokens or request.max_tokens
        temperature, top_p, user = request.temperature, request.top_p, request.user
        top_logprobs = request.top_logprobs
        parallel = request.parallel_tool_calls is not False
        metadata = dict(request.metadata or {})
    return {
        "id": response_id, "object": "response", "created_at": created, "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None, "instructions": None,
        "max_output_tokens": max_tokens, "max_tool_calls": None, "metadata": metadata, "model": model,
        "output": [], "parallel_tool_calls": parallel, "previous_response_id": previous_id,
        "reasoning": {"effort": effort, "summary": None}, "store": True, "temperature": temperature,
        "text": text, "tool_choice": tool_choice, "tools": tools, "top_logprobs": top_logprobs, "top_p": top_p,
        "truncation": "disabled", "usage": None, "user": user,
    }


# -- Responses -> chat -----------------------------------------------------------------------------------------


def _choice(output: list[JSONObject], response: Mapping[str, Any]) -> dict[str, Any]:
    """A response's output as chat's choice 0: its text, refusal, reasoning summary and function calls."""
    texts: list[str] = []
    refusals: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in output:
        kind = item.get("type")
        if kind == "message":
            for part in _dicts(item.get("content")):
                if part.get("type") == "refusal":
                    refusals.append(str(part.get("refusal") or ""))
                else:
                    texts.append(str(part.get("text") or ""))
        elif kind == "reasoning":
            reasoning += (str(p.get("text") or "") for p in _dicts(item.get("summary")))
        elif kind == "function_call":
            calls.append({"id": str(item.get("call_id") or ""), "type": "function",
                          "function": {"name": str(item.get("name") or ""),
                                       "arguments": str(item.get("arguments") or "")}})
    text = "".join(texts)
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if refusals:
        message["refusal"] = "".join(refusals)
    if calls:
        message["tool_calls"] = calls
    details = response.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, Mapping) else None
    finish = "tool_calls" if calls else _FINISH.get(str(reason), "stop") if response.get("status") == "incomplete" \
        else "stop"
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}


def _dicts(value: Any) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _chat_usage(value: Any) -> dict[str, Any]:
    """A Responses usage object as chat's."""
    return (normalise_responses_usage(value) if isinstance(value, dict) else Usage()).as_dict()


__all__ = ["Keeper", "delete", "history", "input_items", "new_stored_id", "stored_completion"]
