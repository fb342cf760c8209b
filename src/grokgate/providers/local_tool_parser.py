"""The embedded engine's output under a tools grammar (providers/local_tools.py) turned back into an answer: text,
a structured answer, or whole tool calls.

The grammar lets the model write a call in any of the shapes it was measured to use (docs/benchmarks.md, "BFCL on
the local engine"): a `<tool_call>` block (its chat template's form), a bare JSON object, or one in a ```json fence,
one call or several separated by newlines. Each call is handed on whole, the way xAI streams them (one delta
holding the name and all the arguments; OpenAI's clients accept that too), once its JSON is complete: a call is
never half-sent, so a cut call can be dropped.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import orjson

from grokgate.core.errors import GatewayError
from grokgate.core.events import JSONObject

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FENCE = "```"
_FENCED_CALL = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?\s*[{\[]")
_FIRST_KEY = re.compile(r'\{\s*"((?:[^"\\]|\\.)*)"')


def call_key(name: str, arguments: Any) -> str:
    """A call's identity: its name and its arguments, canonical (key order and spacing do not count)."""
    return name + "\0" + orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS).decode()


class ToolCallParser:
    """Turns one choice's streamed text into content and whole tool calls.

    `answered` holds the calls (name + canonical arguments) whose results the conversation already has: a model
    that writes one of them again as its first call means to use the result, not to call again (a small model
    copies the call it sees above); `retry` then says the answer should be generated as text instead.

    `context` is the conversation's text, lowercased: a call after the first whose text arguments appear neither
    there nor in an earlier call of this answer is the model inventing work (at the default temperature it went on
    from "the weather in Paris" to London, Tokyo, Berlin...), and ends the answer."""

    def __init__(self, names: list[str], forced: bool, answers: bool = False,
                 answered: frozenset[str] = frozenset(), context: str = "") -> None:
        self._context = context
        self._intro = not forced and not answers  # the grammar's `intro calls` branch (auto, text answers)
        self._line = ""  # the first line's text sent so far (mode "intro")
        self._from_intro: str | None = None  # calls after an intro line: the blank text held between them
        self._leaves: set[str] = set()
        self.made: list[tuple[str, Any]] = []  # the calls handed on, for a continuation's prompt
        self._names = set(names)
        self._forced = forced
        self._answers = answers  # a structured answer (JSON) may come instead of calls
        self._answered = answered
        self._buffer = ""
        self._mode = "start"  # start | intro | text | calls
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._object_at = -1  # where the JSON value being scanned starts in the buffer
        self._scanned = 0
        self._seen: set[str] = set()
        self._calls = 0
        self.done = False  # nothing more is wanted from the model: stop the generation
        self.retry = False  # the model repeated an answered call: answer in text instead (see the class doc)

    @property
    def calls(self) -> int:
        return self._calls

    def feed(self, text: str) -> tuple[str, list[JSONObject]]:
        """Content to pass on, and whole tool calls, for the next piece of output."""
        if self._mode == "intro":
            return self._after_intro(text)
        if self._mode == "text":
            return text, []
        if self.done:
            return "", []
        self._buffer += text
        if self._mode == "start":
            stripped = self._buffer.lstrip()
            if not stripped or _could_open(stripped):
                return "", []  # could still become a call
            if not _opens_call(stripped):
                if self._forced:
                    raise malformed()
                if self._intro:  # the first line may announce calls: content, watched until it ends
                    self._mode, pending, self._buffer = "intro", self._buffer, ""
                    return self._after_intro(pending)
                self._mode, content, self._buffer = "text", self._buffer, ""
                return content, []
            self._mode = "calls"
        return self._take_calls()

    def _take_calls(self) -> tuple[str, list[JSONObject]]:
        out: list[JSONObject] = []
        while not self.done:
            if self._object_at < 0:
                # Between calls: markup (`<tool_call>`, a fence, `</tool_call>`, newlines) up to the next `{`.
                at = self._buffer.find("{")
                if at < 0:
                    if len(self._buffer) > 4096:
                        return self._broken(out)
                    return "", out
                self._object_at, self._scanned = at, at
                self._depth, self._in_string, self._escape = 0, False, False
            if self._answers and not self._calls and self._mode == "calls":
                first = _FIRST_KEY.match(self._buffer, self._object_at)
                if first is None and len(self._buffer) - self._object_at < 512:
                    return "", out  # the first key decides between a call and a structured answer
                if first is None or first.group(1) not in ("name", "arguments"):
                    # A structured answer: streamed as content from here (a call's object starts with its name).
                    self._mode, content, self._buffer = "text", self._buffer[self._object_at:], ""
                    return content, out
            end = self._scan()
            if end < 0:
                return "", out
            raw, self._buffer = self._buffer[self._object_at:end], self._buffer[end:]
            self._object_at = -1
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError:
                if self._from_intro is not None and not self._calls:
                    return self._as_text(raw)
                return self._broken(out)
            call = self._call(value)
            if call is None:  # a structured answer whose first key is "name" (the grammar's answer branch)
                if self._from_intro is not None and not self._calls:
                    return self._as_text(raw)
                if not self._answers or self._calls:
                    return self._broken(out)
                self._mode, content, self._buffer = "text", raw + self._buffer, ""
                return content, out
            name, arguments = call
            key = call_key(name, arguments)
            if key in self._seen or (key in self._answered and not self._calls):
                # The small model tends to repeat a call until max_tokens: an identical call adds nothing, and a
                # first call the conversation already answered means the model wants to answer.
                self.retry = not self._calls
                self.done = True
                return "", out
            if key in self._answered or (self._calls and not self._grounded(arguments)):
                self.done = True  # later calls repeating answered ones end the answer; the new ones stand
                return "", out
            self._seen.add(key)
            self._leaves |= set(_strings(arguments))
            self.made.append((name, arguments))
            out.append({"index": self._calls, "id": f"call_{secrets.token_hex(12)}", "type": "function",
                        "function": {"name": name, "arguments": orjson.dumps(arguments).decode()}})
            self._calls += 1
        return "", out

    def _after_intro(self, text: str) -> tuple[str, list[JSONObject]]:
        """Text whose first line may end "...:" and be followed by calls (the grammar's `intro calls`): the line is
        content; what follows it is held until it shows whether it opens a call."""
        self._buffer += text
        line, newline, rest = self._buffer.partition("\n")
        if not newline:
            content, self._buffer = self._buffer, ""  # still the first line: content as it comes
            self._line += content
            return content, []
        if not (self._line + line).rstrip().endswith(":"):
            self._mode, content, self._buffer = "text", self._buffer, ""
            return content, []
        head = rest.lstrip("\n")
        if (not head and len(rest) < 2) or (head and _could_open(head)):
            return "", []  # the line ended with a colon: what comes next decides
        if head and _opens_call(head) and not head.startswith("["):
            self._mode, self._buffer, self._from_intro = "calls", head, rest[:len(rest) - len(head)]
            content, calls = self._take_calls()
            return line + newline + content, calls
        self._mode, content, self._buffer = "text", self._buffer, ""
        return content, []

    def flush(self) -> str:
        """Text held at the end of the output: an intro line with nothing after it, or what followed it and was no
        call (cut)."""
        if self._mode == "intro" or (self._mode == "calls" and self._from_intro is not None and not self._calls):
            self._mode, content, self._buffer = "text", (self._from_intro or "") + self._buffer, ""
            return content
        return ""

    def _as_text(self, raw: str) -> tuple[str, list[JSONObject]]:
        """What followed an intro line was text after all (an object that is no call: the grammar's TEXT allows
        it)."""
        self._mode, content, self._buffer = "text", (self._from_intro or "") + raw + self._buffer, ""
        return content, []

    def _broken(self, out: list[JSONObject]) -> tuple[str, list[JSONObject]]:
        """Output no grammar rule allows (the engine ignored the grammar): an error, unless calls were handed on
        already, which stand (the answer ends there)."""
        if not self._calls and not out:
            raise malformed()
        self.done = True
        return "", out

    def _grounded(self, arguments: Any) -> bool:
        return all(leaf in self._leaves or leaf.lower() in self._context for leaf in _strings(arguments))

    def resume(self) -> None:
        """Read a continuation of the answer (more calls after those made, or nothing)."""
        self._mode, self._buffer, self._object_at, self.done = "calls", "", -1, False

    def _call(self, value: Any) -> tuple[str, Any] | None:
        if (isinstance(value, dict) and set(value) == {"name", "arguments"} and value["name"] in self._names
                and isinstance(value["arguments"], dict)):
            return value["name"], value["arguments"]
        return None

    def _scan(self) -> int:
        """The end of the JSON value starting at `_object_at`, or -1 while it is incomplete."""
        buffer = self._buffer
        for i in range(self._scanned, len(buffer)):
            ch = buffer[i]
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
        self._scanned = len(buffer)
        return -1

    def finish(self, reason: str) -> str:
        """The choice's finish_reason. A call cut by the output cap after complete ones is dropped and the answer
        ends `tool_calls`: it ends `length` only when its only call or its text reached the cap."""
        if (self._mode in ("text", "intro") and not self._calls) or self.retry:
            return reason
        if self._calls:
            return "tool_calls"
        if reason == "stop" and (self._forced or self._mode == "calls"):
            raise malformed()  # the grammar was not applied (see providers/local_tools.py probe_grammar)
        return reason


def _strings(value: Any) -> list[str]:
    """The text values in a call's arguments (keys are the schema's, not the model's invention)."""
    if isinstance(value, str):
        return [value] if len(value.strip()) > 1 else []
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _could_open(text: str) -> bool:
    """Whether `text` (stripped) is still a prefix of a call's opening: more output decides."""
    if (OPEN.startswith(text) and text != OPEN) or FENCE.startswith(text):
        return True
    if text.startswith(FENCE):
        head = text.split("\n", 1)
        # "```", "```js", "```json" with the line unfinished, or a fence line followed by blank space only
        return len(head) == 1 or not head[1].strip()
    return False


def _opens_call(text: str) -> bool:
    return text.startswith((OPEN, "{", "[")) or _FENCED_CALL.match(text) is not None


def malformed() -> GatewayError:
    return GatewayError(400, "bad_request", "The local engine could not constrain its output to the functions' "
                        "parameter schemas (a JSON Schema feature it does not support?): simplify the schemas in "
                        "`tools`.", param="tools")
