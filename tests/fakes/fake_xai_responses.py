"""xAI's own Responses API on the fake xAI server (tests/fakes/fake_xai.py): ``POST /v1/responses``,
``GET /v1/responses/{id}``, ``DELETE /v1/responses/{id}``.

What it follows: xAI's recorded replies (vercel/ai packages/xai/src/responses/__fixtures__: xai-web-search-tool,
xai-x-search-tool, xai-text-with-reasoning-streaming[-store-false], issue-17936), docs.x.ai (the Responses API is
stateful: ``store`` defaults to true and responses are kept 30 days; ``previous_response_id`` continues one;
``instructions`` cannot be combined with it; ``include: ["reasoning.encrypted_content"]`` is the one include; server
side tools ``web_search``, ``x_search``, ``code_interpreter`` / ``code_execution``; usage fields
``num_server_side_tools_used`` and ``server_side_tool_usage_details``) and openai-python's
``src/openai/types/responses/`` for the stream events.

Replies (same auth, errors, faults and ``x-fake-*`` headers as ``/v1/chat/completions``; a queued fault is taken by
whichever POST comes next):

* ids are bare UUIDs (``<uuid>``; items ``msg_<id>``, ``rs_<id>``, ``ws_<id>_call_<n>``, ``ctc_<id>_xs_call_<n>``,
  ``fc_<id>_<n>``), ``object: "response"``, the request's settings echoed, ``store`` as asked (default true).
* text: ``content`` (as chat) in a ``message`` item with one ``output_text`` part. ``max_output_tokens`` below its
  word count truncates it, ``status: "incomplete"``, ``incomplete_details: {"reason": "max_output_tokens"}``.
  ``text.format`` ``json_schema``: a JSON document valid for the schema instead; ``json_object``:
  ``{"answer": content}``.
* function tools (``{"type": "function", "name", "parameters"}``), ``tool_choice`` not "none", and the last input item
  not a ``function_call_output``: one ``function_call`` of the first function (or the one ``tool_choice`` names),
  ``call_id`` :data:`TOOL_CALL_ID`, arguments a JSON object valid for its parameters schema (:func:`example`). As at
  xAI, the item comes whole in ``response.output_item.added`` (no argument deltas). After a ``function_call_output``:
  text.
* server-side tools, each run once (at most ``max_tool_calls``) before the message: ``web_search`` -> a
  ``web_search_call`` item (``action: {type: "search", query, sources: []}``); ``x_search`` -> a ``custom_tool_call``
  named ``x_keyword_search``; ``code_interpreter`` / ``code_execution`` -> a ``code_interpreter_call``. With a search
  tool the message's ``output_text`` carries ``url_citation`` annotations for :data:`CITATIONS`.
* reasoning models: ``reasoning_tokens = 7``. A ``reasoning`` item comes first when ``include`` has
  ``reasoning.encrypted_content`` (then with ``encrypted_content``) or for grok-3-mini (summary
  :data:`REASONING_TEXT`; other models' summary is empty).
* usage: ``input_tokens = 10 + words`` of ``instructions`` and every text of the conversation (the stored chain of
  ``previous_response_id`` included, as xAI bills it), ``cached_tokens`` from ``x-fake-cached-tokens``, else the
  prompt caches (``cache_servers``: tests/fakes/fake_xai.py; the id is ``prompt_cache_key``, else ``x-grok-conv-id``);
  ``output_tokens`` = words sent + words of the call's arguments + reasoning tokens (xAI counts reasoning inside it
  here: ``total_tokens = input + output``); ``num_server_side_tools_used`` = tool items, and
  ``server_side_tool_usage_details`` (``web_search_calls``, ``x_search_calls``, ``code_interpreter_calls``...) when
  server-side tools were given.
* stream: ``event: <type>`` + ``data: <json>`` frames, ``sequence_number`` from 0, no ``[DONE]``: created,
  in_progress, per item added ... done (reasoning summary part/text events; ``web_search_call.in_progress`` /
  ``searching`` / ``completed``; ``custom_tool_call_input.delta`` / ``done``; a message's ``content_part.added``,
  ``output_text.delta`` in ``chunks`` pieces, ``output_text.annotation.added``, ``output_text.done``,
  ``content_part.done``), then ``response.completed`` (or ``response.incomplete``) with the whole response.
* faults besides chat's: ``failed`` (stream: ``response.failed`` with an ``error`` after in_progress, or after
  ``after`` text deltas of the message; non-stream: a 500; ``echo=1`` quotes the Authorization header in its
  message); ``no_usage`` gives ``usage: null``.

Validation (``strict``): missing ``model`` / ``input`` (422), unknown model (404), ``instructions`` with
``previous_response_id``, an unknown ``previous_response_id`` (404), ``include`` other than
``reasoning.encrypted_content``, ``reasoning.effort`` off grok-3-mini (or not low/high), penalties and ``stop`` on
reasoning models, ``max_output_tokens`` < 1, ``temperature`` outside 0..2, ``top_p`` outside 0..1, a function tool
without ``name`` (e.g. chat's nested shape), an unknown tool type, ``max_tool_calls`` < 1, a ``json_schema`` format
without ``schema``.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tests.fakes.fake_xai import (
    CITATIONS,
    FINGERPRINT,
    KNOWN_MODELS,
    REASONING_TEXT,
    TOOL_CALL_ID,
    _error,
    _filler,
    _Raw,
    _split,
    echoed,
    is_reasoning,
    usd_ticks,
    words,
)

if TYPE_CHECKING:
    from tests.fakes.fake_xai import FakeXAI

SERVER_TOOLS = {"web_search": "web_search_calls", "x_search": "x_search_calls",
                "code_interpreter": "code_interpreter_calls", "code_execution": "code_interpreter_calls",
                "file_search": "file_search_calls", "mcp": "mcp_calls", "collections_search": "document_search_calls"}
ENCRYPTED = "ZmFrZS1lbmNyeXB0ZWQtcmVhc29uaW5n"  # what a reasoning item's encrypted_content holds here


def example(schema: Any) -> Any:
    """A small value valid for a JSON schema (the subset tools and formats use)."""
    if not isinstance(schema, dict):
        return {}
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        return {name: example(sub) for name, sub in props.items()}
    if kind == "array":
        return [example(schema["items"])] if isinstance(schema.get("items"), dict) and schema.get("minItems") else []
    if kind == "string":
        return "Paris"
    if kind == "integer":
        return max(1, int(schema.get("minimum", 1)))
    if kind == "number":
        return float(schema.get("minimum", 1.5))
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return {}


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


def _items(value: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": value}] if isinstance(value, str) else [i for i in value if isinstance(i, dict)]


def _item_words(item: dict[str, Any]) -> int:
    kind = item.get("type")
    if kind == "function_call_output":
        return words(str(item.get("output") or ""))
    if kind == "function_call":
        return words(str(item.get("arguments") or ""))
    return sum(words(t) for t in _texts(item.get("content")))


def _item_texts(item: dict[str, Any]) -> list[str]:
    """The texts `_item_words` counts, for the prompt caches' comparison."""
    kind = item.get("type")
    if kind == "function_call_output":
        return [str(item.get("output") or "")]
    if kind == "function_call":
        return [str(item.get("arguments") or "")]
    return _texts(item.get("content"))


