"""An OpenAI-compatible upstream: vLLM, llama.cpp's server, another grokgate, or any such server.

One pooled keep-alive aiohttp session per backend, created once (aiohttp rather than httpx: on this hot
path httpx's per-request cost was the largest single item in the profile, see docs/benchmarks.md).
A request goes out as a stream when the client streams (always asking for usage) and as one JSON
request otherwise; either way the reply becomes `core.events`. Failures before the first event raise
`UpstreamFailure`, which the router may retry on another key or backend; failures after it are errors
of the stream. The router records the backend breaker's success once the first event arrives. A refusal is
judged by its status and structured fields, never by its message, which reaches the caller redacted
(providers/upstream_errors.py): what one caller sends cannot cool a key or a backend that every tenant shares.

A backend is an `Upstream` (providers/base.py): the router drives `attempt` itself. It is also a plain
`Provider` whose `generate` is a route of one candidate, for code that serves a model straight from it.

Keys rotate, except for a request of a conversation (its `route_key`, serving/affinity.py): its keys are tried in
the order of rendezvous hashing of that key (providers/router.py `rendezvous`), so every turn uses the same key
while it is healthy, since an upstream's prompt cache belongs to one key's account. The conversation id itself
(`cache_key`) is sent as `prompt_cache_key` only to a backend configured with `prompt_cache_key: true` (OpenAI
reads it; vLLM ignores it and logs a warning on every request; servers that forbid unknown fields would refuse
it); a client's own `prompt_cache_key` is forwarded as the tenant's conversation id (serving/affinity.py
`scoped`), never as it was sent, so two tenants sending the same one do not share a key's prompt cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDictProxy

from grokgate.core.breaker import Breaker
from grokgate.core.errors import GatewayError
from grokgate.core.events import Delta, Event, Extra, Finish, JSONObject, Usage, UsageReport
from grokgate.core.usage import normalise_usage
from grokgate.providers.base import BackendStatus, Call, UpstreamFailure, held_body, register
from grokgate.providers.router import Candidate, RoutedGeneration, rendezvous
from grokgate.providers.upstream_errors import UpstreamKey, request_fault, retry_after, upstream_message
from grokgate.schemas.chat import ChatCompletionRequest

log = logging.getLogger("grokgate.upstream")

PASSTHROUGH_KEYS = ("citations",)

# How a 200 reply becomes events: (the response, whether it streams) -> the events. The chat reply's reader is
# `OpenAICompatBackend.reply_events`; xai.py passes its Responses API reader through the same `_send`.
ReplyReader = Callable[[aiohttp.ClientResponse, bool], AsyncGenerator[Event]]


# Statuses that blame the key (providers/upstream_errors.py): its credentials, its account's credit, its rights.
KEY_STATUSES = (401, 402, 403)


@dataclass
class BackendConfig:
    name: str
    base_url: str
    api_keys: list[str] = field(default_factory=list)
    timeout: float = 600.0  # total deadline of one request
    connect_timeout: float = 5.0
    read_timeout: float = 300.0  # longest silence while reading (reasoning models think quietly)
    max_in_flight: int = 256
    fanout_n: bool = False  # the upstream ignores n: send n requests and merge them
    cooldown: float = 30.0
    failure_threshold: int = 3
    # Server-side tool calls (xAI's web search...) one request may run: what the admission reserved for them
    # (settings.max_server_tool_calls), sent as `max_tool_calls` (providers/xai.py).
    max_server_tool_calls: int = 10
    # Send the conversation id (serving/affinity.py) as `prompt_cache_key`: for upstreams that read it (OpenAI).
    prompt_cache_key: bool = False


class OpenAICompatBackend:
    kind = "openai"
    # Statuses this upstream gives a refused key and a refused request alike: after one, the key is judged by
    # `check_key`. None here: OpenAI, vLLM and llama.cpp's server answer a wrong key with 401.
    shared_statuses: tuple[int, ...] = ()

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.name = config.name
        self.breaker = Breaker(config.failure_threshold, config.cooldown)
        self.keys = [UpstreamKey(k, Breaker(config.failure_threshold, config.cooldown)) for k in config.api_keys]
        self.secrets = tuple(config.api_keys)  # redacted from every upstream message, whatever their shape
        self._rotation = itertools.count()
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self._session: aiohttp.ClientSession | None = None

    # -- what the router asks ------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return f"fp_{self.kind}_{self.name}"

    def ready(self) -> bool:
        return True

    def status(self) -> BackendStatus:
        return {"kind": self.kind, "state": self.breaker.state,
                "keys": [k.breaker.state for k in self.keys]}

    async def start(self) -> None:
        self.session()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # needs the running loop, so made on first use
            connector = aiohttp.TCPConnector(limit=self.config.max_in_flight, keepalive_timeout=30)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout,
                                            sock_read=self.config.read_timeout)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=True)
        return self._session

    async def close(self) -> None:
        for key in self.keys:
            key.cancel_check()
        if self._session is not None:
            await self._session.close()

    def check(self, request: ChatCompletionRequest) -> None:
        if request.server_tools:
            raise server_tools_refused(request, self.name)

    def prompt_copies(self, request: ChatCompletionRequest) -> int:
        """n when the upstream ignores `n` and the request goes out as n single requests, each billing the prompt."""
        return request.choices if self.config.fanout_n else 1

    def generate(self, call: Call, upstream_model: str) -> RoutedGeneration:
        """This backend alone as a route: its keys are rotated and retried like any routed model's."""
        return RoutedGeneration(call, [Candidate(self, upstream_model)], time.monotonic() + self.config.timeout,
                                self.name, self.fingerprint)

    def succeeded(self) -> None:
        self.breaker.success()

    def failed(self) -> None:
        self.breaker.failure()

    def available(self, tried: set[int]) -> bool:
        return self.breaker.state != "open" and self._pick_key(tried, probe=False) is not None

    def _pick_key(self, tried: set[int], probe: bool = True, route_key: str | None = None) -> int | None:
        if not self.keys:
            return -1 if -1 not in tried else None
        if route_key is not None and len(self.keys) > 1:
            order = sorted(range(len(self.keys)), key=lambda k: rendezvous(route_key, self.keys[k].ident),
                           reverse=True)
        else:
            start = next(self._rotation) if probe else 0
            order = [(start + offset) % len(self.keys) for offset in range(len(self.keys))]
        for i in order:
            if i in tried:
                continue
            if (self.keys[i].breaker.allow() if probe else self.keys[i].breaker.state != "open"):
                return i
        return None

    def retry_in(self) -> float:
        waits = [k.breaker.retry_in() for k in self.keys] or [0.0]
        return max(self.breaker.retry_in(), min(waits))

    # -- one attempt ---------------------------------------------------------------------------------------

    def payload(self, call: Call, upstream_model: str, stream: bool) -> dict[str, Any]:
        """The request as sent: every field the client gave (unknown ones included), held to the output cap, the
        model's upstream id, and the conversation id as serving/affinity.py made it (namespaced by tenant), never
        the client's raw `prompt_cache_key`."""
        body = held_body(call.request.model_dump(exclude_none=True, by_alias=True), call.output_limit)
        body["model"] = upstream_model
        client_key = body.pop("prompt_cache_key", None)
        if call.cache_key is not None and (self.config.prompt_cache_key or client_key is not None):
            body["prompt_cache_key"] = call.cache_key
        body["stream"] = stream
        if stream:
            body["stream_options"] = {"include_usage": True}  # always: usage is what billing reads
        else:
            body.pop("stream_options", None)
        return body

    async def attempt(self, call: Call, model: str, tried: set[int]) -> AsyncGenerator[Event]:
        """Send the request (n single requests for a fan-out backend, merged); raises UpstreamFailure for a refusal,
        and the events' first step raises a GatewayError when the reply breaks before its first event."""
        request = call.request
        stream = bool(request.stream)
        n = request.choices
        if n == 1 or not self.config.fanout_n:
            return await self._send(self.payload(call, model, stream), tried, call=call)
        # The upstream ignores n: n single requests, merged under their own indexes.
        streams: list[AsyncGenerator[Event]] = []
        try:
            for i in range(n):
                body = self.payload(call, model, stream)
                body["n"] = 1
                if request.seed is not None:
                    body["seed"] = request.seed + i
                streams.append(await self._send(body, set(tried), call=call))
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        return merge_choices(streams)

    def request_headers(self, call: Call) -> dict[str, str]:
        """Headers a request adds to the upstream call (xai.py: the conversation id)."""
        return {}

    async def _send(self, body: dict[str, Any], tried: set[int], url: str | None = None,
                    reader: ReplyReader | None = None, *, call: Call | None = None) -> AsyncGenerator[Event]:
        """Send one request on one key (to `url`, default the chat completions URL; its 200 reply read by `reader`,
        default `reply_events`); the iterator's first step raises a GatewayError or yields an event. `call`: its
        conversation picks the key and may add headers."""
        key_index = self._pick_key(tried, route_key=call.route_key if call is not None else None)
        if key_index is None:
            raise UpstreamFailure(GatewayError(503, "upstream_unavailable", f"No usable key for {self.name}."),
                                  retryable=True)
        tried.add(key_index)
        key = self.keys[key_index] if key_index >= 0 else None
        headers = {"Content-Type": "application/json"}
        if call is not None:
            headers.update(self.request_headers(call))
        if key:
            headers["Authorization"] = f"Bearer {key.value}"
        stream = bool(body.get("stream"))
        try:
            response = await self.session().post(url or self.url, data=orjson.dumps(body), headers=headers)
        except TimeoutError:
            self.breaker.failure()
            raise UpstreamFailure(GatewayError(504, "timeout", f"The upstream {self.name} timed out."),
                                  retryable=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            self.breaker.failure()
            raise UpstreamFailure(GatewayError(502, "api_error", f"The upstream {self.name} is unreachable: "
                                               f"{type(exc).__name__}."), retryable=True) from None
        if response.status != 200:
            raw = await _read_quietly(response)
            refused = None
            if key is not None and response.status in self.shared_statuses:
                refused = await key.refused(self.check_key)
            raise self._failure(response.status, raw, response.headers, key, refused)
        # The key was accepted. The backend's own breaker waits for the first event (providers/router.py): a
        # 200 whose body then stalls is not a success.
        if key:
            key.breaker.success()
        return (reader or self.reply_events)(response, stream)

    def reply_events(self, response: aiohttp.ClientResponse, stream: bool) -> AsyncGenerator[Event]:
        return self._events(response) if stream else self._json_events(response)

    async def check_key(self, key: UpstreamKey) -> bool | None:
        """Whether the upstream refuses `key` itself, asked by a request that carries nothing of a caller's (None:
        it cannot tell). Only for `shared_statuses`; xai.py has one."""
        return None

    def _failure(self, status: int, raw: bytes, headers: CIMultiDictProxy[str], key: UpstreamKey | None,
                 key_refused: bool | None = None) -> UpstreamFailure:
        """The refusal as the router sees it. The key and the backend are judged by `status` (and, for a status the
        key and the request share, by `key_refused`: the upstream's answer about the key alone), never by the
        message, which the caller may have put there (providers/upstream_errors.py)."""
        message = upstream_message(raw, self.secrets)
        wait = retry_after(headers)
        if status == 429:
            if key:
                key.breaker.failure(wait if wait is not None else self.config.cooldown)
            return UpstreamFailure(GatewayError(429, "too_many_requests", f"The upstream is rate limiting: {message}",
                                                headers={"retry-after": str(int(wait or 1))}),
                                   retryable=True, retry_after=wait)
        if key_refused or (status in KEY_STATUSES and status not in self.shared_statuses):
            # The key is grokgate's, not the caller's: a misconfiguration, never a 401 to the client.
            if key:
                key.breaker.failure(self.config.cooldown)
            log.error("upstream rejected our key", extra={"backend": self.name, "status": status,
                                                          "key": key.ident if key else None, "detail": message})
            return UpstreamFailure(GatewayError(502, "api_error", f"The upstream {self.name} refused grokgate's "
                                                "credentials; the operator must fix the configured API key."),
                                   retryable=True)
        if status in KEY_STATUSES:
            # The upstream vouches for the key (or cannot say): this request asked for what the key may not do.
            # Another key or route may; this one is not cooled for what one caller asked.
            return UpstreamFailure(GatewayError(502, "api_error", f"The upstream {self.name} refused this request "
                                                f"with grokgate's key ({status}): {message}"), retryable=True)
        if status == 404:
            return UpstreamFailure(GatewayError(502, "api_error", f"The upstream {self.name} does not know the "
                                                f"model: {message}"), retryable=True)
        if 400 <= status < 500:
            return UpstreamFailure(GatewayError(400, "bad_request", f"The upstream refused the request: {message}"),
                                   retryable=False)
        self.breaker.failure()
        log.warning("upstream failed", extra={"backend": self.name, "status": status, "detail": message})
        return UpstreamFailure(GatewayError(502, "api_error", f"The upstream {self.name} failed ({status})."),
                               retryable=True, retry_after=wait)

    async def _events(self, response: aiohttp.ClientResponse) -> AsyncGenerator[Event]:
        usage: dict[str, Any] | None = None
        done = False
        with reading_reply(response):
            async for line in sse_lines(response):
                if done or not line.startswith(b"data:"):
                    continue  # comments (keep-alives), event names, and whatever follows [DONE]
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True  # read on to the end, so the connection goes back to the pool
                    continue
                chunk = orjson.loads(data)
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("error"):
                    raise stream_error(chunk["error"], upstream_message(data, self.secrets))
                if chunk.get("usage"):
                    usage = chunk["usage"]  # keep the last, never the sum (some upstreams repeat it cumulatively)
                extras = {k: chunk[k] for k in PASSTHROUGH_KEYS if chunk.get(k)}
                if extras:
                    yield Extra(extras)
                for event in _choice_events(chunk.get("choices") or (), delta_key="delta"):
                    yield event
        if usage is not None:
            yield UsageReport(normalise_usage(usage))

    async def _json_events(self, response: aiohttp.ClientResponse) -> AsyncGenerator[Event]:
        body = await read_json(response)
        if not isinstance(body, dict):
            raise GatewayError(502, "api_error", "The upstream reply is not a JSON object.")
        extras = {k: body[k] for k in PASSTHROUGH_KEYS if body.get(k)}
        if extras:
            yield Extra(extras)
        for event in _choice_events(body.get("choices") or (), delta_key="message"):
            yield event
        if body.get("usage"):
            yield UsageReport(normalise_usage(body["usage"]))


@contextlib.contextmanager
def reading_reply(response: aiohttp.ClientResponse) -> Iterator[None]:
    """Reading a reply, streamed (chat chunks here, Responses events in providers/xai.py) or whole: its failures
    become the upstream's errors in our envelope, and the connection is released however the read ends."""
    try:
        yield
    except TimeoutError:
        raise GatewayError(504, "timeout", "The upstream went silent for too long.") from None
    except (aiohttp.ClientError, OSError):
        raise GatewayError(502, "api_error", "The upstream connection broke before the reply ended.") from None
    except orjson.JSONDecodeError:
        raise GatewayError(502, "api_error", "The upstream sent something that is not JSON.") from None
    finally:
        release(response)


async def read_json(response: aiohttp.ClientResponse) -> Any:
    """A whole JSON reply, its connection released; failures are the upstream's (GatewayError)."""
    with reading_reply(response):
        return orjson.loads(await response.read())


def stream_error(error: object, message: str, failed: str = "The upstream failed mid-stream") -> GatewayError:
    """An error inside a 200 reply: the caller's 400 when its fields blame the request (no breaker counts it,
    providers/router.py), else the upstream's failure."""
    if request_fault(error):
        return GatewayError(400, "bad_request", f"The upstream refused the request: {message}")
    return GatewayError(502, "api_error", f"{failed}: {message}")


def server_tools_refused(request: ChatCompletionRequest, backend: str) -> GatewayError:
    """The refusal of a backend that cannot run server-side tools: the router then keeps only routes that can."""
    names = ", ".join(request.server_tools)
    return GatewayError(400, "bad_request", f"Server-side tools ({names}) run only on a route to xAI; the model "
                        f"'{request.model}' has no such route here (backend {backend}). Remove them from `tools` "
                        "or use a model routed to xAI.", param="tools")


async def merge_choices(streams: list[AsyncGenerator[Event]]) -> AsyncGenerator[Event]:
    """Interleave n single-choice streams, re-indexed 0..n-1; usage adds up (each request was billed)."""
    queue: asyncio.Queue[tuple[int, Event | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncGenerator[Event]) -> None:
        try:
            async for event in stream:
                await queue.put((i, event))
        except BaseException as exc:
            await queue.put((i, exc))
            return
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    total = Usage()
    reported: set[int] = set()
    open_streams = len(streams)
    try:
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            elif isinstance(item, UsageReport):
                u = item.usage
                reported.add(i)
                ticks = (None if u.cost_in_usd_ticks is None or (reported - {i} and total.cost_in_usd_ticks is None)
                         else (total.cost_in_usd_ticks or 0) + u.cost_in_usd_ticks)
                total = Usage(total.prompt_tokens + u.prompt_tokens, total.completion_tokens + u.completion_tokens,
                              total.cached_tokens + u.cached_tokens, total.reasoning_tokens + u.reasoning_tokens,
                              cost_in_usd_ticks=ticks)
            elif isinstance(item, Delta | Finish):
                item.index = i
                yield item
            else:
                yield item
        # A sum that misses a request would under-bill: without every report the router estimates the whole.
        if len(reported) == len(streams):
            yield UsageReport(total)
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()


MAX_LINE = 8 << 20  # one SSE line (one chunk) larger than this is refused rather than buffered without end


async def sse_lines(response: aiohttp.ClientResponse) -> AsyncGenerator[bytes]:
    buffer = b""
    async for data in response.content.iter_any():
        buffer += data
        while (end := buffer.find(b"\n")) >= 0:
            yield buffer[:end].rstrip(b"\r")
            buffer = buffer[end + 1:]
        if len(buffer) > MAX_LINE:
            raise GatewayError(502, "api_error", "The upstream sent an event larger than 8 MiB.")
    if buffer:
        yield buffer


def release(response: aiohttp.ClientResponse) -> None:
    """Back to the pool when fully read; otherwise (client gone, error) drop the connection."""
    if response.content.at_eof():
        response.release()
    else:
        response.close()


def _choice_events(choices: Any, delta_key: str) -> list[Event]:
    events: list[Event] = []
    for choice in choices:
        index = int(choice.get("index", 0))
        delta = choice.get(delta_key) or {}
        content = delta.get("content")
        reasoning = delta.get("reasoning_content")
        tool_calls = delta.get("tool_calls")
        logprobs = (choice.get("logprobs") or {}).get("content")
        if content or reasoning or tool_calls or logprobs:
            events.append(Delta(index=index, content=content or None, reasoning_content=reasoning or None,
                                tool_calls=_tool_calls(tool_calls) if tool_calls else None, logprobs=logprobs))
        if choice.get("finish_reason"):
            events.append(Finish(index=index, reason=choice["finish_reason"]))
    return events


def _tool_calls(calls: list[dict[str, Any]]) -> list[JSONObject]:
    """Keep `index`, `id`, `type` and `function.name` on every fragment that has them (clients look up a call's
    fragments by `index`, and the first fragment of a call carries its id and name)."""
    out: list[JSONObject] = []
    for i, call in enumerate(calls):
        item = dict(call)
        item.setdefault("index", i)
        if item.get("id") and "type" not in item:
            item["type"] = "function"
        out.append(item)
    return out


async def _read_quietly(response: aiohttp.ClientResponse) -> bytes:
    try:
        return await asyncio.wait_for(response.read(), 10)
    except (aiohttp.ClientError, OSError, TimeoutError):
        return b""
    finally:
        release(response)


@register("openai")
def create_openai(**config: Any) -> OpenAICompatBackend:
    return OpenAICompatBackend(BackendConfig(**config))
