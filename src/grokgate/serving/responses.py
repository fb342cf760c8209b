"""The Responses API over the serving lifecycle: a request and its stored conversation translated to the chat
request every backend serves, the wire format that renders the answer (serving/responses_wire.py), and the
stored responses' own operations (retrieve, delete, list input items).

grokgate owns the conversation state: `previous_response_id` is rebuilt from the store (core/responses.py), never
left to a backend, so a chain survives a fallback from xAI to another backend. The whole conversation goes to
the backend on each turn: as chat messages (`ResponsesChatRequest`), and as Responses input items in
`responses_body` for a backend that speaks the Responses API itself (providers/xai.py).

The translation (`chat_messages`): the instructions become a leading system message (only this request's: as
with OpenAI, a previous response's instructions do not carry over); then the chain's input and output items and
this turn's, oldest first: messages keep their role (text parts stay text, `input_image` becomes `image_url`,
`refusal` parts an assistant's `refusal`); consecutive `function_call` items become one assistant message's
`tool_calls` (joined to the assistant message just before them, if any); a `function_call_output` becomes a tool
message; reasoning and server-side tool items are left out (a chat backend cannot read them).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ValidationError

from grokgate.core.admission import Principal
from grokgate.core.errors import GatewayError, bad_request
from grokgate.core.events import JSONObject
from grokgate.core.pricing import prompt_token_bound
from grokgate.core.responses import ChainTooLong, ResponseStore, StoredResponse, owner_of
from grokgate.observability.metrics import Metrics
from grokgate.providers.base import Call
from grokgate.providers.router import prompt_shape
from grokgate.schemas.responses import (
    FunctionTool,
    MessageItem,
    ResponsesChatRequest,
    ResponsesRequest,
    ServerTool,
)
from grokgate.serving.lifecycle import CallOptions
from grokgate.serving.responses_wire import Keeping, ResponsesWire, new_id
from grokgate.serving.wire import Framing

MAX_LIST_LIMIT = 100
_EFFORTS = {"none": None, "xhigh": "high"}  # Responses efforts chat lacks, as the nearest chat value
_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def not_found(response_id: str, param: str) -> GatewayError:
    return GatewayError(404, "not_found", f"No response with id '{response_id}' was found.", param=param)


class ResponsesService:
    """The Responses API for one app (app.py builds it once)."""

    def __init__(self, store: ResponseStore, metrics: Metrics, framing: Framing, *, retention_ms: int,
                 max_stored_bytes: int, max_chain_bytes: int, max_messages: int) -> None:
        self.store = store
        self.framing = framing
        self.keeping = Keeping(store, metrics, retention_ms, max_stored_bytes)
        self.max_chain_bytes = max_chain_bytes
        self.max_messages = max_messages

    async def prepare(self, body: ResponsesRequest, options: CallOptions) -> tuple[Call, ResponsesWire]:
        """The lifecycle's call (the translated request and its prompt bound) and this request's wire format.
        Raises 404 for a `previous_response_id` this principal has not stored (or that expired), 400 for a chain
        longer than the server's bounds (`max_messages` items with this turn's, `max_chain_bytes`)."""
        owner = options.tenant
        # A reasoning item without its encrypted content reaches no backend (see `_stateless_reasoning`): it is
        # neither sent nor kept, so it cannot fill the store for the price of a few prompt tokens.
        items = [item for item in map(turn_item, body.input) if not _stateless_reasoning(item)]
        history: list[JSONObject] = []
        if body.previous_response_id is not None:
            for stored in await self.chain(owner, body.previous_response_id, len(items)):
                history += stored.input_items
                history += stored.output
        request = translate(body, history, items)
        native = request.responses_body
        # The bound covers the whole conversation (instructions, tools and schemas included) as the backend gets it.
        prompt = prompt_token_bound(orjson.dumps(native), prompt_shape(request))
        now = time.time()
        wire = ResponsesWire(self.framing, self.keeping, echo(body, new_id("resp"), int(now)), owner=owner,
                             input_items=items, created_ms=int(now * 1000))
        return options.call(request, prompt), wire

    async def chain(self, owner: str, previous_id: str, turn_items: int) -> list[StoredResponse]:
        """The owner's conversation ending with `previous_id`, oldest first (also serving/stored_chat.py's, for
        xAI's stored chat completions): 404 naming `previous_response_id` when it is not found, 400 past the
        bounds with this turn's `turn_items`."""
        try:
            chain = await self.store.chain(owner, previous_id, max_items=max(self.max_messages - turn_items, 0),
                                           max_bytes=self.max_chain_bytes)
        except ChainTooLong:
            raise bad_request(
                f"The conversation of previous_response_id is too long: at most {self.max_messages} items (with "
                f"this request's input) and {self.max_chain_bytes} bytes are accepted. Start a new conversation "
                "with the items it needs.", "previous_response_id") from None
        if not chain:
            raise not_found(previous_id, "previous_response_id")
        return chain

    # -- stored responses --------------------------------------------------------------------------------------

    async def _get(self, principal: Principal, response_id: str) -> StoredResponse:
        stored = await self.store.get(owner_of(principal.account_id, principal.key_id), response_id)
        if stored is None:
            raise not_found(response_id, "response_id")
        return stored

    async def retrieve(self, principal: Principal, response_id: str) -> dict[str, Any]:
        """The response object as the client received it."""
        return dict((await self._get(principal, response_id)).response)

    async def delete(self, principal: Principal, response_id: str) -> dict[str, Any]:
        if not await self.store.delete(owner_of(principal.account_id, principal.key_id), response_id):
            raise not_found(response_id, "response_id")
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    async def input_items(self, principal: Principal, response_id: str, *, limit: int = 20,
                          order: Literal["asc", "desc"] = "desc", after: str | None = None,
                          before: str | None = None) -> dict[str, Any]:
        """OpenAI's list object of the response's input items (this turn's), newest first by default. `after` and
        `before` are item ids, in the listed order; an id that is not among the items is a 400."""
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise bad_request(f"limit must be between 1 and {MAX_LIST_LIMIT}.", "limit")
        stored = await self._get(principal, response_id)
        items = list(reversed(stored.input_items)) if order == "desc" else list(stored.input_items)
        for cursor, param in ((after, "after"), (before, "before")):
            if cursor is None:
                continue
            at = next((i for i, item in enumerate(items) if item.get("id") == cursor), None)
            if at is None:
                raise bad_request(f"No input item with id '{cursor}' in response '{response_id}'.", param)
            items = items[at + 1:] if param == "after" else items[:at]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0].get("id") if page else None,
                "last_id": page[-1].get("id") if page else None, "has_more": len(items) > limit}


