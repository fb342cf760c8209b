"""`grokgate serve --workers N` with the local engine: the model is loaded once, in the supervisor.

The supervisor (grokgate/workers.py) builds the one `LocalEngine` (providers/local.py: the xllamacpp server, its
slots, the fair queue and each tenant's prompt cache) and `EngineServer` serves it to the workers over a Unix
socket in a directory only this user can enter, on an event loop in a thread of its own. Each worker's local
backend is a `RemoteEngine`: a LocalEngine that loads nothing, checks requests itself (the same refusals, with the
prompt bound the loaded engine read from the vocabulary) and sends what needs the model to the supervisor:
`generate` (the events come back one frame each), `count_prompt` and `tokenize`. The call crosses whole, its
tenant included, so prompt-cache walls, fair queueing and slot counts are those of one process serving every
worker's requests. A worker that dies has its generations stopped when its connection closes.

/readyz and the engine gauges of a worker show the supervisor's engine (its status, polled every
`_POLL_S` and after each generation).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grokgate.core.errors import GatewayError
from grokgate.core.events import Event, Origin, Usage
from grokgate.providers.base import BackendStatus, Call, Token
from grokgate.providers.local import LocalEngine
from grokgate.workers_sqlite import new_loop, receive_frame, send_frame

log = logging.getLogger("grokgate.workers")

_POLL_S = 1.0
_STOP_WAIT_S = 2.0  # a stopped generation's usage, from the supervisor (then the request settles without it)


def _error_fields(exc: BaseException) -> tuple[Any, ...]:
    if isinstance(exc, GatewayError):
        return (exc.status, exc.code, exc.message, exc.param, exc.headers, exc.limit)
    log.exception("the local engine failed a worker's call", exc_info=exc)
    return (500, "internal_error", "The local engine failed.", None, {}, None)


def _rebuild(fields: tuple[Any, ...]) -> GatewayError:
    status, code, message, param, headers, limit = fields
    return GatewayError(status, code, message, param=param, headers=headers, limit=limit)


def _forget(generations: dict[int, asyncio.Task[None]], call_id: int, _task: object) -> None:
    generations.pop(call_id, None)


# -- the supervisor's side ------------------------------------------------------------------------------------


class EngineServer:
    def __init__(self, engine: LocalEngine, path: Path) -> None:
        self.engine = engine
        self.path = path
        self._loop = new_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="engine-server", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> None:
        """Start loading the model (in the engine's own thread) and listen for workers at once."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()

    async def _start(self) -> None:
        await self.engine.start()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.engine.close()

    def _snapshot(self) -> tuple[Any, ...]:
        engine = self.engine
        return (engine.ready(), dict(engine.status()), engine.fingerprint, engine.prompt_bound)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        generations: dict[int, asyncio.Task[None]] = {}
        answering: set[asyncio.Task[None]] = set()
        lock = asyncio.Lock()  # frames of concurrent generations, one whole frame at a time

        async def send(message: Any) -> None:
            async with lock:
                await send_frame(writer, message)

        try:
            while True:
                try:
                    call_id, method, args = await receive_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                if method == "generate":
                    task = asyncio.create_task(self._generate(send, call_id, *args))
                    generations[call_id] = task
                    task.add_done_callback(functools.partial(_forget, generations, call_id))
                elif method == "stop":
                    task_ = generations.get(call_id)
                    if task_ is not None:
                        task_.cancel()
                else:
                    answer = asyncio.create_task(self._answer(send, call_id, method, args))
                    answering.add(answer)
                    answer.add_done_callback(answering.discard)
        finally:
            for task in list(generations.values()):  # the worker is gone: its generations stop, slots free
                task.cancel()
            await asyncio.gather(*generations.values(), return_exceptions=True)
            writer.close()

    async def _answer(self, send: Callable[[Any], Any], call_id: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            if method == "status":
                result: tuple[Any, ...] = ("ok", self._snapshot())
            elif method == "count":
                result = ("ok", await self.engine.count_prompt(*args))
            elif method == "tokenize":
                result = ("ok", await self.engine.tokenize(*args))
            else:
                raise ValueError(f"unknown call {method!r}")
        except Exception as exc:
            result = ("error", _error_fields(exc))
        with contextlib.suppress(ConnectionError, RuntimeError):
            await send((call_id, *result))

    async def _generate(self, send: Callable[[Any], Any], call_id: int, call: Call, model: str) -> None:
        generation = self.engine.generate(call, model)
        stopped = False
        try:
            async for event in generation:
                await send((call_id, "event", (event, generation.usage_so_far())))
            await send((call_id, "end", generation.usage_so_far()))
        except asyncio.CancelledError:
            stopped = True
            raise
        except ConnectionError:
            pass
        except Exception as exc:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await send((call_id, "error", _error_fields(exc)))
        finally:
            await generation.aclose()
            if stopped:  # the worker's request ended early: what was consumed (the prompt included) is billed
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await send((call_id, "end", generation.usage_so_far()))


# -- a worker's side ------------------------------------------------------------------------------------------


class _Client:
    """One connection to the EngineServer: calls answered once, generations answered by a stream of frames."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self._waiting: dict[int, asyncio.Queue[tuple[str, Any]]] = {}
        self._next = 0

    async def open(self) -> asyncio.StreamWriter:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._writer is None:
                reader, self._writer = await asyncio.open_unix_connection(self.path)
                self._reader_task = asyncio.create_task(self._read(reader), name="engine-client")
        return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                call_id, kind, payload = await receive_frame(reader)
                queue = self._waiting.get(call_id)
                if queue is not None:
                    queue.put_nowait((kind, payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writer = None
            lost: tuple[Any, ...] = (503, "model_unavailable", "The local engine's process could not be reached.",
                                     None, {}, None)
            for queue in self._waiting.values():
                queue.put_nowait(("error", lost))

    async def start(self, method: str, *args: Any) -> tuple[int, asyncio.Queue[tuple[str, Any]]]:
        writer = await self.open()
        self._next += 1
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._waiting[self._next] = queue
        await send_frame(writer, (self._next, method, args))
        return self._next, queue

    def done(self, call_id: int) -> None:
        self._waiting.pop(call_id, None)

    async def stop(self, call_id: int) -> Usage | None:
        """Stop a generation; what it consumed, as the engine counted it (None if the engine did not answer)."""
        queue = self._waiting.get(call_id)
        try:
            if self._writer is None or queue is None:
                return None
            with contextlib.suppress(ConnectionError, RuntimeError):
                await send_frame(self._writer, (call_id, "stop", ()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_STOP_WAIT_S):
                    while True:  # events already sent come first
                        kind, payload = await queue.get()
                        if kind != "event":
                            return payload if kind == "end" else None
            return None
        finally:
            self.done(call_id)

    async def call(self, method: str, *args: Any) -> Any:
        call_id, queue = await self.start(method, *args)
        try:
            kind, payload = await queue.get()
        finally:
            self.done(call_id)
        if kind == "error":
            raise _rebuild(payload)
        return payload

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)


class RemoteEngine(LocalEngine):
    """A worker's local backend: the supervisor's engine (see the module's docstring). Loads nothing."""

    def __init__(self, path: str, **options: Any) -> None:
        super().__init__(**options)
        self._client = _Client(path)
        self._remote_ready = False
        self._remote_status: BackendStatus = {"ready": False, "error": None, "slots": 0, "slots_busy": 0,
                                              "queued": 0, "tokens_generated": 0, "jobs_done": 0,
                                              "jobs_started": 0, "queue_wait_seconds": 0.0}
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._refresh()
        self._poller = asyncio.create_task(self._poll(), name="engine-status")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(_POLL_S)
            with contextlib.suppress(Exception):
                await self._refresh()

    async def _refresh(self) -> None:
        ready, status, fingerprint, bound = await self._client.call("status")
        self._remote_ready, self._remote_status, self._fingerprint = ready, status, fingerprint
        self.prompt_bound = bound

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await self._client.close()
        self._tokenizing.shutdown(wait=False)

    def ready(self) -> bool:
        return self._remote_ready

    def status(self) -> BackendStatus:
        return self._remote_status

    async def count_prompt(self, call: Call, upstream_model: str) -> int | None:
        counted: int | None = await self._client.call("count", call, upstream_model)
        return counted

    async def tokenize(self, text: str, model: str) -> list[Token]:
        tokens: list[Token] = await self._client.call("tokenize", text, model)
        return tokens

    def generate(self, call: Call, upstream_model: str) -> RemoteGeneration:  # type: ignore[override]
        return RemoteGeneration(self, call, upstream_model)


class RemoteGeneration:
    """A generation in the supervisor's engine, its events received one frame each (providers/base.py Generation)."""

    def __init__(self, engine: RemoteEngine, call: Call, model: str) -> None:
        self._engine = engine
        self._call = call
        self._model = model
        self._id: int | None = None
        self._queue: asyncio.Queue[tuple[str, Any]] | None = None
        self._usage: Usage | None = None
        self._closed = False

    @property
    def backend(self) -> str:
        return self._engine.name

    @property
    def fingerprint(self) -> str:
        return self._engine.fingerprint

    @property
    def origin(self) -> Origin:
        return "live"

    def usage_so_far(self) -> Usage | None:
        return self._usage

    def __aiter__(self) -> RemoteGeneration:
        return self

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        if self._queue is None:
            self._id, self._queue = await self._engine._client.start("generate", self._call, self._model)
        kind, payload = await self._queue.get()
        if kind == "event":
            event, self._usage = payload
            return event  # type: ignore[no-any-return]
        self._finish()
        if kind == "end":
            self._usage = payload
            raise StopAsyncIteration
        raise _rebuild(payload)

    def _finish(self) -> None:
        self._closed = True
        if self._id is not None:
            self._engine._client.done(self._id)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._id is not None:
            # The supervisor stops it, frees its slot and says what it consumed (a client gone during the
            # prompt's evaluation is billed its estimate, as in one process: providers/local_jobs.py).
            usage = await self._engine._client.stop(self._id)
            if usage is not None:
                self._usage = usage


def remote_engine(path: str, options: dict[str, Any]) -> Callable[[], RemoteEngine]:
    """app.py build_routing's `local_engine` for a worker."""
    return lambda: RemoteEngine(path, **options)
