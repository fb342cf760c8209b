"""Function calling on the embedded engine, done by grokgate around llama.cpp.

Why not llama.cpp's own tool support: with this xllamacpp build it renders `tools` into the prompt but applies
no grammar for the Qwen 2.5 template (even with `tool_choice: required`), so the small model answers with the
call's JSON as text; and it refuses a custom grammar next to `tools`. So grokgate does the three parts itself,
in the model's own (Hermes / Qwen 2.5) format, the one its chat template describes:

1. the prompt: the tools are listed in the system message exactly as the template words it; earlier assistant
   tool calls become `<tool_call>` blocks and tool results `<tool_response>` blocks in a user turn
   (`render_messages`), so llama.cpp's template sees plain messages;
2. the grammar (llguidance's Lark dialect, which this build uses for JSON schemas too): one
   `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` block per call, the name one of the offered
   functions and the arguments that function's parameter schema (`%json`), so they parse and satisfy the
   schema at any temperature. `required` or a named function forces a call; `auto` lets the model answer in
   text instead, a text that can neither start like a call nor hold a JSON object (`{"`), so a call's JSON
   never lands in `content`;
3. the output: `ToolCallParser` turns the streamed text back into OpenAI's tool-call deltas.

Measured with this build: a grammar llguidance cannot compile is ignored, not refused (the output comes back
unconstrained), so the parser checks the shape it gets and a forced call that does not come is an error.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

import orjson

from grokgate.core.errors import GatewayError, bad_request
from grokgate.core.events import JSONObject
from grokgate.schemas.chat import ChatCompletionRequest, ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"

# The words of Qwen 2.5's chat template (tokenizer.chat_template in the GGUF) when it is given tools.
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_TOOLS_INTRO = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                "\"arguments\": <args-json-object>}\n</tool_call>")

# A text answer under `auto` (and `none` with tools): not starting like a call or a bare JSON value, and no `{` at
# all. A small model writes a call as text in many shapes (quoted keys, unquoted keys, in a fence); forbidding only
# `{"` let `{ name: "get_weather", ... }` through at high temperature. The cost: such text answers carry no braces.
_TEXT_RULE = r'text: /[^<`{\[\s(][^{]*/'
# tool_choice "none" with tools: a text answer only, with the same rule (the history may show calls to imitate).
TEXT_ONLY_GRAMMAR = "%llguidance {}\nstart: text\n" + _TEXT_RULE + "\n"


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one request's tools are offered and decoded; None from `plan_tools` when no call may happen."""

    tools: list[dict[str, Any]]  # as the client sent them (rendered into the system message)
    names: list[str]  # the functions a call may name
    forced: bool  # `required` or a named function: the answer is calls only
    parallel: bool

    def grammar(self) -> str:
        by_name = {t["function"]["name"]: t["function"] for t in self.tools}
        lines = ["%llguidance {}"]
        calls = "call" if not self.parallel else 'call ("\\n" call)*'
        lines.append(f"start: {calls}" if self.forced else f"start: {calls} | text")
        if not self.forced:
            lines.append(_TEXT_RULE)
        lines.append("call: " + " | ".join(f"call{i}" for i in range(len(self.names))))
        for i, name in enumerate(self.names):
            head = _lark_string(f'{OPEN}\n{{"name": {_json(name)}, "arguments": ')
            lines.append(f"call{i}: {head} args{i} {_lark_string('}' + chr(10) + CLOSE)}")
            parameters = by_name[name].get("parameters") or {"type": "object", "properties": {}}
            if "type" not in parameters:  # properties without a type: still an object (check_tools refuses others)
                parameters = {"type": "object", **parameters}
            lines.append(f"args{i}: %json {_json(parameters)}")
        return "\n".join(lines) + "\n"


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool | None) -> ToolPlan | None:
    """The plan for a request's `tools`, `tool_choice` and `parallel_tool_calls` (already validated: a named
    function is one of the tools, see `check_choice`)."""
    functions = [t for t in tools or () if t.get("type") == "function"]
    if not functions or tool_choice == "none":
        return None
    names = [t["function"]["name"] for t in functions]
    forced = tool_choice == "required"
    if isinstance(tool_choice, dict):
        # A named function is one call to it, as OpenAI answers it (a small model would otherwise call it again
        # with other arguments until its output cap).
        return ToolPlan(tools=functions, names=[tool_choice["function"]["name"]], forced=True, parallel=False)
    return ToolPlan(tools=functions, names=names, forced=forced, parallel=parallel is not False)


