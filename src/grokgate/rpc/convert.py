"""xAI's `GetCompletionsRequest` (protobuf) -> the chat-completion body every backend serves, at the boundary.

The body is built as JSON and validated by the same code as an HTTP body (api/body.py `parse_raw`), so the ranges,
the bounds and the field names in errors are HTTP's: `temperature`, `messages[2].role`... (the proto's own field
names, which are the chat body's). What has no chat equivalent:
- refused (INVALID_ARGUMENT naming it): file content, server-side tools (web search, X search, code execution,
  collections, MCP, attachments, image generation: served over /v1/responses), live search turned on, a message
  without a role, a non-finite float, tool parameters or a JSON schema that are not a JSON object;
- ignored: `use_encrypted_content`, `include`, `max_turns`, `agent_count`, `service_tier`, `guidelines` (they
  steer xAI's own agent loop and logging), a message's `encrypted_content`.
`previous_response_id` and `store_messages` are the stored conversation's (rpc/chat.py).
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from xai_sdk.proto.v6 import chat_pb2, image_pb2

from grokgate.api.errors import MAX_JSON_DEPTH
from grokgate.core.errors import GatewayError, bad_request
from grokgate.schemas.chat import ITEMS_PER_MESSAGE, MAX_STOP, MAX_TOOLS

_ROLES = {chat_pb2.ROLE_USER: "user", chat_pb2.ROLE_ASSISTANT: "assistant", chat_pb2.ROLE_SYSTEM: "system",
          chat_pb2.ROLE_TOOL: "tool", chat_pb2.ROLE_DEVELOPER: "developer", chat_pb2.ROLE_FUNCTION: "tool"}
_EFFORTS = {chat_pb2.EFFORT_LOW: "low", chat_pb2.EFFORT_MEDIUM: "medium", chat_pb2.EFFORT_HIGH: "high",
            chat_pb2.EFFORT_XHIGH: "high", chat_pb2.EFFORT_NONE: None}
_MODES = {chat_pb2.TOOL_MODE_AUTO: "auto", chat_pb2.TOOL_MODE_NONE: "none", chat_pb2.TOOL_MODE_REQUIRED: "required"}
_DETAILS = {image_pb2.DETAIL_LOW: "low", image_pb2.DETAIL_HIGH: "high"}
_FLOATS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")
_INTS = ("n", "max_tokens", "seed", "top_logprobs")


def chat_body(request: chat_pb2.GetCompletionsRequest, *, stream: bool) -> dict[str, Any]:
    """The request as a chat-completion body (to be validated as JSON by api/body.py `parse_raw`)."""
    body: dict[str, Any] = {"model": request.model, "messages": [_message(m, i) for i, m in
                                                                  enumerate(request.messages)]}
    if stream:
        body["stream"] = True
    for name in _INTS:
        if request.HasField(name):
            body[name] = getattr(request, name)
    for name in _FLOATS:
        if request.HasField(name):
            value = getattr(request, name)
            if not math.isfinite(value):
                raise bad_request(f"Invalid '{name}': must be a finite number.", name)
            body[name] = value
    if request.user:
        body["user"] = request.user
    if request.stop:
        body["stop"] = list(request.stop)
    if request.logprobs:
        body["logprobs"] = True
    if request.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.HasField("reasoning_effort"):
        effort = _EFFORTS.get(request.reasoning_effort, "")
        if effort == "":
            raise bad_request("Invalid 'reasoning_effort': unknown value.", "reasoning_effort")
        if effort is not None:
            body["reasoning_effort"] = effort
    if request.tools:
        body["tools"] = [_tool(t, i) for i, t in enumerate(request.tools)]
    if request.HasField("tool_choice"):
        body["tool_choice"] = _tool_choice(request.tool_choice)
    if request.HasField("response_format"):
        body["response_format"] = _response_format(request.response_format)
    if request.HasField("search_parameters") and request.search_parameters.mode == chat_pb2.ON_SEARCH_MODE:
        raise bad_request("Live search is not served: use the web_search tool over /v1/responses.",
                          "search_parameters")
    return body


def _message(message: chat_pb2.Message, i: int) -> dict[str, Any]:
    role = _ROLES.get(message.role)
    if role is None:
        raise bad_request(f"Invalid 'messages[{i}].role': a message needs a role (user, assistant, system, "
                          "developer or tool).", f"messages[{i}].role")
    out: dict[str, Any] = {"role": role}
    parts = [_part(c, i, j) for j, c in enumerate(message.content)]
    if all(p["type"] == "text" for p in parts):
        text = "".join(p["text"] for p in parts)
        out["content"] = text if text or not message.tool_calls else None
    else:
        out["content"] = parts
    if message.name:
        out["name"] = message.name
    if role == "assistant" and message.reasoning_content:
        out["reasoning_content"] = message.reasoning_content
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": c.function.arguments}} for c in message.tool_calls]
    if role == "tool":
        out["tool_call_id"] = message.tool_call_id if message.HasField("tool_call_id") else ""
    return out


def _part(content: chat_pb2.Content, i: int, j: int) -> dict[str, Any]:
    kind = content.WhichOneof("content")
    if kind == "text":
        return {"type": "text", "text": content.text}
    if kind == "image_url" and content.image_url.image_url:
        image = content.image_url
        return {"type": "image_url",
                "image_url": {"url": image.image_url, "detail": _DETAILS.get(image.detail, "auto")}}
    param = f"messages[{i}].content[{j}]"
    if kind is None:
        raise bad_request(f"Invalid '{param}': a content part needs text or an image.", param)
    raise bad_request(f"Invalid '{param}': files are not served by grokgate; send text or image URLs.", param)


def _tool(tool: chat_pb2.Tool, i: int) -> dict[str, Any]:
    kind = tool.WhichOneof("tool")
    if kind != "function":
        raise bad_request(f"Invalid 'tools[{i}]': only function tools are served over gRPC ({kind or 'empty'} "
                          "is not); server-side tools are served over /v1/responses.", f"tools[{i}]")
    function = tool.function
    out: dict[str, Any] = {"name": function.name}
    if function.description:
        out["description"] = function.description
    if function.parameters:
        out["parameters"] = _json_object(function.parameters, f"tools[{i}].function.parameters")
    if function.strict:
        out["strict"] = True
    return {"type": "function", "function": out}


def _tool_choice(choice: chat_pb2.ToolChoice) -> Any:
    kind = choice.WhichOneof("tool_choice")
    if kind == "function_name":
        return {"type": "function", "function": {"name": choice.function_name}}
    mode = _MODES.get(choice.mode) if kind == "mode" else None
    if mode is None:
        raise bad_request("Invalid 'tool_choice': a mode (auto, none, required) or a function name.", "tool_choice")
    return mode


def _response_format(form: chat_pb2.ResponseFormat) -> dict[str, Any]:
    if form.format_type == chat_pb2.FORMAT_TYPE_TEXT:
        return {"type": "text"}
    if form.format_type == chat_pb2.FORMAT_TYPE_JSON_OBJECT:
        return {"type": "json_object"}
    if form.format_type == chat_pb2.FORMAT_TYPE_JSON_SCHEMA:
        schema = _json_object(form.schema, "response_format.schema") if form.HasField("schema") else {}
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}
    raise bad_request("Invalid 'response_format.format_type': text, json_object or json_schema.",
                      "response_format.format_type")


def _json_object(text: str, param: str) -> dict[str, Any]:
    """A JSON object, nested at most as deep as an HTTP body may be (orjson reads 1024 levels but writes 254)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise GatewayError(400, "bad_request", f"Invalid '{param}': must be a JSON object.", param=param)
    if _depth(value) > MAX_JSON_DEPTH:
        raise GatewayError(400, "bad_request", f"Invalid '{param}': nested too deeply (at most {MAX_JSON_DEPTH} "
                                               "levels of arrays and objects).", param=param)
    return value


