"""A fake xAI API (``https://api.x.ai/v1``) that speaks xAI's wire format, quirks included.

Usage from pytest::

    with FakeXAI().start() as fake:          # uvicorn in a daemon thread, on a free port
        httpx.post(f"{fake.url}/chat/completions", headers={"Authorization": "Bearer xai-test-key"}, json=...)
        fake.fail_next("500", {"fault": "429", "retry_after": 2})
        fake.requests[-1]["body"]            # {"method", "path", "headers" (lowercased), "body" (parsed JSON or None)}

As a script: ``python -m tests.fakes.fake_xai --port 8900 [--key K ...] [--chunks N] [--no-strict]``.

Content: every choice says ``content`` (default "Hello from fake xAI"); with ``n > 1`` choice ``i >= 1`` says
``"<content> #i"``. ``max_completion_tokens`` (or ``max_tokens``) below the word count truncates the text to that many
words, with ``finish_reason: "length"``. ``grok-3-mini`` adds ``reasoning_content`` (:data:`REASONING_TEXT`). With
``tools`` and ``tool_choice`` not "none", every choice calls the first tool (or the one ``tool_choice`` names) with
arguments :data:`TOOL_ARGUMENTS`, ``content: ""`` and ``finish_reason: "tool_calls"``, except after a tool's result
(the last message a ``tool`` one, ``tool_choice`` auto or absent), which is answered in text as a model would.

Token counts (``words(s) = len(s.split())``):

* ``prompt_tokens = 10 + sum(words(text))`` over every message's string ``content`` or its ``{"type": "text"}`` parts;
  ``prompt_tokens_details = {text_tokens: prompt_tokens, audio_tokens: 0, image_tokens: 0, cached_tokens}``, with
  ``cached_tokens = min(x-fake-cached-tokens header or 0, prompt_tokens)`` (part of prompt_tokens, not extra).
* ``completion_tokens = sum over choices of words(content sent)``, plus ``words(TOOL_ARGUMENTS) == 2`` per tool call.
  It EXCLUDES reasoning, as at xAI.
* ``reasoning_tokens = 7 * n`` for reasoning models, else 0 (``completion_tokens_details.reasoning_tokens``).
* ``total_tokens = prompt_tokens + completion_tokens + reasoning_tokens``; ``num_sources_used = 0``.
* ``cost_in_usd_ticks`` (xAI's own cost of the request, 1 USD = 1e10 ticks, in the ``usage`` object of chat
  completions and of the Responses API: docs.x.ai "Cost Tracking"), as xAI always sends it (``report_cost=False``
  leaves it out).
  :func:`usd_ticks`: every model at one fixed rate, :data:`TICKS_PER_TOKEN` (grok-3's list price: $3 per million
  input tokens, $0.75 cached, $15 output), ``(prompt - cached) * 30000 + cached * 7500 + (completion + reasoning) *
  150000``: reasoning is billed as output.

Tokenize (``POST /v1/tokenize-text``, xAI's REST shape: ``{"text", "model", "user"?}`` ->
``{"token_ids": [{"token_id", "string_token", "token_bytes"}]}``; same auth, errors, faults and strictness as chat):
one token per word of :func:`words`, each with the whitespace before it (trailing whitespace joins the last one), so
``len(tokens) == words(text)`` (a text of whitespace alone is one token) and a text adds that many tokens to a chat's
``prompt_tokens``; the pieces make the text; ``token_id`` is a digest of the piece below :data:`VOCABULARY`.
``fake.tokenize_requests`` records them.

Streams: keys are omitted rather than null. Reasoning models first send ``{"role": "assistant"}``, then (grok-3-mini
only) :data:`REASONING_TEXT` in 3 ``reasoning_content`` deltas, then 3 empty ``delta: {}`` chunks; other models put the
role on the first content chunk. The content comes in ``min(chunks, len(content))`` pieces split by characters; a
tool call comes as one complete delta. Each choice ends with ``delta: {}`` + ``finish_reason``. Choices interleave by
index. ``stream_options.include_usage`` adds ``{"choices": [], "usage": ...}`` before ``data: [DONE]``. ``citations``
ride on the last chunk (also non-stream, top level) when ``search_parameters`` is sent.

Request headers: ``x-fake-usage-every-chunk: 1`` (choice chunk j of N carries usage with completion and reasoning
scaled ``* j // N``, so the last is the true total), ``x-fake-finish-reason: <reason>`` (replaces every finish
reason), ``x-fake-chunk-delay-ms: N`` (sleep between stream chunks), ``x-fake-cached-tokens: N``,
``x-fake-fault: name[;key=value...]`` (e.g. ``stall;seconds=0.5``; used only when no queued fault is pending),
``x-fake-prompt-from-body: 1`` (``prompt_tokens = len(request body bytes) // 4``, as an upstream whose tokenizer sees
everything the body carries: tools, schemas, images), ``x-fake-prompt-tokens: N`` (report ``N`` prompt tokens, as an
upstream that counts more than it was sent), ``x-fake-content-chars: N`` (every choice's text is ``N``
characters of words instead of ``content``; ``#i`` suffixes as usual).

Prompt caches (``FakeXAI(cache_servers=N)``, ``--cache-servers N``; off by default): as at xAI, each API key's
account is served by ``N`` servers, each with its own prompt cache (:class:`PromptCaches`). A request with a
conversation id (chat: the ``x-grok-conv-id`` header, a body ``prompt_cache_key`` is ignored there; Responses: the
body's ``prompt_cache_key``, else that header) goes to server ``sha256(id) % N``; one without, to a random server.
Its ``cached_tokens`` is the longest prefix its prompt shares with a prompt that server saw before, in tokens (the
words of each message, in order, a message's role included in the match; plus the fixed 10 once any word
matches), so only a conversation kept on one key and one id is read from cache. ``x-fake-cached-tokens`` still
wins when sent. ``fake.cache_log`` records ``(key, conversation id, server, cached)`` per request.

``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}``: xAI's own Responses API, stored responses
included (``fake.stored``; ``fake.responses_requests`` records the POSTs): tests/fakes/fake_xai_responses.py.

Keys (xAI's answers, per docs.x.ai's REST reference and an SDK's recorded error: a wrong key is a 400,
"Incorrect API key provided: xa***ey", the status of any invalid argument; a key or team that is blocked is a
403 on every endpoint): ``GET /v1/api-key`` answers the key's own record (xAI's ``ApiKey``:
``redacted_api_key``, ``acls``, ``api_key_blocked``, ``api_key_disabled``, ``team_blocked``...) or the wrong-key
400. ``fake.blocked`` (a set of keys): their requests get the 403, their ``/v1/api-key`` record says
``api_key_blocked: true``.

Faults (:data:`FAULTS`; queued ones are consumed FIFO, one per ``POST`` to ``/chat/completions``, ``/responses`` or
``/tokenize-text``, whatever the request; ``failed`` is the Responses API's alone, see
tests/fakes/fake_xai_responses.py):
``500``/``502``/``503``; ``429`` (``retry_after``, default 1, sent as ``retry-after``); ``bad_key`` (the 400 wrong-key
answer; the key's ``GET /v1/api-key`` then gives it too, until a request with that key is next served: a key
refused for a while); ``403`` (the key may not do what this request asks; its ``/v1/api-key`` record is clean);
``reset`` (connection closed with no response); ``stall`` (``seconds``, default 30, before headers, then a
normal answer; :meth:`FakeXAI.release_stalls` ends the stalls under way at once); ``reset_mid_stream`` (``after``
chunks, default 2, then the connection is closed: no ``[DONE]``);
``stall_mid_stream`` (``after`` chunks, then silence for ``seconds``, default 30, then the rest); ``no_usage`` (no usage
chunk; non-stream: no ``usage`` key). Non-stream ``*_mid_stream`` faults cut or pause the JSON body halfway.
``echo=1`` on an error fault (``500``/``502``/``503``, ``429``, ``bad_key``, ``403``, ``failed``): its message also
quotes the request's Authorization header, as an upstream that repeats what it was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

REASONING_MODELS = ("grok-4-0709", "grok-4", "grok-4-1-fast-reasoning", "grok-4-1-fast", "grok-3-mini")
KNOWN_MODELS = (*REASONING_MODELS, "grok-3", "grok-2-vision-1212", "grok-4-1-fast-non-reasoning", "grok-code-fast-1")
OPENAI_ONLY_FIELDS = ("service_tier", "store", "metadata", "modalities", "audio", "prediction")
FAULTS = frozenset({"500", "502", "503", "429", "bad_key", "403", "reset", "stall", "reset_mid_stream",
                    "stall_mid_stream", "no_usage", "failed"})
STATUS_TEXT = {400: "Client specified an invalid argument", 401: "Unauthenticated",
               403: "The caller does not have permission to execute the specified operation",
               404: "Some requested entity was not found", 405: "Method Not Allowed",
               415: "Unsupported Media Type", 422: "Unprocessable Entity",
               429: "Some resource has been exhausted", 500: "Internal error", 502: "Bad Gateway",
               503: "The service is currently unavailable"}
DEFAULT_CONTENT = "Hello from fake xAI"
REASONING_TEXT = "The user greets me. I greet back."
TOOL_CALL_ID = "call_12345678"
TOOL_ARGUMENTS = '{"city": "Paris"}'
CITATIONS = ["https://example.com/a", "https://example.com/b"]
FINGERPRINT = "fp_fake"
TICKS_PER_TOKEN = {"input": 30_000, "cached_input": 7_500, "output": 150_000}  # USD ticks (1e-10 USD) per token
VOCABULARY = 131_072  # token ids are below this (xAI's tokenizer has about that many)
_TRANSPORT_KEY = "fake_xai.transport"


def is_reasoning(model: str) -> bool:
    return model in REASONING_MODELS or ("reasoning" in model and "non-reasoning" not in model)


def words(text: str) -> int:
    return len(text.split())


def _split(text: str, k: int) -> list[str]:
    k = max(1, min(k, len(text)))
    return [text[i * len(text) // k:(i + 1) * len(text) // k] for i in range(k)] if text else []


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"code": STATUS_TEXT[status], "error": message})
    return Response(body, status, headers=headers, media_type="application/json")


def usd_ticks(prompt: int, cached: int, output: int) -> int:
    """xAI's cost of a request here (``cost_in_usd_ticks``): ``output`` counts reasoning tokens too."""
    return ((prompt - cached) * TICKS_PER_TOKEN["input"] + cached * TICKS_PER_TOKEN["cached_input"]
            + output * TICKS_PER_TOKEN["output"])