def choice_error(tools: list[dict[str, Any]] | None, tool_choice: Any) -> str | None:
    """Why a named `tool_choice` cannot be honoured, or None."""
    if not isinstance(tool_choice, dict):
        return None
    name = tool_choice.get("function", {}).get("name")
    if name not in {t["function"]["name"] for t in tools or () if t.get("type") == "function"}:
        return f"tool_choice names the function '{name}', which is not among `tools`."
    return None


def tool_plan(request: ChatCompletionRequest) -> ToolPlan | None:
    tools = [t.model_dump(exclude_none=True) for t in request.tools or ()]
    return plan_tools(tools, _dump(request.tool_choice), request.parallel_tool_calls)


def check_tools(request: ChatCompletionRequest) -> None:
    """Refuse, naming the field, the tool requests the engine cannot honour."""
    tools = [t.model_dump(exclude_none=True) for t in request.tools or ()]
    choice = _dump(request.tool_choice)
    if (why := choice_error(tools, choice)) is not None:
        raise bad_request(why, "tool_choice")
    if choice == "required" and not tools:
        raise bad_request("tool_choice 'required' needs `tools`.", "tool_choice")
    for i, tool in enumerate(tools):
        parameters = tool.get("function", {}).get("parameters")
        if parameters is not None and parameters.get("type", "object") != "object":
            # Arguments are a JSON object (OpenAI refuses other schemas too); the call's decoder relies on it.
            raise bad_request("A function's parameters must be a JSON schema of type 'object'.",
                              f"tools[{i}].function.parameters")
    if tool_plan(request) is not None and request.stop_list:
        # A stop sequence can end the answer inside a call's arguments, leaving JSON that does not parse.
        raise bad_request("The local engine cannot apply stop sequences together with function tools: drop "
                          "`stop`, or set tool_choice to 'none'.", "stop")
    if tool_plan(request) is not None and request.response_format is not None \
            and request.response_format.type != "text":
        # Both are grammars, and the engine applies one per request.
        raise bad_request("The local engine cannot combine `response_format` with function tools: drop one, or "
                          "set tool_choice to 'none'.", "response_format")


def check_arguments(index: int, calls: list[ToolCall]) -> None:
    # llama.cpp parses every call's arguments to render the chat template and answers a 500 with its parser's
    # message when they are not JSON. orjson refuses what its parser refuses (NaN, 1e400, empty text).
    for j, call in enumerate(calls):
        try:
            orjson.loads(call.function.arguments)
        except orjson.JSONDecodeError:
            raise bad_request("Tool call arguments must be JSON text (the local engine reads them).",
                              f"messages[{index}].tool_calls[{j}].function.arguments") from None



def _dump(value: Any) -> Any:
    return value.model_dump(exclude_none=True) if hasattr(value, "model_dump") else value