def _depth(value: Any) -> int:
    """How deep arrays and objects nest in `value`, without recursion (the value may be 1024 levels deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in node if isinstance(child, dict | list))
    return deepest


def check_counts(request: chat_pb2.GetCompletionsRequest, max_messages: int) -> None:
    """HTTP's list bounds (api/body.py `check_counts`), on the message's own lists before anything is built from
    them: messages, tools, stop sequences, content parts and tool calls of all messages together."""
    if len(request.messages) > max_messages:
        raise bad_request(f"Too many messages: at most {max_messages} are accepted.", "messages")
    for name, most in (("tools", MAX_TOOLS), ("stop", MAX_STOP)):
        count = len(getattr(request, name))
        if count > most:
            raise bad_request(f"Invalid '{name}': at most {most} items are accepted, not {count}.", name)
    limit = ITEMS_PER_MESSAGE * max_messages
    parts = calls = 0
    for i, message in enumerate(request.messages):
        parts += len(message.content)
        calls += len(message.tool_calls)
        if parts > limit:
            raise bad_request(f"Too many content parts: at most {limit} are accepted in all messages together.",
                              f"messages[{i}].content")
        if calls > limit:
            raise bad_request(f"Too many tool calls: at most {limit} are accepted in all messages together.",
                              f"messages[{i}].tool_calls")
