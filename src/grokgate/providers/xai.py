"""xAI's API: the OpenAI-compatible adapter plus what xAI does differently (its request rules and its errors).

Requests are translated before they leave: `stop` becomes an array; reasoning models lose penalties and
`stop` (xAI would refuse them), grok-3 loses `presence_penalty`; `reasoning_effort` reaches only
grok-3-mini, mapped to low/high; `max_tokens` becomes `max_completion_tokens`; `developer` becomes
`system`; `logit_bias` and OpenAI-only fields are dropped; `top_logprobs` above xAI's 8 is clamped to 8.
Replies: usage is normalised to OpenAI arithmetic (core.usage), flat errors become our envelope, redacted
(upstream_errors.upstream_message), a wrong key's 400 is told from a bad request's by asking xAI about the key
alone (`XAIBackend.check_key`), `end_turn` becomes `stop` (core.completion), and `reasoning_content` and
`citations` pass through.

Prompt caching: xAI caches prompts per server, and sends every request of one conversation id to the same server
(docs.x.ai, "Prompt Caching: Maximizing Cache Hits"). A chat request's id (`cache_key`: the client's
`prompt_cache_key` or `x-grok-conv-id`, or one grokgate derived, serving/affinity.py) goes out as the
`x-grok-conv-id` header, the one Chat Completions reads, and `prompt_cache_key` leaves the chat body; a Responses
request keeps the client's `prompt_cache_key` in its body, or is given the derived one there.

A request of the Responses API (`request.responses_body` is not None) goes to xAI's own `/v1/responses`
instead, through the same attempt path (keys, breakers, retries before the first event: openai_compat `_send`
with this module's reader), and its reply becomes the same events:

- the body is the request's `responses_body` (the whole conversation in `input`), with the upstream model id,
  `stream` as the request's, `store: false` and no `previous_response_id` (grokgate keeps the conversation, so a
  chain survives a fallback to another backend), `max_output_tokens` = the output the admission reserved, and,
  when server-side tools are asked for, `max_tool_calls` at most the backend's `max_server_tool_calls` (what the
  reservation paid for). `reasoning.effort` reaches only grok-3-mini (low/high), as for chat.
- `response.output_text.delta` -> Delta(content); `response.reasoning_summary_text.delta` -> Delta(
  reasoning_content); a `function_call` item -> Delta(tool_calls) fragments like chat's (xAI sends the call whole
  in `response.output_item.added`; OpenAI-style `response.function_call_arguments.delta` fragments are read too);
  every other item (`reasoning` with its `encrypted_content`, `web_search_call`, `custom_tool_call` (X search),
  `code_interpreter_call`...) -> Item(0, item) at `response.output_item.done`; a message's `annotations`
  (url_citation) -> Extra({"annotations": [...], "citations": [urls]}).
- `response.completed` / `response.incomplete` -> Finish ("stop", "tool_calls" after a function call, "length"
  for `incomplete_details.reason: max_output_tokens`) then one UsageReport (core.usage
  normalise_responses_usage: cached and reasoning tokens once each, server-side tool calls counted);
  `response.failed` and `error` events -> GatewayError, like a chat stream's error chunk (the caller's 400 when
  the error's fields blame the request: upstream_errors.request_fault), its message redacted.

Tokenize (providers/base.py `Tokenizer`): xAI's `POST /v1/tokenize-text` (`{"text", "model"}` ->
`{"token_ids": [{"token_id", "string_token", "token_bytes"}]}`), sent like a request (keys rotated, a refusal judged
as for chat: openai_compat `_send`), within TOKENIZE_TIMEOUT. Context lengths and image input: `MODEL_FACTS`, from
xAI's models page (docs.x.ai "Models and Pricing"), by model id prefix.

Wire formats followed: xAI's recorded replies (vercel/ai packages/xai/src/responses/__fixtures__: web search,
X search, reasoning with and without `store`), and openai-python's src/openai/types/responses/ event types.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from grokgate.core.errors import GatewayError
from grokgate.core.events import JSON, Delta, Event, Extra, Finish, Item, JSONObject, UsageReport
from grokgate.core.usage import normalise_responses_usage
from grokgate.providers.base import Call, ModelFacts, Token, UpstreamFailure, register
from grokgate.providers.openai_compat import (
    BackendConfig,
    OpenAICompatBackend,
    read_json,
    reading_reply,
    server_tools_refused,
    sse_lines,
    stream_error,
)
from grokgate.providers.upstream_errors import KEY_CHECK_TIMEOUT, UpstreamKey, error_text
from grokgate.schemas.chat import CONVERSATION_HEADER, ChatCompletionRequest

XAI_TOP_LOGPROBS_MAX = 8
# ... and `prompt_cache_key`, which xAI's chat reads from the x-grok-conv-id header instead (XAIBackend).
OPENAI_ONLY = ("logit_bias", "service_tier", "store", "metadata", "modalities", "audio", "prediction",
               "prompt_cache_key")
# Public AceData names -> xAI model ids (configurable per route; these are the defaults).
DEFAULT_MODEL_IDS = {
    "grok-4": "grok-4-0709",
    "grok-4-1-fast": "grok-4-1-fast-reasoning",
    "grok-4-1-fast-non-reasoning": "grok-4-1-fast-non-reasoning",
    "grok-3": "grok-3",
    "grok-3-mini": "grok-3-mini",
    "grok-2-vision": "grok-2-vision-1212",
}


# xAI's context windows (tokens) and image input, by model id prefix: the longest matching prefix wins.
MODEL_FACTS: dict[str, ModelFacts] = {
    "grok-4-1-fast": ModelFacts(2_000_000, images=True),
    "grok-4-fast": ModelFacts(2_000_000, images=True),
    "grok-4": ModelFacts(256_000, images=True),
    "grok-code-fast": ModelFacts(256_000),
    "grok-3": ModelFacts(131_072),
    "grok-2-vision": ModelFacts(32_768, images=True),
}
TOKENIZE_TIMEOUT = 30.0  # seconds for the whole call, retries on other keys included


def model_facts(model_id: str) -> ModelFacts | None:
    prefixes = [p for p in MODEL_FACTS if model_id.startswith(p)]
    return MODEL_FACTS[max(prefixes, key=len)] if prefixes else None


def is_reasoning_model(model_id: str) -> bool:
    if "non-reasoning" in model_id:
        return False
    return model_id.startswith(("grok-4", "grok-3-mini", "grok-code")) or "reasoning" in model_id


def translate(body: dict[str, Any], model_id: str) -> dict[str, Any]:
    """An OpenAI-style request body -> one xAI accepts."""
    for name in OPENAI_ONLY:
        body.pop(name, None)
    if isinstance(body.get("stop"), str):
        body["stop"] = [body["stop"]]
    if "max_tokens" in body:
        limit = body.pop("max_tokens")
        body.setdefault("max_completion_tokens", limit)
    if is_reasoning_model(model_id):
        for name in ("presence_penalty", "frequency_penalty", "stop"):
            body.pop(name, None)
    elif model_id.startswith("grok-3"):
        body.pop("presence_penalty", None)
    effort = body.pop("reasoning_effort", None)
    if effort is not None and model_id.startswith("grok-3-mini"):
        body["reasoning_effort"] = "low" if effort in ("minimal", "low") else "high"
    if body.get("top_logprobs") is not None and body["top_logprobs"] > XAI_TOP_LOGPROBS_MAX:
        body["top_logprobs"] = XAI_TOP_LOGPROBS_MAX
    for message in body.get("messages", ()):
        if message.get("role") == "developer":
            message["role"] = "system"
    return body


class XAIBackend(OpenAICompatBackend):
    kind = "xai"
    # xAI answers a wrong key with 400 ("Incorrect API key provided"), the status of any invalid argument, and its
    # flat body's `code` is only the status's text; its 403 is "the key or team lacks permission or is blocked"
    # (tests/fakes/fake_xai.py). After either, the key is asked about alone (`check_key`).
    shared_statuses = (400, 403)

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        base = config.base_url.rstrip("/")
        self.responses_url = base + "/responses"
        self.key_url = base + "/api-key"
        self.tokenize_url = base + "/tokenize-text"

    async def check_key(self, key: UpstreamKey) -> bool | None:
        """xAI's `GET /v1/api-key`: a request with nothing of a caller's in it, so a refusal of it (400, 401, 403) is
        the key's, and its 200 says whether the key or its team is blocked or disabled. None when it cannot tell
        (unreachable, too slow, any other answer): the request's refusal then stands as the caller's."""
        try:
            async with asyncio.timeout(KEY_CHECK_TIMEOUT), self.session().get(
                    self.key_url, headers={"Authorization": f"Bearer {key.value}"}) as response:
                status = response.status
                body = await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None
        if status in (400, 401, 403):
            return True
        try:
            info = orjson.loads(body) if status == 200 else None
        except orjson.JSONDecodeError:
            info = None
        if not isinstance(info, dict):
            return None
        return any(info.get(flag) is True for flag in ("api_key_blocked", "api_key_disabled", "team_blocked"))

    def check(self, request: ChatCompletionRequest) -> None:
        # Server-side tools run only through /v1/responses: a chat request never carries them, but if one did it
        # must not reach /chat/completions, where xAI would refuse it after the reservation.
        if request.server_tools and request.responses_body is None:
            raise server_tools_refused(request, self.name)

    def payload(self, call: Call, upstream_model: str, stream: bool) -> dict[str, Any]:
        return translate(super().payload(call, upstream_model, stream), upstream_model)

    def request_headers(self, call: Call) -> dict[str, str]:
        # Chat Completions: the conversation id is a header (the Responses API's is in the body).
        if call.cache_key is None or call.request.responses_body is not None:
            return {}
        return {CONVERSATION_HEADER: call.cache_key}

    async def attempt(self, call: Call, model: str, tried: set[int]) -> AsyncGenerator[Event]:
        body = call.request.responses_body
        if body is None:
            return await super().attempt(call, model, tried)
        payload = responses_payload(call, body, model, self.config.max_server_tool_calls)
        return await self._send(payload, tried, url=self.responses_url, reader=self._responses_reply, call=call)

    def _responses_reply(self, response: aiohttp.ClientResponse, stream: bool) -> AsyncGenerator[Event]:
        return sse_events(response, self.secrets) if stream else json_events(response, self.secrets)

    # -- Tokenizer, DescribesModels (providers/base.py) ---------------------------------------------------------

    def describe(self, model: str) -> ModelFacts | None:
        return model_facts(model)

    async def tokenize(self, text: str, model: str) -> list[Token]:
        """xAI's tokens of `text` for `model`: on one key, then the next while the failure is the key's or the
        upstream's (a refusal of the request itself ends it, as for chat)."""
        tried: set[int] = set()
        failures: list[UpstreamFailure] = []
        try:
            async with asyncio.timeout(TOKENIZE_TIMEOUT):
                while self.available(tried):
                    try:
                        reply = await self._send({"text": text, "model": model}, tried, url=self.tokenize_url,
                                                 reader=_tokenize_reply)
                    except UpstreamFailure as failure:
                        if not failure.retryable:
                            raise failure.error from None
                        failures.append(failure)
                        continue
                    try:
                        event = await reply.__anext__()
                    except GatewayError:  # the reply broke: the backend's failure, as a chat reply's would be
                        self.failed()
                        raise
                    finally:
                        await reply.aclose()
                    assert isinstance(event, Extra)  # _tokenize_reply's only event
                    self.succeeded()
                    return _tokens(event.fields.get("token_ids"))
        except TimeoutError:
            raise GatewayError(504, "timeout", f"The upstream {self.name} did not tokenize the text in time.") from None
        if failures:
            raise failures[-1].error
        raise GatewayError(503, "upstream_unavailable", f"No usable key for {self.name}; retry shortly.",
                           headers={"retry-after": str(max(1, int(self.retry_in()) + 1))})