def _frame(kind: str, seq: int, payload: dict[str, Any]) -> bytes:
    data = orjson.dumps({"sequence_number": seq, "type": kind, **payload})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


class FakeResponses:
    def __init__(self, fake: FakeXAI) -> None:
        self.fake = fake

    # ----- endpoints -----------------------------------------------------------------------------------------------
    async def get(self, request: Request) -> Response:
        denied = self.fake._auth(self.fake._record(request, b""))
        if denied is not None:
            return denied
        stored = self.fake.stored.get(request.path_params["response_id"])
        if stored is None:
            return _error(404, f"Response with id '{request.path_params['response_id']}' not found")
        return Response(orjson.dumps(stored["response"]), media_type="application/json")

    async def delete(self, request: Request) -> Response:
        denied = self.fake._auth(self.fake._record(request, b""))
        if denied is not None:
            return denied
        rid = request.path_params["response_id"]
        if self.fake.stored.pop(rid, None) is None:
            return _error(404, f"Response with id '{rid}' not found")
        return Response(orjson.dumps({"id": rid, "object": "response", "deleted": True}), media_type="application/json")

    async def create(self, request: Request) -> Response:
        body, _, headers, fault, answered = await self.fake._json_post(request, "input", "model")
        if answered is not None:
            return answered
        if not isinstance(body["input"], str | list):
            return _error(422, "Failed to deserialize the JSON body into the target type: input: invalid type")
        model = str(body["model"])
        if self.fake.strict:
            if model not in KNOWN_MODELS:
                return _error(404, f"The model {model} does not exist or your team does not have access to it.")
            problem = self._validate(body, model)
            if problem:
                return _error(400, problem)
        previous = body.get("previous_response_id")
        history: list[dict[str, Any]] = []
        if previous is not None:
            stored = self.fake.stored.get(str(previous))
            if stored is None:
                return _error(404, f"Response with id '{previous}' not found")
            history = [*stored["input"], *stored["response"]["output"]]
        return self._answer(body, model, history, headers, fault)

    @staticmethod
    def _validate(body: dict[str, Any], model: str) -> str | None:
        def given(key: str) -> bool:
            return body.get(key) is not None

        if given("instructions") and given("previous_response_id"):
            return "Invalid argument: instructions cannot be used together with previous_response_id"
        for include in body.get("include") or ():
            if include != "reasoning.encrypted_content":
                return f"Invalid argument: unsupported include value {include!r}"
        effort = (body.get("reasoning") or {}).get("effort")
        if effort is not None:
            if model != "grok-3-mini":
                return f"Model {model} does not support parameter reasoningEffort."
            if effort not in ("low", "high"):
                return f"Invalid reasoning_effort {effort!r}: expected 'low' or 'high'"
        for key in ("presence_penalty", "frequency_penalty", "stop"):
            if given(key) and is_reasoning(model):
                return f"Model {model} does not support parameter {key}."
        if given("max_output_tokens") and (not isinstance(body["max_output_tokens"], int)
                                           or body["max_output_tokens"] < 1):
            return "Invalid argument: max_output_tokens must be at least 1"
        if given("temperature") and not 0 <= body["temperature"] <= 2:
            return "Invalid argument: temperature must be between 0 and 2"
        if given("top_p") and not 0 <= body["top_p"] <= 1:
            return "Invalid argument: top_p must be between 0 and 1"
        if given("max_tool_calls") and (not isinstance(body["max_tool_calls"], int) or body["max_tool_calls"] < 1):
            return "Invalid argument: max_tool_calls must be at least 1"
        for i, tool in enumerate(body.get("tools") or ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind == "function":
                if not isinstance(tool.get("name"), str):
                    return f"Invalid argument: tools[{i}]: a function tool needs `name`"
            elif kind not in SERVER_TOOLS:
                return f"Invalid argument: tools[{i}]: unknown tool type {kind!r}"
        fmt = (body.get("text") or {}).get("format") or {"type": "text"}
        if fmt.get("type") not in ("text", "json_object", "json_schema"):
            return f"Invalid argument: unknown text.format type {fmt.get('type')!r}"
        if fmt.get("type") == "json_schema" and not isinstance(fmt.get("schema"), dict):
            return "Invalid argument: text.format json_schema needs `schema`"
        return None

    # ----- the answer ----------------------------------------------------------------------------------------------
    def _answer(self, body: dict[str, Any], model: str, history: list[dict[str, Any]], headers: dict[str, str],
                fault: dict[str, Any] | None) -> Response:
        rid, created = str(uuid.uuid4()), int(time.time())
        items = _items(body["input"])
        prompt = 10 + words(str(body.get("instructions") or "")) + sum(_item_words(i) for i in [*history, *items])
        if headers.get("x-fake-prompt-tokens"):
            prompt = int(headers["x-fake-prompt-tokens"])
        conversation = body.get("prompt_cache_key")
        conversation = conversation if isinstance(conversation, str) else headers.get("x-grok-conv-id")
        opening = [("system", [str(body["instructions"])])] if body.get("instructions") else []
        messages = opening + [(str(i.get("role") or i.get("type")), _item_texts(i)) for i in [*history, *items]]
        cached = self.fake.cached_tokens(headers, conversation, messages, prompt)
        reasoning_tokens = 7 if is_reasoning(model) else 0
        tools = [t for t in body.get("tools") or () if isinstance(t, dict)]
        functions = [t for t in tools if t.get("type") == "function" and isinstance(t.get("name"), str)]
        server = [str(t["type"]) for t in tools if t.get("type") in SERVER_TOOLS]
        choice = body.get("tool_choice")
        answered_call = bool(items) and items[-1].get("type") == "function_call_output"
        output: list[dict[str, Any]] = []
        include = body.get("include") or []
        if is_reasoning(model) and ("reasoning.encrypted_content" in include or model == "grok-3-mini"):
            reasoning: dict[str, Any] = {
                "id": f"rs_{rid}", "type": "reasoning", "status": "completed",
                "summary": [{"type": "summary_text", "text": REASONING_TEXT}] if model == "grok-3-mini" else []}
            if "reasoning.encrypted_content" in include:
                reasoning["encrypted_content"] = ENCRYPTED
            output.append(reasoning)
        completion = 0
        status, incomplete = "completed", None
        if functions and choice != "none" and not answered_call:
            named = choice.get("name") if isinstance(choice, dict) else None
            tool = next((f for f in functions if f["name"] == named), functions[0])
            arguments = orjson.dumps(example(tool.get("parameters") or {"type": "object"})).decode()
            output.append({"arguments": arguments, "call_id": TOOL_CALL_ID, "name": tool["name"],
                           "type": "function_call", "id": f"fc_{rid}_0", "status": "completed"})
            completion += words(arguments)
        else:
            bound = body.get("max_tool_calls")
            ran = server[:bound] if isinstance(bound, int) else server
            query = next((t for i in reversed(items) for t in _texts(i.get("content"))), "")
            for n, kind in enumerate(ran):
                output.append(self._tool_item(kind, rid, n, query))
            text = self.fake.content
            if headers.get("x-fake-content-chars"):
                text = _filler(int(headers["x-fake-content-chars"]))
            fmt = (body.get("text") or {}).get("format") or {}
            if fmt.get("type") == "json_schema":
                text = orjson.dumps(example(fmt.get("schema"))).decode()
            elif fmt.get("type") == "json_object":
                text = orjson.dumps({"answer": text}).decode()
            limit = body.get("max_output_tokens")
            if isinstance(limit, int) and limit < words(text):
                text, status, incomplete = " ".join(text.split()[:limit]), "incomplete", {"reason": "max_output_tokens"}
            searched = any(k in ("web_search", "x_search") for k in ran)
            annotations = [{"type": "url_citation", "url": u, "title": u, "start_index": 0, "end_index": 0}
                           for u in CITATIONS] if searched else []
            output.append({"content": [{"type": "output_text", "text": text, "logprobs": [],
                                        "annotations": annotations}],
                           "id": f"msg_{rid}", "role": "assistant", "type": "message", "status": "completed"})
            completion += words(text)
        tool_items = [i for i in output if i["type"] not in ("message", "reasoning", "function_call")]
        usage: dict[str, Any] | None = {
            "input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion + reasoning_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt + completion + reasoning_tokens, "num_sources_used": 0,
            "num_server_side_tools_used": len(tool_items)}
        if server:
            details = dict.fromkeys(sorted(set(SERVER_TOOLS.values())), 0)
            for item in tool_items:
                key = {"web_search_call": "web_search_calls", "custom_tool_call": "x_search_calls"}.get(
                    item["type"], "code_interpreter_calls")
                details[key] += 1
            usage["server_side_tool_usage_details"] = details
        if self.fake.report_cost:  # xAI's own cost, in the Responses usage as in chat's (tests/fakes/fake_xai.py)
            usage["cost_in_usd_ticks"] = usd_ticks(prompt, cached, completion + reasoning_tokens)
        name = fault["fault"] if fault else None
        if name == "no_usage":
            usage = None
        store = body.get("store") is not False
        response = {
            "created_at": created, "id": rid, "max_output_tokens": body.get("max_output_tokens"), "model": model,
            "object": "response", "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
            "temperature": body.get("temperature"), "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": choice if choice is not None else "auto", "tools": tools, "top_p": body.get("top_p"),
            "usage": usage, "user": body.get("user"), "incomplete_details": incomplete, "status": status,
            "store": store, "metadata": {"system_fingerprint": FINGERPRINT, **(body.get("metadata") or {})},
            "max_tool_calls": body.get("max_tool_calls"), "error": None, "instructions": body.get("instructions")}
        if store and name != "failed":
            self.fake.stored[rid] = {"response": response, "input": [*history, *items]}
        if not body.get("stream"):
            if name == "failed":
                return _error(500, f"fake xAI fault failed{echoed(fault, headers)}")
            data = orjson.dumps(response)
            return _Raw(200, {"content-type": "application/json", "content-length": str(len(data))},
                        [data[:len(data) // 2], data[len(data) // 2:]], fault, after=1)
        delay = float(headers.get("x-fake-chunk-delay-ms") or 0) / 1000
        return _Raw(200, {"content-type": "text/event-stream", "cache-control": "no-cache"},
                    self._frames(response, name, fault, headers), fault, delay)

    @staticmethod
    def _tool_item(kind: str, rid: str, n: int, query: str) -> dict[str, Any]:
        if kind == "web_search":
            return {"id": f"ws_{rid}_call_{n}", "type": "web_search_call", "status": "completed",
                    "action": {"type": "search", "query": query, "sources": []}}
        if kind == "x_search":
            return {"call_id": f"xs_call_{n}", "input": orjson.dumps({"query": query, "limit": 10}).decode(),
                    "name": "x_keyword_search", "type": "custom_tool_call", "id": f"ctc_{rid}_xs_call_{n}",
                    "status": "completed"}
        return {"id": f"ci_{rid}_call_{n}", "type": "code_interpreter_call", "status": "completed",
                "code": "print(6 * 7)", "outputs": [{"type": "logs", "logs": "42"}]}

    def _frames(self, response: dict[str, Any], fault: str | None, spec: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None) -> list[bytes]:
        seq = 0
        frames: list[bytes] = []

        def emit(kind: str, **payload: Any) -> None:
            nonlocal seq
            frames.append(_frame(kind, seq, payload))
            seq += 1

        opening = {**response, "output": [], "usage": None, "status": "in_progress", "incomplete_details": None}
        emit("response.created", response=opening)
        emit("response.in_progress", response=opening)
        if fault == "failed":
            after = int((spec or {}).get("after", 0))
            message = next((i for i in response["output"] if i["type"] == "message"), None)
            if after and message is not None:
                emit("response.output_item.added", item={**message, "content": [], "status": "in_progress"},
                     output_index=0)
                for piece in _split(message["content"][0]["text"], self.fake.chunks)[:after]:
                    emit("response.output_text.delta", content_index=0, delta=piece, item_id=message["id"],
                         output_index=0, logprobs=[])
            error = {"code": "server_error", "message": f"fake xAI fault failed{echoed(spec, headers or {})}"}
            emit("response.failed", response={**opening, "status": "failed", "error": error})
            return frames
        for index, item in enumerate(response["output"]):
            kind, iid = item["type"], item["id"]
            if kind == "reasoning":
                emit("response.output_item.added", item={**item, "summary": [], "status": "in_progress"},
                     output_index=index)
                for s, part in enumerate(item["summary"]):
                    emit("response.reasoning_summary_part.added", item_id=iid, output_index=index,
                         part={"text": "", "type": "summary_text"}, summary_index=s)
                    for piece in _split(part["text"], 3):
                        emit("response.reasoning_summary_text.delta", delta=piece, item_id=iid, output_index=index,
                             summary_index=s)
                    emit("response.reasoning_summary_text.done", item_id=iid, output_index=index, summary_index=s,
                         text=part["text"])
                    emit("response.reasoning_summary_part.done", item_id=iid, output_index=index, part=part,
                         summary_index=s)
            elif kind == "message":
                part = item["content"][0]
                emit("response.output_item.added", item={**item, "content": [], "status": "in_progress"},
                     output_index=index)
                emit("response.content_part.added", content_index=0, item_id=iid, output_index=index,
                     part={**part, "text": "", "annotations": []})
                for piece in _split(part["text"], self.fake.chunks):
                    emit("response.output_text.delta", content_index=0, delta=piece, item_id=iid,
                         output_index=index, logprobs=[])
                for a, annotation in enumerate(part["annotations"]):
                    emit("response.output_text.annotation.added", annotation=annotation, annotation_index=a,
                         content_index=0, item_id=iid, output_index=index)
                emit("response.output_text.done", content_index=0, item_id=iid, output_index=index,
                     text=part["text"], logprobs=[])
                emit("response.content_part.done", content_index=0, item_id=iid, output_index=index, part=part)
            elif kind == "web_search_call":
                emit("response.output_item.added", item={**item, "status": "in_progress"}, output_index=index)
                for step in ("in_progress", "searching", "completed"):
                    emit(f"response.web_search_call.{step}", item_id=iid, output_index=index)
            elif kind == "custom_tool_call":
                emit("response.output_item.added", item={**item, "input": "", "status": "in_progress"},
                     output_index=index)
                emit("response.custom_tool_call_input.delta", item_id=iid, output_index=index, delta=item["input"])
                emit("response.custom_tool_call_input.done", item_id=iid, output_index=index, input=item["input"])
            else:  # function_call (whole, as xAI sends it), code_interpreter_call
                emit("response.output_item.added", item=item, output_index=index)
            emit("response.output_item.done", item=item, output_index=index)
        emit("response.incomplete" if response["status"] == "incomplete" else "response.completed", response=response)
        return frames