# -- the translation -------------------------------------------------------------------------------------------


def turn_item(item: BaseModel) -> JSONObject:
    """An input item as stored and sent on: every key the client gave, `type` set, an id (`msg_`, `fc_`, `fco_`)
    when it had none, a message's string content as one text part (`output_text` for the assistant's)."""
    data: dict[str, Any] = item.model_dump(by_alias=True, exclude_none=True)
    if isinstance(item, MessageItem):
        data["type"] = "message"
        if isinstance(item.content, str):
            data["content"] = ([{"type": "output_text", "text": item.content, "annotations": []}]
                               if item.role == "assistant" else [{"type": "input_text", "text": item.content}])
        data.setdefault("status", "completed")
    if "id" not in data:
        data["id"] = new_id(_ID_PREFIXES.get(str(data.get("type")), "item"))
    return data


def translate(body: ResponsesRequest, history: list[JSONObject], items: list[JSONObject]) -> ResponsesChatRequest:
    """The request as chat fields, validated by chat's own model, with the native body attached."""
    conversation = history + items
    chat: dict[str, Any] = {"model": body.model, "messages": chat_messages(body.instructions, conversation),
                            "stream": bool(body.stream)}
    if body.max_output_tokens is not None:
        chat["max_completion_tokens"] = body.max_output_tokens
    for name in ("temperature", "top_p", "user", "parallel_tool_calls"):
        value = getattr(body, name)
        if value is not None:
            chat[name] = value
    cache_key = body.cache_key()  # every backend's conversation id (serving/affinity.py)
    if cache_key is not None:
        chat["prompt_cache_key"] = cache_key
    functions = [t for t in body.tools or () if isinstance(t, FunctionTool)]
    server_tools = [str(t.type) for t in body.tools or () if isinstance(t, ServerTool)]
    if functions:
        chat["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in functions]
        choice = body.tool_choice
        if isinstance(choice, str):
            chat["tool_choice"] = choice
        elif choice is not None:
            chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    text_format = body.text.format if body.text is not None else None
    if text_format is not None:
        spec = text_format.model_dump(by_alias=True, exclude_none=True)
        kind = spec.pop("type")
        chat["response_format"] = {"type": kind, "json_schema": spec} if kind == "json_schema" else {"type": kind}
    if body.reasoning is not None and body.reasoning.effort is not None:
        effort = _EFFORTS.get(body.reasoning.effort, body.reasoning.effort)
        if effort is not None:
            chat["reasoning_effort"] = effort
    try:
        request = ResponsesChatRequest.model_validate(chat)
    except ValidationError as exc:  # a conversation chat cannot carry: not expected of a valid body, never a 500
        first = exc.errors(include_url=False, include_input=False)[0]
        raise bad_request(f"The conversation cannot be served: {first['msg']}.", "input") from None
    return request.attach(native_body(body, conversation), server_tools)


_PARAMS = {"response_format": "text.format", "max_completion_tokens": "max_output_tokens",
           "max_tokens": "max_output_tokens"}


def responses_param(param: str | None, body: ResponsesRequest) -> str | None:
    """A chat field named by an error (a backend checks the translated request, see `translate`) as the field of
    the Responses request that carried it: `response_format` is `text.format`, a function's `tools[i]` is its
    place among all the request's tools, a message is in `input`."""
    if param is None:
        return None
    head, dot, rest = param.partition(".")
    if head in _PARAMS:
        return _PARAMS[head] + dot + rest
    if head.startswith("messages"):
        return "input"
    if head.startswith("tools[") and head.endswith("]") and head[6:-1].isdigit():
        functions = [i for i, t in enumerate(body.tools or ()) if isinstance(t, FunctionTool)]
        index = int(head[6:-1])
        if index < len(functions):
            return f"tools[{functions[index]}]" + ("." + rest.removeprefix("function.") if rest else "")
    return param


def chat_messages(instructions: str | None, items: list[JSONObject]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if instructions is not None:
        messages.append({"role": "system", "content": instructions})
    assistant: dict[str, Any] | None = None  # the assistant message function calls join
    for item in items:
        kind = item.get("type") or "message"
        if kind == "message":
            role = str(item.get("role"))
            message = _assistant_message(item.get("content")) if role == "assistant" else {
                "role": role, "content": _chat_content(item.get("content"))}
            messages.append(message)
            assistant = message if role == "assistant" else None
        elif kind == "function_call":
            call = {"id": str(item.get("call_id")), "type": "function",
                    "function": {"name": str(item.get("name") or ""), "arguments": str(item.get("arguments") or "")}}
            if assistant is None:
                assistant = {"role": "assistant", "content": None}
                messages.append(assistant)
            assistant.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": str(item.get("call_id")),
                             "content": _chat_content(item.get("output"))})
            assistant = None
        # reasoning and server-side tool items: not part of a chat prompt
    return messages