def responses_payload(call: Call, body: dict[str, Any], model_id: str,
                      max_server_tool_calls: int) -> dict[str, Any]:
    """The body sent to xAI's /v1/responses (the request's own body is left as it is)."""
    request = call.request
    out = dict(body)
    out["model"] = model_id
    out["stream"] = bool(request.stream)
    out["store"] = False
    out.pop("previous_response_id", None)
    # The conversation id as serving/affinity.py made it (the client's own, namespaced by its tenant), never the
    # client's raw `prompt_cache_key`: another tenant sending the same one must not share its cache.
    out.pop("prompt_cache_key", None)
    if call.cache_key is not None:
        out["prompt_cache_key"] = call.cache_key
    if call.output_limit is not None:  # the reserved cap (serving/lifecycle.py, Call.admitted)
        out["max_output_tokens"] = call.output_limit
    if request.server_tools:  # what the reservation paid for (serving/lifecycle.py)
        out["max_tool_calls"] = request.server_tool_calls(max_server_tool_calls)
    reasoning = out.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        reasoning = dict(reasoning)
        effort = reasoning.pop("effort")
        if model_id.startswith("grok-3-mini"):
            reasoning["effort"] = "low" if effort in ("minimal", "low") else "high"
        out["reasoning"] = reasoning
    return out