def tokenize(text: str) -> list[dict[str, Any]]:
    """The fake's tokens of ``text`` in xAI's REST shape (see the module's docstring)."""
    pieces = re.findall(r"\s*\S+", text)
    rest = text[sum(map(len, pieces)):]
    if rest:
        pieces = [*pieces[:-1], pieces[-1] + rest] if pieces else [rest]
    out = []
    for piece in pieces:
        data = piece.encode("utf-8", "surrogatepass")
        ident = int.from_bytes(hashlib.sha256(data).digest()[:4], "big") % VOCABULARY
        out.append({"token_id": ident, "string_token": piece, "token_bytes": list(data)})
    return out


def _usage(prompt: int, cached: int, completion: int, reasoning: int, cost: bool = False) -> dict[str, Any]:
    usage = _usage_fields(prompt, cached, completion, reasoning)
    if cost:
        usage["cost_in_usd_ticks"] = usd_ticks(prompt, cached, completion + reasoning)
    return usage


def _usage_fields(prompt: int, cached: int, completion: int, reasoning: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion + reasoning,
            "prompt_tokens_details": {"text_tokens": prompt, "audio_tokens": 0, "image_tokens": 0,
                                      "cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
            "num_sources_used": 0}


def echoed(spec: dict[str, Any] | None, headers: dict[str, str]) -> str:
    """What an ``echo`` fault adds to its message: the request's Authorization header, as it came."""
    if not spec or not spec.get("echo"):
        return ""
    return f" (request headers: {{'authorization': '{headers.get('authorization', '')}'}})"


def parse_fault(fault: str | dict[str, Any]) -> dict[str, Any]:
    """Normalise ``"stall"``, ``"stall;seconds=0.5"`` or ``{"fault": "stall", "seconds": 0.5}`` to the dict form."""
    if isinstance(fault, str):
        name, *params = (p.strip() for p in fault.split(";"))
        spec: dict[str, Any] = {"fault": name}
        for param in params:
            key, _, value = param.partition("=")
            spec[key.strip()] = float(value)
    else:
        spec = dict(fault)
    if spec.get("fault") not in FAULTS:
        raise ValueError(f"unknown fake xAI fault {spec.get('fault')!r}; known: {sorted(FAULTS)}")
    return spec


class _Raw(Response):
    """Sends ``parts`` one ``http.response.body`` message at a time, applying mid-stream faults and delays."""

    def __init__(self, status: int, headers: dict[str, str], parts: list[bytes], fault: dict[str, Any] | None,
                 delay: float = 0.0, after: int | None = None) -> None:
        # No Response.__init__: it would add "content-length: 0" to a streamed body.
        self.status_code, self.background = status, None
        self.raw_headers = [(k.encode(), v.encode()) for k, v in headers.items()]
        self.parts, self.fault, self.delay = parts, fault or {"fault": None}, delay
        self.after = min(int(self.fault.get("after", 2) if after is None else after), len(parts) - 1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.parts:  # "reset": the connection is already gone, uvicorn must not answer 500
            return
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        name = self.fault["fault"]
        for k, part in enumerate(self.parts):
            if k == self.after and name == "reset_mid_stream":
                await drop_connection(scope, receive, hard=False)
                return
            if k == self.after and name == "stall_mid_stream":
                await asyncio.sleep(float(self.fault.get("seconds", 30)))
            elif k and self.delay:
                await asyncio.sleep(self.delay)
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def drop_connection(scope: Scope, receive: Receive, *, hard: bool) -> None:
    """Close the client's TCP connection under uvicorn (``hard``: drop unsent bytes too) and wait until it notices.

    uvicorn exposes no transport in the ASGI scope; the wrapper in :meth:`FakeXAI.asgi` takes it from the bound
    ``send`` method of uvicorn's RequestResponseCycle (h11 and httptools alike).
    """
    transport = scope.get(_TRANSPORT_KEY)
    if transport is None:
        raise RuntimeError("fake xAI: cannot reach the TCP transport (not running under uvicorn?)")
    if hard:
        transport.abort()
    else:
        transport.close()  # flushes what was already sent, then FIN: the client sees a truncated body
    with contextlib.suppress(Exception):
        while (await receive())["type"] != "http.disconnect":
            pass


PROMPT_OVERHEAD = 10  # the fixed part of every prompt_tokens / input_tokens here


class PromptCaches:
    """Per-server prompt caches of each API key's account (see the module's docstring)."""

    def __init__(self, servers: int, keep: int = 256, seed: int = 0) -> None:
        self.servers = servers
        self.keep = keep  # prompts remembered per server, oldest forgotten first
        self._seen: dict[tuple[str, int], collections.deque[tuple[str, ...]]] = {}
        self._random = random.Random(seed)
        self.log: list[tuple[str, str | None, int, int]] = []
        self._lock = threading.Lock()

    def server_of(self, conversation: str | None) -> int:
        if conversation is None:
            return self._random.randrange(self.servers)  # load balanced: anywhere
        return int.from_bytes(hashlib.sha256(conversation.encode()).digest()[:8], "big") % self.servers

    def read(self, key: str, conversation: str | None, tokens: tuple[str, ...], prompt: int) -> int:
        """The cached tokens of this prompt on the server it lands on; the server then remembers it."""
        with self._lock:
            server = self.server_of(conversation)
            seen = self._seen.setdefault((key, server), collections.deque(maxlen=self.keep))
            shared = max((_common(tokens, old) for old in seen), default=0)
            seen.append(tokens)
            words_shared = sum(1 for t in tokens[:shared] if not t.startswith("\x00"))
            cached = min(prompt, PROMPT_OVERHEAD + words_shared) if words_shared else 0
            self.log.append((key, conversation, server, cached))
            return cached


def _common(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prompt_sequence(messages: list[tuple[str, list[str]]]) -> tuple[str, ...]:
    """A prompt as the caches compare it: each message's role (a marker that is no token), then its words."""
    out: list[str] = []
    for role, texts in messages:
        out.append("\x00" + role)
        for text in texts:
            out += text.split()
    return tuple(out)


class FakeXAI:
    def __init__(self, api_keys: Sequence[str] = ("xai-test-key",), chunks: int = 5, strict: bool = True,
                 content: str = DEFAULT_CONTENT, host: str = "127.0.0.1", cache_servers: int = 0,
                 report_cost: bool = True) -> None:
        self.api_keys, self.chunks, self.strict, self.content, self.host = list(api_keys), chunks, strict, content, host
        self.report_cost = report_cost  # chat usage carries cost_in_usd_ticks (see the module's docstring)
        self.caches = PromptCaches(cache_servers) if cache_servers > 0 else None
        self.requests: list[dict[str, Any]] = []
        # Quirk switches for every request, as if each carried these x-fake-* headers (grokgate does not
        # forward its clients' headers upstream, so tests set them here).
        self.header_defaults: dict[str, str] = {}
        self.url = ""
        self.port = 0
        self._faults: collections.deque[dict[str, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stalls: set[asyncio.Event] = set()
        self.blocked: set[str] = set()  # keys xAI answers 403 on every endpoint (their record: api_key_blocked)
        self._refused: set[str] = set()  # keys the bad_key fault refused, until a request with one is served
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        # Stored responses of /v1/responses (`store` defaults to true at xAI): id -> {"response", "input"}.
        self.stored: dict[str, dict[str, Any]] = {}
        from tests.fakes.fake_xai_responses import FakeResponses  # it builds on this module's helpers

        responses = FakeResponses(self)
        self.app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]),
                                     Route("/v1/responses", responses.create, methods=["POST"]),
                                     Route("/v1/responses/{response_id}", responses.get, methods=["GET"]),
                                     Route("/v1/responses/{response_id}", responses.delete, methods=["DELETE"]),
                                     Route("/v1/tokenize-text", self._tokenize, methods=["POST"]),
                                     Route("/v1/models", self._models, methods=["GET"]),
                                     Route("/v1/api-key", self._api_key, methods=["GET"])],
                             exception_handlers={HTTPException: self._http_error})

    # ----- test controls -------------------------------------------------------------------------------------------
    def fail_next(self, *faults: str | dict[str, Any]) -> None:
        specs = [parse_fault(f) for f in faults]
        with self._lock:
            self._faults.extend(specs)

    def release_stalls(self) -> None:
        """End every ``stall`` under way now (each then answers normally): a test holds requests in flight for as
        long as it needs, with a long stall, and lets them go when it is done instead of sleeping it out."""
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(lambda: [event.set() for event in list(self._stalls)])

    async def _stall(self, seconds: float) -> None:
        event = asyncio.Event()
        self._stalls.add(event)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), seconds)
        finally:
            self._stalls.discard(event)

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self.requests.clear()
            self.header_defaults.clear()
            self.stored.clear()
            self.blocked.clear()
            self._refused.clear()
            if self.caches is not None:
                self.caches = PromptCaches(self.caches.servers)

    @property
    def cache_log(self) -> list[tuple[str, str | None, int, int]]:
        """``(API key, conversation id, server, cached tokens)`` per request the prompt caches saw."""
        return self.caches.log if self.caches is not None else []

    def cached_tokens(self, headers: dict[str, str], conversation: str | None,
                      messages: list[tuple[str, list[str]]], prompt: int) -> int:
        """``x-fake-cached-tokens`` if sent, else what the prompt caches hold (0 when they are off)."""
        if headers.get("x-fake-cached-tokens") or self.caches is None:
            return min(int(headers.get("x-fake-cached-tokens") or 0), prompt)
        key = headers.get("authorization", "").partition(" ")[2].strip()
        return self.caches.read(key, conversation, prompt_sequence(messages), prompt)

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].endswith("/chat/completions")]

    @property
    def tokenize_requests(self) -> list[dict[str, Any]]:
        """The `POST /v1/tokenize-text` requests, oldest first."""
        return [r for r in self.requests if r["path"].endswith("/tokenize-text")]

    @property
    def responses_requests(self) -> list[dict[str, Any]]:
        """The `POST /v1/responses` requests (their bodies as sent), oldest first."""
        return [r for r in self.requests if r["method"] == "POST" and r["path"].endswith("/responses")]

    # ----- server lifecycle ----------------------------------------------------------------------------------------
    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[_TRANSPORT_KEY] = getattr(getattr(send, "__self__", None), "transport", None)
        self._loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)

    def start(self, port: int = 0) -> FakeXAI:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, port))
        self.port = sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}/v1"
        config = uvicorn.Config(self.asgi, log_level="critical", lifespan="off", proxy_headers=False, interface="asgi3",
                                access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name=f"fake-xai-{self.port}")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake xAI server did not start")
            time.sleep(0.01)
        socket.create_connection((self.host, self.port), timeout=5).close()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = self._server.force_exit = True  # don't wait for stalled requests
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> FakeXAI:
        return self if self._server is not None else self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ----- endpoints -----------------------------------------------------------------------------------------------
    async def _http_error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        return _error(status if status in STATUS_TEXT else 404, str(getattr(exc, "detail", exc)))

    def _record(self, request: Request, raw: bytes) -> dict[str, str]:
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        self.requests.append({"method": request.method, "path": request.url.path, "headers": headers, "body": body})
        return headers

    def _auth(self, headers: dict[str, str]) -> Response | None:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme != "Bearer" or not key.strip():
            return _error(401, "Missing bearer or basic authentication in header")
        if key.strip() not in self.api_keys:
            return self._bad_key(key.strip())
        if key.strip() in self.blocked:
            return _error(403, f"The API key {key.strip()[:2]}***{key.strip()[-2:]} is blocked.")
        return None

    async def _api_key(self, request: Request) -> Response:
        """``GET /v1/api-key``: the key's record, or the answer a wrong (or refused) key gets."""
        headers = self._record(request, b"")
        key = headers.get("authorization", "").partition(" ")[2].strip()
        if key in self._refused:
            return self._bad_key(key)
        denied = self._auth(headers)
        if denied is not None and denied.status_code != 403:
            return denied
        ident = str(uuid.uuid5(uuid.NAMESPACE_OID, key))
        record = {"redacted_api_key": f"{key[:4]}...{key[-4:]}", "user_id": ident, "name": "fake key",
                  "create_time": "2024-01-01T12:55:18.139305Z", "modify_time": "2024-08-28T17:20:12.343321Z",
                  "modified_by": ident, "team_id": ident, "acls": ["api-key:model:*", "api-key:endpoint:*"],
                  "api_key_id": ident, "team_blocked": False, "api_key_blocked": key in self.blocked,
                  "api_key_disabled": False}
        return Response(orjson.dumps(record), media_type="application/json")

    @staticmethod
    def _bad_key(key: str) -> Response:
        return _error(400, f"Incorrect API key provided: {key[:2]}***{key[-2:]}. "
                           "You can obtain an API key from https://console.x.ai.")

    async def _models(self, request: Request) -> Response:
        denied = self._auth(self._record(request, b""))
        data = [{"id": m, "object": "model", "created": 1735689600, "owned_by": "xai"} for m in KNOWN_MODELS]
        return denied or Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    async def _prelude(self, request: Request) -> tuple[bytes, dict[str, str], dict[str, Any] | None, Response | None]:
        """Read and record a POST, take its fault and play the faults that answer before the body is looked at:
        (raw body, headers, fault, the answer if the fault already gave one)."""
        raw = await request.body()
        headers = {**self.header_defaults, **self._record(request, raw)}
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
        if fault is None and headers.get("x-fake-fault"):
            try:
                fault = parse_fault(headers["x-fake-fault"])
            except ValueError as exc:
                return raw, headers, None, _error(400, str(exc))
        spec = fault or {}
        name = spec.get("fault")
        if name == "reset":
            await drop_connection(request.scope, request.receive, hard=True)
            return raw, headers, fault, _Raw(200, {}, [], None)
        if name == "stall":
            await self._stall(float(spec.get("seconds", 30)))
        echo = echoed(spec, headers)
        if name in ("500", "502", "503"):
            return raw, headers, fault, _error(int(name), f"fake xAI fault {name}{echo}")
        if name == "429":
            retry = spec.get("retry_after", 1)
            retry = int(retry) if float(retry).is_integer() else retry
            return raw, headers, fault, _error(429, f"Rate limit exceeded (fake){echo}",
                                               headers={"retry-after": str(retry)})
        key = headers.get("authorization", "Bearer xai-bad-key").partition(" ")[2] or "xai-bad-key"
        if name == "bad_key":
            self._refused.add(key)
            answer = self._bad_key(key)
            if echo:
                answer = _error(400, orjson.loads(answer.body)["error"] + echo)
            return raw, headers, fault, answer
        if name == "403":
            return raw, headers, fault, _error(403, f"The API key {key[:2]}***{key[-2:]} does not have permission "
                                                    f"for this request.{echo}")
        return raw, headers, fault, None

    async def _json_post(self, request: Request, *required: str) -> tuple[Any, bytes, dict[str, str],
                                                                           dict[str, Any] | None, Response | None]:
        """`_prelude`, then what xAI checks of a JSON POST, in its order: the key, the content type, the JSON, the
        required fields. (body, raw body, headers, fault, the answer if one of them already gave it)."""
        raw, headers, fault, answered = await self._prelude(request)
        if answered is None:
            answered = self._auth(headers)
        if answered is None:  # served: a key the bad_key fault refused is good again
            self._refused.discard(headers.get("authorization", "").partition(" ")[2].strip())
        if answered is None and (not raw or not headers.get("content-type", "").startswith("application/json")):
            answered = _error(415, "Expected request with `Content-Type: application/json`")
        body: Any = None
        if answered is None:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                answered = _error(400, f"Failed to parse the request body as JSON: {exc}")
        for field in required:
            if answered is None and (not isinstance(body, dict) or field not in body):
                answered = _error(422, f"Failed to deserialize the JSON body into the target type: missing field "
                                       f"`{field}`")
        return body, raw, headers, fault, answered

    async def _chat(self, request: Request) -> Response:
        body, raw, headers, fault, answered = await self._json_post(request, "messages", "model")
        if answered is not None:
            return answered
        model, messages = body["model"], body["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return _error(422, "Failed to deserialize the JSON body into the target type: messages: invalid type")
        if self.strict:
            if model not in KNOWN_MODELS:
                return _error(404, f"The model {model} does not exist or your team does not have access to it.")
            problem = self._validate(body, str(model))
            if problem:
                return _error(400, problem)
        return self._answer(body, headers, fault, len(raw))

    async def _tokenize(self, request: Request) -> Response:
        body, _, _, fault, answered = await self._json_post(request, "text", "model")
        if answered is not None:
            return answered
        text, model = body["text"], body["model"]
        if not isinstance(text, str) or not isinstance(model, str):
            return _error(422, "Failed to deserialize the JSON body into the target type: text, model: invalid type")
        if self.strict and model not in KNOWN_MODELS:
            return _error(404, f"The model {model} does not exist or your team does not have access to it.")
        data = orjson.dumps({"token_ids": tokenize(text)})
        return _Raw(200, {"content-type": "application/json", "content-length": str(len(data))},
                    [data[:len(data) // 2], data[len(data) // 2:]], fault, after=1)

    @staticmethod
    def _validate(body: dict[str, Any], model: str) -> str | None:
        def given(key: str) -> bool:
            return body.get(key) is not None

        stop = body.get("stop")
        if isinstance(stop, str) or (given("stop") and not isinstance(stop, list)):
            return "Invalid argument: `stop` must be an array of strings"
        if isinstance(stop, list) and len(stop) > 4:
            return "Invalid argument: `stop` accepts at most 4 sequences"
        for key in ("presence_penalty", "frequency_penalty", "stop"):
            if given(key) and (is_reasoning(model) or (key == "presence_penalty" and model == "grok-3")):
                return f"Model {model} does not support parameter {key}."
        if given("reasoning_effort"):
            if model != "grok-3-mini":
                return f"Model {model} does not support parameter reasoningEffort."
            if body["reasoning_effort"] not in ("low", "high"):
                return f"Invalid reasoning_effort {body['reasoning_effort']!r}: expected 'low' or 'high'"
        if given("logit_bias"):
            return "Argument not supported: logit_bias"
        if given("top_logprobs"):
            if body.get("logprobs") is not True:
                return "Invalid argument: top_logprobs requires logprobs to be true"
            if not isinstance(body["top_logprobs"], int) or not 0 <= body["top_logprobs"] <= 8:
                return "Invalid argument: top_logprobs must be between 0 and 8"
        if any(m.get("role") == "developer" for m in body["messages"]):
            return "Invalid argument: unknown message role `developer`"
        for key in OPENAI_ONLY_FIELDS:
            if given(key):
                return f"Argument not supported: {key}"
        if given("max_tokens") and given("max_completion_tokens"):
            return "Invalid argument: max_tokens and max_completion_tokens cannot both be set"
        return None

    # ----- answers -------------------------------------------------------------------------------------------------
    def _answer(self, body: dict[str, Any], headers: dict[str, str], fault: dict[str, Any] | None,
                raw_size: int) -> Response:
        model, n = str(body["model"]), max(1, int(body.get("n") or 1))
        reasoning = is_reasoning(model)
        prompt = 10 + sum(words(t) for m in body["messages"] for t in _texts(m.get("content")))
        if headers.get("x-fake-prompt-from-body", "").lower() in ("1", "true", "yes"):
            prompt = raw_size // 4
        if headers.get("x-fake-prompt-tokens"):
            prompt = int(headers["x-fake-prompt-tokens"])
        content = self.content
        if headers.get("x-fake-content-chars"):
            content = _filler(int(headers["x-fake-content-chars"]))
        cached = self.cached_tokens(headers, headers.get("x-grok-conv-id"),
                                    [(str(m.get("role")), _texts(m.get("content"))) for m in body["messages"]], prompt)
        tools, tool_choice = body.get("tools") or [], body.get("tool_choice")
        tool_name = None
        messages = body.get("messages") or [{}]
        answered = messages[-1].get("role") == "tool" and tool_choice in (None, "auto")  # a tool's result: text
        if tools and tool_choice != "none" and not answered:
            named = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
            tool_name = named or (tools[0].get("function") or {}).get("name", "tool")
        limit = body.get("max_completion_tokens") if body.get("max_completion_tokens") is not None \
            else body.get("max_tokens")
        choices: list[dict[str, Any]] = []
        for i in range(n):
            text, finish = content if i == 0 else f"{content} #{i}", "stop"
            if tool_name is not None:
                text, finish = "", "tool_calls"
            elif isinstance(limit, int) and limit < words(text):
                text, finish = " ".join(text.split()[:limit]), "length"
            choices.append({"text": text, "finish": headers.get("x-fake-finish-reason") or finish})
        completion = sum(words(c["text"]) + (words(TOOL_ARGUMENTS) if tool_name else 0) for c in choices)
        usage = _usage(prompt, cached, completion, 7 * n if reasoning else 0, self.report_cost)
        ident, created = f"{uuid.uuid4()}_us-east-1", int(time.time())
        citations = CITATIONS if body.get("search_parameters") is not None else None
        name = fault["fault"] if fault else None
        call = {"id": TOOL_CALL_ID, "function": {"name": tool_name, "arguments": TOOL_ARGUMENTS}, "type": "function"}
        if not body.get("stream"):
            out: dict[str, Any] = {"id": ident, "object": "chat.completion", "created": created, "model": model,
                                   "choices": []}
            for i, c in enumerate(choices):
                message: dict[str, Any] = {"role": "assistant", "content": c["text"], "refusal": None}
                if model == "grok-3-mini":
                    message["reasoning_content"] = REASONING_TEXT
                if tool_name is not None:
                    message["tool_calls"] = [call]
                out["choices"].append({"index": i, "message": message, "finish_reason": c["finish"]})
            if name != "no_usage":
                out["usage"] = usage
            out["system_fingerprint"] = FINGERPRINT
            if citations:
                out["citations"] = citations
            data = orjson.dumps(out)
            return _Raw(200, {"content-type": "application/json", "content-length": str(len(data))},
                        [data[:len(data) // 2], data[len(data) // 2:]], fault, after=1)
        per_choice: list[list[dict[str, Any]]] = []
        for i, c in enumerate(choices):
            pre: list[dict[str, Any]] = []
            if reasoning:
                pre = [{"role": "assistant"}]
                if model == "grok-3-mini":
                    pre += [{"reasoning_content": p} for p in _split(REASONING_TEXT, 3)]
                pre += [{}, {}, {}]
            main = [{"tool_calls": [{**call, "index": 0}]}] if tool_name else [
                {"content": p} for p in _split(c["text"], self.chunks)]
            if not reasoning:
                main = [{"role": "assistant", **(main[0] if main else {})}, *main[1:]]
            deltas = [{"index": i, "delta": d} for d in pre + main]
            per_choice.append([*deltas, {"index": i, "delta": {}, "finish_reason": c["finish"]}])
        ordered = [lst[s] for s in range(max(map(len, per_choice))) for lst in per_choice if s < len(lst)]
        every = headers.get("x-fake-usage-every-chunk", "").lower() in ("1", "true", "yes")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and name != "no_usage"
        base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
        chunks: list[dict[str, Any]] = []
        for j, choice in enumerate(ordered, 1):
            chunk: dict[str, Any] = {**base, "choices": [choice]}
            if every:
                scale = len(ordered)
                chunk["usage"] = _usage(prompt, cached, completion * j // scale,
                                        usage["completion_tokens_details"]["reasoning_tokens"] * j // scale,
                                        self.report_cost)
            chunks.append(chunk)
        if include_usage:
            chunks.append({**base, "choices": [], "usage": usage})
        for chunk in chunks:
            chunk["system_fingerprint"] = FINGERPRINT
        if citations:
            chunks[-1]["citations"] = citations
        parts = [b"data: " + orjson.dumps(ch) + b"\n\n" for ch in chunks] + [b"data: [DONE]\n\n"]
        delay = float(headers.get("x-fake-chunk-delay-ms") or 0) / 1000
        return _Raw(200, {"content-type": "text/event-stream", "cache-control": "no-cache"}, parts, fault, delay)


def _filler(chars: int) -> str:
    """``chars`` characters of short words (``words()`` of it is about chars / 6)."""
    return ("lorem ipsum dolor sit amet " * (chars // 27 + 1))[:chars]


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text"
                and isinstance(p.get("text"), str)]
    return []


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake xAI API server (for grokgate tests and benchmarks)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--key", action="append", dest="keys", help="accepted API key (repeatable)")
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument("--content", default=DEFAULT_CONTENT)
    parser.add_argument("--no-strict", action="store_true", help="skip xAI's parameter validation")
    parser.add_argument("--cache-servers", type=int, default=0, help="servers with prompt caches per key (0: off)")
    parser.add_argument("--no-cost", action="store_true", help="usage leaves out cost_in_usd_ticks")
    args = parser.parse_args(argv)
    fake = FakeXAI(api_keys=args.keys or ["xai-test-key"], chunks=args.chunks, strict=not args.no_strict,
                   content=args.content, host=args.host, cache_servers=args.cache_servers,
                   report_cost=not args.no_cost)
    print(f"fake xAI on http://{args.host}:{args.port}/v1 (keys: {', '.join(fake.api_keys)})", flush=True)
    uvicorn.run(fake.asgi, host=args.host, port=args.port, log_level="warning", lifespan="off",
                access_log=False, interface="asgi3")


if __name__ == "__main__":
    main()
