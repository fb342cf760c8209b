"""The in-process tier: the real app from `create_app`, a scripted provider at the provider seam, over HTTP.

`app_server(tmp, models)` builds the app with temporary data and cache dirs (never the user's) and serves it
with uvicorn in a thread of the test process, on a socket bound before the thread starts (no port race). What
a test sees is the same HTTP surface as a `grokgate serve` subprocess (conftest.Server): `chat`, `client`,
`url`, `token`, so a test can move between the tiers without changing its body. A server that cannot start
(its lifespan fails: a locked SQLite file, a bad setting) fails the fixture at once with its error.

`ScriptedProvider` plays what a test needs: by default every choice says `text` word by word, stops at
`max_tokens` with `length`, and one `UsageReport` ends the request; `script=` replaces that with any async
generator of core/events.py events (delays, failures before or after the first event, silences).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from grokgate.app import create_app
from grokgate.core.admission import Admission
from grokgate.core.errors import GatewayError
from grokgate.core.events import Delta, Event, Finish, Usage, UsageReport
from grokgate.providers.base import BackendStatus, Call, EventsGeneration, ModelTable, Route
from grokgate.schemas.chat import ChatCompletionRequest
from grokgate.settings import DEFAULT_MODELS, Settings
from tests.conftest import TLS, TOKEN

PROMPT_TOKENS = 7  # what the scripted provider reports for every prompt

Script = Callable[[ChatCompletionRequest, str], AsyncGenerator[Event]]


class ScriptedProvider:
    """A backend at the provider seam that records its requests and plays a script."""

    def __init__(self, name: str = "scripted", *, text: str = "Hello from the script", script: Script | None = None,
                 refuse: Callable[[ChatCompletionRequest], GatewayError | None] | None = None,
                 fingerprint: str = "fp_scripted") -> None:
        self._name = name
        self._fingerprint = fingerprint
        self.text = text
        self.script = script
        self.refuse = refuse
        self.requests: list[tuple[ChatCompletionRequest, str]] = []  # as the client sent them
        self.calls: list[Call] = []  # as the serving layer passed them (tenant, output cap held, affinity keys)
        self.closed = 0  # generations closed (each request's generation is closed once, however it ends)

    @property
    def name(self) -> str:
        return self._name

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def ready(self) -> bool:
        return True

    def status(self) -> BackendStatus:
        return {"ready": True}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def check(self, request: ChatCompletionRequest) -> None:
        error = self.refuse(request) if self.refuse is not None else None
        if error is not None:
            raise error

    def prompt_copies(self, request: ChatCompletionRequest) -> int:
        return 1

    def generate(self, call: Call, upstream_model: str) -> EventsGeneration:
        self.requests.append((call.request, upstream_model))
        self.calls.append(call)
        events = self.script(call.request, upstream_model) if self.script else self.say(call, upstream_model)
        return EventsGeneration(self._closing(events), self.name, self.fingerprint)

    async def _closing(self, events: AsyncGenerator[Event]) -> AsyncGenerator[Event]:
        try:
            async for event in events:
                yield event
        finally:
            self.closed += 1
            await events.aclose()

    async def say(self, call: Call, upstream_model: str) -> AsyncGenerator[Event]:
        """Every choice says `text` one word per delta, up to the request's output limit (the cap held at
        admission)."""
        request = call.request
        words = self.text.split()
        limit = call.output_limit
        completion = 0
        for index in range(request.choices):
            said = words if limit is None else words[:limit]
            for k, word in enumerate(said):
                yield Delta(index=index, content=word if k == 0 else f" {word}")
                await asyncio.sleep(0)
            completion += len(said)
            yield Finish(index=index, reason="length" if len(said) < len(words) else "stop")
        yield UsageReport(Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=completion))


def scripted_models(provider: ScriptedProvider, names: tuple[str, ...] = DEFAULT_MODELS) -> ModelTable:
    """Every public name served by one provider, as the local engine serves them without a routing file."""
    return ModelTable([Route(name, provider, name) for name in names])


@dataclass
class AppServer:
    """An app served in this process: the same HTTP surface as conftest.Server."""

    url: str
    app: Any
    token: str = TOKEN
    extra: dict[str, Any] = field(default_factory=dict)

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("verify", TLS)
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30), **kwargs)

    def chat(self, body: dict[str, Any], *, token: str | None = TOKEN, path: str = "/grok/chat/completions",
             **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        with self.client() as c:
            return c.post(path, json=body, headers=headers, **kwargs)


def app_settings(tmp: Path, **overrides: Any) -> Settings:
    """Settings of an in-process app: its own data and cache dirs under `tmp`, no GC tuning (that is the
    serving process's, not the test runner's), the test token as the admin key."""
    values: dict[str, Any] = {"api_keys": [TOKEN], "data_dir": tmp / "data", "cache_dir": tmp / "cache",
                              "tune_gc": False, **overrides}
    return Settings(**values)


@contextmanager
def serve_app(app: Any, *, start_timeout: float = 30) -> Iterator[AppServer]:
    """Serve an ASGI app with uvicorn in a daemon thread, lifespan included, until the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # log_level "error": a failed lifespan prints its traceback, which pytest shows with the failure.
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on", access_log=False))
    exits: list[SystemExit] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except SystemExit as exc:  # uvicorn exits when the lifespan's startup fails
            exits.append(exc)

    thread = threading.Thread(target=run, daemon=True, name=f"in-process-app-{port}")
    thread.start()
    deadline = time.monotonic() + start_timeout
    try:
        while not server.started:
            if not thread.is_alive():
                code = exits[0].code if exits else None
                raise RuntimeError(f"the in-process app did not start: its lifespan failed (exit {code}; the "
                                   "traceback is in the captured log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the in-process app did not start in {start_timeout:.0f} s")
            time.sleep(0.002)
        yield AppServer(url=f"http://127.0.0.1:{port}", app=app)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@contextmanager
def app_server(tmp: Path, models: ModelTable | None = None, *, admission: Admission | None = None,
               **settings: Any) -> Iterator[AppServer]:
    """`create_app` with `models` (default: a ScriptedProvider for every public name) and `settings`
    overrides, served in this process. Accounts are on unless `accounts=False`: a SQLite file under `tmp`."""
    provider = None
    if models is None:
        provider = ScriptedProvider()
        models = scripted_models(provider)
    app = create_app(app_settings(tmp, **settings), models=models, admission=admission)
    with serve_app(app) as served:
        served.extra["provider"] = provider
        yield served


@contextmanager
def logged(name: str = "grokgate") -> Iterator[list[logging.LogRecord]]:
    """The records of logger `name` meanwhile (INFO and up, as `grokgate serve` logs), whatever its propagation:
    what a server's log would show of an app served in this process."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