@dataclass
class _Call:
    index: int  # the tool call's index among this reply's function calls (chat's tool_calls[].index)
    call_id: str
    name: str
    arguments_sent: bool = False


class _Reply:
    """One Responses API reply turned into events, event by event (a stream) or item by item (JSON)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.calls: dict[str, _Call] = {}  # by item id
        self.ended = False
        self.secrets = tuple(secrets)  # the backend's keys: redacted from the upstream's messages

    def stream_event(self, event: dict[str, Any]) -> list[Event]:
        kind = event.get("type")
        if kind == "response.output_text.delta":
            delta = event.get("delta")
            return [Delta(0, content=delta)] if isinstance(delta, str) and delta else []
        if kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            delta = event.get("delta")
            return [Delta(0, reasoning_content=delta)] if isinstance(delta, str) and delta else []
        if kind == "response.output_item.added":
            item = event.get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                return self._call(item, whole=False)
            return []
        if kind == "response.function_call_arguments.delta":
            call = self.calls.get(str(event.get("item_id")))
            delta = event.get("delta")
            if call is None or not isinstance(delta, str) or not delta:
                return []
            call.arguments_sent = True
            return [Delta(0, tool_calls=[{"index": call.index, "function": {"arguments": delta}}])]
        if kind == "response.output_item.done":
            item = event.get("item")
            return self.item(item) if isinstance(item, dict) else []
        if kind in ("response.completed", "response.incomplete", "response.done", "response.failed"):
            response = event.get("response")
            return self.end(response if isinstance(response, dict) else {"status": "failed"})
        if kind == "error":
            raise stream_error(event, error_text(event, self.secrets))
        return []

    def item(self, item: dict[str, Any]) -> list[Event]:
        """A completed output item."""
        kind = item.get("type")
        if kind == "function_call":
            return self._call(item, whole=True)
        if kind == "message":
            annotations: list[JSON] = []
            for part in item.get("content") or ():
                if isinstance(part, dict):
                    annotations.extend(a for a in part.get("annotations") or () if isinstance(a, dict))
            if not annotations:
                return []
            urls: list[JSON] = [a["url"] for a in annotations
                                if isinstance(a, dict) and a.get("type") == "url_citation" and a.get("url")]
            return [Extra({"annotations": annotations, "citations": urls})]
        return [Item(0, item)]  # parsed by orjson: JSON all the way down

    def whole_item(self, item: dict[str, Any]) -> list[Event]:
        """An item of a JSON reply: its text as deltas, then what `item` makes of it."""
        events: list[Event] = []
        if item.get("type") == "reasoning":
            text = "".join(p.get("text") or "" for p in item.get("summary") or () if isinstance(p, dict))
            if text:
                events.append(Delta(0, reasoning_content=text))
        elif item.get("type") == "message":
            text = "".join(p.get("text") or "" for p in item.get("content") or ()
                           if isinstance(p, dict) and p.get("type") == "output_text")
            if text:
                events.append(Delta(0, content=text))
        return events + self.item(item)

    def _call(self, item: dict[str, Any], whole: bool) -> list[Event]:
        item_id = str(item.get("id") or item.get("call_id") or len(self.calls))
        raw = item.get("arguments")
        arguments = raw if isinstance(raw, str) else ""
        call = self.calls.get(item_id)
        if call is None:
            call = self.calls[item_id] = _Call(len(self.calls), str(item.get("call_id") or item_id),
                                               str(item.get("name") or ""))
            if not arguments and not whole:  # OpenAI-style: the arguments follow as fragments
                return [Delta(0, tool_calls=[_fragment(call, "")])]
            call.arguments_sent = True
            return [Delta(0, tool_calls=[_fragment(call, arguments)])]
        if whole and not call.arguments_sent and arguments:  # its header went out, its arguments never did
            call.arguments_sent = True
            return [Delta(0, tool_calls=[{"index": call.index, "function": {"arguments": arguments}}])]
        return []

    def end(self, response: dict[str, Any]) -> list[Event]:
        if self.ended:
            return []
        self.ended = True
        status = response.get("status")
        if status == "failed" or response.get("error"):
            error = response.get("error")
            raise stream_error(error, error_text(error, self.secrets), "The upstream failed")
        reason = "tool_calls" if self.calls else "stop"
        if status == "incomplete":
            why = (response.get("incomplete_details") or {}).get("reason")
            reason = "content_filter" if why == "content_filter" else "length"
        events: list[Event] = [Finish(0, reason)]
        usage = response.get("usage")
        if isinstance(usage, dict):
            events.append(UsageReport(normalise_responses_usage(usage)))
        return events


def _fragment(call: _Call, arguments: str) -> JSONObject:
    return {"index": call.index, "id": call.call_id, "type": "function",
            "function": {"name": call.name, "arguments": arguments}}


async def sse_events(response: aiohttp.ClientResponse, secrets: Iterable[str] = ()) -> AsyncGenerator[Event]:
    """A streamed reply: `event:` + `data:` frames; the type is read from the data."""
    reply = _Reply(secrets)
    with reading_reply(response):
        async for line in sse_lines(response):
            if not line.startswith(b"data:"):
                continue  # event names, comments (keep-alives)
            data = line[5:].strip()
            if data == b"[DONE]" or reply.ended:
                continue  # read on to the end, so the connection goes back to the pool
            event = orjson.loads(data)
            if isinstance(event, dict):
                for out in reply.stream_event(event):
                    yield out


async def json_events(response: aiohttp.ClientResponse, secrets: Iterable[str] = ()) -> AsyncGenerator[Event]:
    """A whole response object."""
    body = await read_json(response)
    if not isinstance(body, dict):
        raise GatewayError(502, "api_error", "The upstream reply is not a JSON object.")
    reply = _Reply(secrets)
    if body.get("status") == "failed":
        reply.end(body)  # raises
    for item in body.get("output") or ():
        if isinstance(item, dict):
            for event in reply.whole_item(item):
                yield event
    for event in reply.end(body):
        yield event


async def _tokenize_reply(response: aiohttp.ClientResponse, stream: bool) -> AsyncGenerator[Event]:
    """`/v1/tokenize-text`'s 200 as one Extra event carrying the whole reply (openai_compat `_send`'s reader)."""
    body = await read_json(response)
    if not isinstance(body, dict):
        raise GatewayError(502, "api_error", "The upstream's tokenize reply is not a JSON object.")
    yield Extra(body)


def _tokens(items: object) -> list[Token]:
    """xAI's `token_ids` -> Tokens; anything else is the upstream's failure (502)."""
    tokens = []
    for item in items if isinstance(items, list) else [None]:
        if not isinstance(item, dict):
            raise GatewayError(502, "api_error", "The upstream's tokenize reply has no list of tokens.")
        ident, text, raw = item.get("token_id"), item.get("string_token"), item.get("token_bytes")
        if (not isinstance(ident, int) or not isinstance(text, str) or not isinstance(raw, list)
                or not all(isinstance(b, int) and 0 <= b < 256 for b in raw)):
            raise GatewayError(502, "api_error", "The upstream's tokenize reply has a malformed token.")
        tokens.append(Token(ident, bytes(raw), text))
    return tokens


@register("xai")
def create_xai(**config: Any) -> XAIBackend:
    config.setdefault("base_url", "https://api.x.ai/v1")
    config.setdefault("read_timeout", 3600.0)  # xAI's advice for reasoning models
    return XAIBackend(BackendConfig(**config))
