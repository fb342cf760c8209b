"""Function calling on the embedded engine, done by grokgate around llama.cpp.

Why not llama.cpp's own tool support: with this xllamacpp build it renders `tools` into the prompt but applies
no grammar for the Qwen 2.5 template (even with `tool_choice: required`), so the small model answers with the
call's JSON as text; and it refuses a custom grammar next to `tools`. So grokgate does the three parts itself,
in the model's own (Hermes / Qwen 2.5) format, the one its chat template describes:

1. the prompt: the tools are listed in the system message exactly as the template words it; earlier assistant
   tool calls become `<tool_call>` blocks and tool results `<tool_response>` blocks in a user turn
   (`render_messages`), so llama.cpp's template sees plain messages;
2. the grammar (llguidance's Lark dialect, which this build uses for JSON schemas too): calls in each shape the
   model was measured to write them (a `<tool_call>` block, bare JSON, a ```json fence; several separated by
   newlines, at most MAX_CALLS), each an object `{"name", "arguments"}` whose name is an offered function and
   whose arguments satisfy its parameter schema (`%json`), at any temperature. `required` or a named function
   forces calls; `auto` also allows a text answer that does not start like a call, or with `response_format` a
   JSON answer valid against its schema;
3. the output: providers/local_tool_parser.py turns the streamed text back into text, an answer, or whole calls.

Measured with this build: a grammar llguidance cannot compile is ignored, not refused (the output comes back
unconstrained), so the parser checks the shape it gets and a forced call that does not come is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from grokgate.core.errors import GatewayError, bad_request
from grokgate.providers.local_tool_parser import CLOSE, OPEN, ToolCallParser, call_key, malformed
from grokgate.schemas.chat import ChatCompletionRequest, ToolCall

# The words of Qwen 2.5's chat template (tokenizer.chat_template in the GGUF) when it is given tools.
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_TOOLS_INTRO = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                "\"arguments\": <args-json-object>}\n</tool_call>")

MAX_CALLS = 8  # parallel calls in one answer: the grammar ends the answer there (a small model may not stop)

# A text answer under `auto`: anything that does not start like a call (a `{`, a `[`, a `<tool_call>`, a ```json
# fence around an object) and never spells a call's object (`{"name`, `{'name`); braces and code are free
# otherwise. Calls have their own branch, so the model is not pushed to write one as text.
_TEXT_RULE = (r'TEXT: /[^\s{\[<](?s:.*)/ & ~/```[ \t]*(json|JSON)?[ \t]*\n?\s*[{\[](?s:.*)/'
              r""" & ~/(?s:.*)\{\s*["']name(?s:.*)/""")
# A text answer where no call may come (tool_choice "none" with tools, and the answer after a repeated call, see
# providers/local_tool_parser.py): the model still wants to write a call there, and writes it as text in many
# shapes (quoted keys, a fence...) unless objects with quoted keys are ruled out; code with braces stays possible.
_TEXT_ONLY_RULE = (r"""TEXT: /[^<`{\[\s(](?s:.*)/ & ~/(?s:.*)\{\s*["'](?s:.*)/"""
                   r""" & ~/(?s:.*)```[ \t]*(json|JSON)(?s:.*)/""")
TEXT_ONLY_GRAMMAR = "%llguidance {}\nstart: TEXT\n" + _TEXT_ONLY_RULE + "\n"


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one request's tools are offered and decoded; None from `plan_tools` when no call may happen."""

    tools: list[dict[str, Any]]  # as the client sent them (rendered into the system message)
    names: list[str]  # the functions a call may name
    forced: bool  # `required` or a named function: the answer is calls only
    parallel: bool
    answer: dict[str, Any] | None = None  # the structured answer's JSON schema (response_format), if any

    def grammar(self, made: int = 0) -> str:
        """One llguidance grammar: calls in the shapes the model writes, or (under `auto`) a text answer or, with a
        response_format, a JSON answer valid against its schema. With `made` calls already made (a continuation,
        see providers/local_jobs.py), more calls or nothing."""
        by_name = {t["function"]["name"]: t["function"] for t in self.tools}
        lines = ["%llguidance {}"]
        if made:
            lines.append("start: calls?")
        elif self.forced:
            lines.append("start: calls")
        else:
            lines.append("start: calls | answer" if self.answer is not None else "start: calls | TEXT | intro calls")
        more = f" (SEP call){{0,{MAX_CALLS - 1 - made}}}" if self.parallel and MAX_CALLS - 1 - made > 0 else ""
        lines.append(f"calls: call{more}")
        lines.append(r"SEP: /\n{1,2}/")
        lines.append("call: tagged | fenced | fn")
        lines.append("tagged: " + _json(OPEN + "\n") + " fn " + _json("\n" + CLOSE))
        lines.append('fenced: "```json\\n" fn "\\n```"')
        shapes = []
        for name in self.names:
            parameters = by_name[name].get("parameters") or {"type": "object", "properties": {}}
            if "type" not in parameters:  # properties without a type: still an object (check_tools refuses others)
                parameters = {"type": "object", **parameters}
            shapes.append({"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
                           "required": ["name", "arguments"], "additionalProperties": False})
        lines.append("fn: %json " + _json(shapes[0] if len(shapes) == 1 else {"anyOf": shapes}))
        if self.forced or made:
            pass
        elif self.answer is not None:
            lines.append("answer: %json " + _json(self.answer))
        else:
            lines.append(_TEXT_RULE)
            # "Here is the call:" on a line of its own, then the call: the model's way of announcing one.
            lines.append(r"intro[lazy]: /[^\s{\[<][^\n]*:\n\n?/")
        return "\n".join(lines) + "\n"


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool | None,
               answer: dict[str, Any] | None = None) -> ToolPlan | None:
    """The plan for a request's `tools`, `tool_choice`, `parallel_tool_calls` and structured answer schema
    (already validated: a named function is one of the tools, see `check_choice`)."""
    functions = [t for t in tools or () if t.get("type") == "function"]
    if not functions or tool_choice == "none":
        return None
    names = [t["function"]["name"] for t in functions]
    forced = tool_choice == "required"
    if isinstance(tool_choice, dict):
        # A named function is one call to it, as OpenAI answers it (a small model would otherwise call it again
        # with other arguments until its output cap).
        return ToolPlan(tools=functions, names=[tool_choice["function"]["name"]], forced=True, parallel=False)
    return ToolPlan(tools=functions, names=names, forced=forced, parallel=parallel is not False, answer=answer)