def _chat_content(content: Any) -> Any:
    """Responses content (a string or parts) as chat content: text parts, image_url parts."""
    if not isinstance(content, list):
        return content if isinstance(content, str) else ""
    parts: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "input_image":
            image: dict[str, Any] = {"url": part.get("image_url")}
            if part.get("detail") is not None:
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            text = part.get("refusal") if kind == "refusal" else part.get("text")
            parts.append({"type": "text", "text": text if isinstance(text, str) else ""})
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts or ""


def _assistant_message(content: Any) -> dict[str, Any]:
    """An assistant message: its text joined, its refusal apart; with images, the parts as chat content parts."""
    if not isinstance(content, list):
        return {"role": "assistant", "content": content if isinstance(content, str) else ""}
    parts = [p for p in content if isinstance(p, dict)]
    refusals = [str(p.get("refusal") or "") for p in parts if p.get("type") == "refusal"]
    message: dict[str, Any] = {"role": "assistant"}
    if any(p.get("type") == "input_image" for p in parts):
        message["content"] = _chat_content([p for p in parts if p.get("type") != "refusal"])
    else:
        message["content"] = "".join(str(p.get("text") or "") for p in parts if p.get("type") != "refusal")
    if refusals:
        message["refusal"] = "".join(refusals)
    return message