def render_messages(messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[dict[str, Any]]:
    """Chat messages (already `developer` -> `system`) as the template would render them with tools, in plain
    system/user/assistant messages: tool calls and results in the model's own tags."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "assistant" and message.get("tool_calls"):
            text = _text(message.get("content"))
            blocks = [_call_block(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + "\n".join(blocks)})
        elif role == "tool":
            block = f"<tool_response>\n{_text(message.get('content'))}\n</tool_response>"
            if out and out[-1].get("_tool"):  # consecutive results share one user turn, as in the template
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            out.append(message)
    for message in out:
        message.pop("_tool", None)
    if plan is not None:
        listing = "".join("\n" + _json(tool) for tool in plan.tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": _text(out[0].get("content")) + _TOOLS_INTRO + listing + _TOOLS_OUTRO}
        else:
            out.insert(0, {"role": "system", "content": DEFAULT_SYSTEM + _TOOLS_INTRO + listing + _TOOLS_OUTRO})
    return out


_HEAD = re.compile(r'\s*<tool_call>\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class ToolCallParser:
    """Turns one choice's streamed text into content and OpenAI tool-call fragments.

    Fragments follow OpenAI's stream: the first of a call carries `index`, `id`, `type` and `function.name`
    (with empty arguments), later ones `index` and argument text."""

    def __init__(self, plan: ToolPlan) -> None:
        self._plan = plan
        self._buffer = ""
        self._mode = "start"  # start | text | head | args | tail
        self._calls = 0
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._seen: set[str] = set()
        self._pending: list[JSONObject] = []  # a later call's fragments, held until it proves no repeat
        self._name = ""
        self._arguments = ""
        self.done = False  # the model repeated a call: the answer is complete, stop the generation

    @property
    def calls(self) -> int:
        return self._calls

    def feed(self, text: str) -> tuple[str, list[JSONObject]]:
        """Content to pass on, and tool-call fragments, for the next piece of output."""
        if self._mode == "text":
            return text, []
        if self.done:
            return "", []
        self._buffer += text
        fragments: list[JSONObject] = []
        out = self._pending if self._calls else fragments
        while self._buffer:
            if self._mode == "start":
                stripped = self._buffer.lstrip()
                if not stripped or (OPEN.startswith(stripped) and stripped != OPEN):
                    break  # could still become a call
                if not stripped.startswith(OPEN) and not self._plan.forced:
                    self._mode, content, self._buffer = "text", self._buffer, ""
                    return content, fragments
                self._mode = "head"
            if self._mode == "head":
                match = _HEAD.match(self._buffer)
                if match is None:
                    if len(self._buffer) > 4096 or not _could_be_head(self._buffer):
                        raise _malformed()
                    break
                self._buffer = self._buffer[match.end():]
                name = orjson.loads(f'"{match.group(1)}"')
                out = self._pending if self._calls else fragments
                out.append({"index": self._calls, "id": f"call_{secrets.token_hex(12)}", "type": "function",
                            "function": {"name": name, "arguments": ""}})
                self._name, self._arguments = name, ""
                self._mode, self._depth, self._in_string, self._escape = "args", 0, False, False
            if self._mode == "args":
                if self._depth == 0:  # whitespace before the arguments' `{` is no part of them
                    self._buffer = self._buffer.lstrip()
                end = self._scan()
                piece = self._buffer[:end]
                if piece:
                    out.append({"index": self._calls, "function": {"arguments": piece}})
                    self._arguments += piece
                self._buffer = self._buffer[end:]
                if self._depth > 0 or not piece:
                    break
                # The small model tends to repeat its call until max_tokens: an identical call adds nothing.
                try:
                    parsed = orjson.loads(self._arguments)
                except orjson.JSONDecodeError:
                    raise _malformed() from None
                key = self._name + "\0" + orjson.dumps(parsed, option=orjson.OPT_SORT_KEYS).decode()
                if key in self._seen:
                    self._pending.clear()
                    self.done = True
                    return "", fragments
                self._seen.add(key)
                fragments += self._pending
                self._pending.clear()
                self._mode = "tail"
                self._calls += 1
            if self._mode == "tail":
                at = self._buffer.find(CLOSE)
                if at < 0:
                    break
                self._buffer = self._buffer[at + len(CLOSE):]
                self._mode = "start"
        return "", fragments

    def _scan(self) -> int:
        """How much of the buffer belongs to the arguments' JSON (which ends where its depth returns to 0)."""
        for i, ch in enumerate(self._buffer):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return len(self._buffer)

    def finish(self, reason: str) -> str:
        """The choice's finish_reason; an error if a forced call never came (the grammar was not applied)."""
        if self._mode == "text":
            return reason
        if self.done:
            return "tool_calls"
        if self._calls and reason == "stop" and self._mode in ("start", "tail"):
            return "tool_calls"
        if reason == "stop" and self._plan.forced:
            raise _malformed()
        return reason


def probe_grammar(grammar: str) -> str:
    """A request-sized check of a tools grammar: the same rules, forced to start with a marker. This engine ignores
    a grammar llguidance cannot compile (an unknown type, a dangling $ref...) instead of refusing it, so a one-token
    completion under this grammar that does not start with the marker means the schemas cannot be enforced."""
    return grammar.replace("\nstart: ", "\nstart: " + _json(PROBE_MARK) + " probed\nprobed: ", 1)


PROBE_MARK = "\u00a7\u00a7"  # "§§": nothing a model writes first unprompted


def schema_error() -> GatewayError:
    return _malformed()


def _could_be_head(buffer: str) -> bool:
    # A prefix of a call's opening (up to the arguments) with the name still being written.
    probe = buffer.lstrip()
    template = f'{OPEN}\n{{"name": "'
    if len(probe) <= len(template):
        return template.startswith(probe)
    return probe.startswith(template) and "\n" not in probe[len(template):]


def _malformed() -> GatewayError:
    return GatewayError(400, "bad_request", "The local engine could not constrain its output to the functions' "
                        "parameter schemas (a JSON Schema feature it does not support?): simplify the schemas in "
                        "`tools`.", param="tools")


def _call_block(name: str, arguments: str) -> str:
    return f'{OPEN}\n{{"name": {_json(name)}, "arguments": {arguments.strip() or "{}"}}}\n{CLOSE}'


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def _json(value: Any) -> str:
    # The template's `tojson`: ", " and ": " separators, non-ASCII kept.
    return json.dumps(value, ensure_ascii=False)


def _lark_string(text: str) -> str:
    return _json(text)