def answer_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema a structured answer must satisfy (`response_format`), or None for text."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    return fmt.json_schema.schema_ or {"type": "object"}


def answered_calls(messages: list[dict[str, Any]]) -> frozenset[str]:
    """The calls (name + canonical arguments) whose results end the conversation: the model writing one of them
    again means it wants to answer from the result (providers/local_tool_parser.py `retry`)."""
    if not messages or messages[-1].get("role") != "tool":
        return frozenset()
    results = {m.get("tool_call_id") for m in messages if m.get("role") == "tool"}
    keys = set()
    for message in messages:
        for call in message.get("tool_calls") or () if message.get("role") == "assistant" else ():
            if call.get("id") in results:
                try:
                    arguments = orjson.loads(call["function"]["arguments"] or "{}")
                except orjson.JSONDecodeError:
                    continue
                keys.add(call_key(call["function"]["name"], arguments))
    return frozenset(keys)


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
    return plan_tools(tools, _dump(request.tool_choice), request.parallel_tool_calls, answer_schema(request))


def parser_for(plan: ToolPlan, answered: frozenset[str] = frozenset(),
               messages: list[dict[str, Any]] | None = None) -> ToolCallParser:
    context = "\n".join(_text(m.get("content")) for m in messages or ()).lower()
    return ToolCallParser(plan.names, plan.forced, answers=plan.answer is not None and not plan.forced,
                          answered=answered if not plan.forced else frozenset(), context=context)


def continuation(payload: dict[str, Any], plan: ToolPlan, made: list[tuple[str, Any]]) -> dict[str, Any]:
    """The engine request that asks for more calls after those `made`, written back as the template's
    `<tool_call>` blocks: the model stops after one call in the other shapes, but goes on after blocks (it made
    the second call of BFCL's parallel questions in this form), and the prompt before them is in the slot's cache."""
    blocks = "".join(_call_block(name, _json(arguments)) + "\n" for name, arguments in made)
    return {**payload, "messages": [*payload["messages"], {"role": "assistant", "content": blocks}],
            "grammar": plan.grammar(made=len(made))}


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


def probe_grammar(grammar: str) -> str:
    """A request-sized check of a tools grammar: the same rules, forced to start with a marker. This engine ignores
    a grammar llguidance cannot compile (an unknown type, a dangling $ref...) instead of refusing it, so a one-token
    completion under this grammar that does not start with the marker means the schemas cannot be enforced."""
    return grammar.replace("\nstart: ", "\nstart: " + _json(PROBE_MARK) + " probed\nprobed: ", 1)


PROBE_MARK = "\u00a7\u00a7"  # "§§": nothing a model writes first unprompted


def schema_error(answer_refused: bool = False) -> GatewayError:
    """A grammar the engine cannot enforce: the tools' schemas, or the structured answer's (`answer_refused`)."""
    if answer_refused:
        return GatewayError(400, "bad_request", "The local engine cannot constrain its answer to the structured "
                            "output's JSON schema (a JSON Schema feature it does not support?): simplify it.",
                            param="response_format")
    return malformed()


def answer_grammar(plan: ToolPlan) -> str | None:
    """The structured answer's schema alone, to tell whose schema the engine refused."""
    return None if plan.answer is None else "%llguidance {}\nstart: answer\nanswer: %json " + _json(plan.answer) + "\n"

def _call_block(name: str, arguments: str) -> str:
    return f'{OPEN}\n{{"name": {_json(name)}, "arguments": {arguments.strip() or "{}"}}}\n{CLOSE}'


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def _json(value: Any) -> str:
    # The template's `tojson`: ", " and ": " separators, non-ASCII kept.
    return json.dumps(value, ensure_ascii=False)