# Never sent on: what grokgate keeps itself (the conversation), and fields whose work grokgate could neither
# reserve for nor serve (a background response, xAI's deprecated Live Search billed per source, a stored prompt
# or conversation of the backend's).
_NOT_FORWARDED = {"input", "instructions", "previous_response_id", "background", "search_parameters",
                  "conversation", "prompt"}


def native_body(body: ResponsesRequest, conversation: list[JSONObject]) -> dict[str, Any]:
    """The client's body for a backend that speaks the Responses API: `input` the whole conversation (the
    instructions first, as a system message: xAI refuses `instructions` beside a history; reasoning items only
    with their encrypted content), without `previous_response_id`, and `store: false`."""
    native = body.model_dump(by_alias=True, exclude_unset=True, exclude=_NOT_FORWARDED)
    items: list[JSONObject] = []
    if body.instructions is not None:
        items.append({"type": "message", "role": "system", "content": body.instructions})
    items += (_native_item(item) for item in conversation if not _stateless_reasoning(item))
    native["input"] = items
    native["store"] = False
    return native


def _stateless_reasoning(item: JSONObject) -> bool:
    """A reasoning item without its encrypted content (one grokgate made from reasoning text, or one the backend
    sent without `include: ["reasoning.encrypted_content"]`): the backend keeps no state (`store: false`), so it
    could not resolve it, and the summary alone is not input it reads."""
    return item.get("type") == "reasoning" and not item.get("encrypted_content")


def _native_item(item: JSONObject) -> JSONObject:
    """An item as a backend receives it again: messages, calls and outputs without grokgate's ids (the backend
    never saw them), an assistant's text parts as one string; reasoning and tool items exactly as it made them."""
    kind = item.get("type")
    if kind not in _ID_PREFIXES:
        return item
    out = {k: v for k, v in item.items() if k != "id" and not (kind == "message" and k == "status")}
    content = out.get("content")
    if kind == "message" and out.get("role") == "assistant" and isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "output_text" for p in content):
        out["content"] = "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
    return out


def echo(body: ResponsesRequest, response_id: str, created_at: int) -> dict[str, Any]:
    """The response object before any output: its id and the request's settings, as OpenAI echoes them."""
    text = body.text.model_dump(by_alias=True, exclude_none=True) if body.text is not None else {}
    text.setdefault("format", {"type": "text"})
    choice = body.tool_choice
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls,
        "metadata": body.metadata or {},
        "model": body.model,
        "output": [],
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "reasoning": (body.reasoning.model_dump(exclude_none=True) if body.reasoning is not None
                      else {"effort": None, "summary": None}),
        "store": body.keep,
        "temperature": body.temperature,
        "text": text,
        "tool_choice": choice.model_dump() if isinstance(choice, BaseModel) else choice or "auto",
        "tools": [tool.model_dump(by_alias=True, exclude_none=True) for tool in body.tools or ()],
        "top_logprobs": body.top_logprobs,
        "top_p": body.top_p,
        "truncation": body.truncation or "disabled",
        "usage": None,
        "user": body.user,
    }


__all__ = ["ResponsesService", "ResponsesWire", "chat_messages", "echo", "native_body", "translate", "turn_item"]
