"""SSE framing and the two ways a generation reaches the client: streamed, or collected into one body.

Framing (contract section 5.1): `data: <one-line JSON>\\n\\n` per event, `: keep-alive` comments during
silences, `data: [DONE]` last, and an error after the first byte as a `data: {"error": ...}` event.
A client that disconnects is a normal ending: the generation is closed (freeing its slot) and the ticket
settled, shielded from cancellation, whatever way the response ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from grokgate.core.completion import CompletionAccumulator, StreamAssembler
from grokgate.core.errors import GatewayError
from grokgate.core.events import Event, Usage
from grokgate.providers.base import Generation

log = logging.getLogger("grokgate.stream")

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def frame(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name


TIMEOUT = _Marker("timeout")
END = _Marker("end")


class Pump:
    """Reads a generation with a deadline per event, without ever cancelling a read in flight.

    One reader task per request moves events into a small bounded queue (the bound keeps backpressure);
    waiting on the queue with a timeout is safe to cancel, where cancelling the generator's own read would
    tear down the upstream stream. This costs one task per request instead of one per event.
    """

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self._queue: asyncio.Queue[Event | _Marker | BaseException] = asyncio.Queue(maxsize=16)
        self._reader: asyncio.Task[None] | None = None
        self.waited = 0.0  # seconds spent waiting on the backend: what is not grokgate's own overhead

    async def _read(self) -> None:
        try:
            async for event in self.generation:
                await self._queue.put(event)
        except Exception as exc:  # handed to the consumer, which raises it
            await self._queue.put(exc)
            return
        await self._queue.put(END)

    async def next(self, wait: float | None) -> Event | _Marker:
        """The next event, END, or TIMEOUT after `wait` seconds (the read goes on for the next call)."""
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        started = time.perf_counter()
        try:
            if wait is None:
                item = await self._queue.get()
            else:
                async with asyncio.timeout(wait):
                    item = await self._queue.get()
        except TimeoutError:
            return TIMEOUT
        finally:
            self.waited += time.perf_counter() - started
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None and not reader.done():
            # Let the cancelled read unwind before closing: closing a generator that is still running raises.
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        await self.generation.aclose()


Finish = Callable[[Usage | None, str, BaseException | None], Awaitable[None]]


class SSEResponse(StreamingResponse):
    """A streaming response that always closes its body iterator, shielded, however the stream ends."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()


async def sse_events(
    pump: Pump,
    assembler: StreamAssembler,
    first: Event | _Marker,
    keepalive: float,
    request_id: str,
    finish: Finish,
) -> AsyncIterator[bytes]:
    """The body of a streamed completion; `first` was read before the 200 was committed."""
    failure: BaseException | None = None
    try:
        for chunk in assembler.opening():
            yield frame(chunk)
        event = first
        while event is not END:
            if isinstance(event, _Marker):
                yield KEEPALIVE
            elif (payload := assembler.on_event(event)) is not None:
                yield frame(payload)
            event = await pump.next(keepalive)
        # Zero loss: the settlement is committed before the client sees the end of the stream.
        await finish(assembler.usage, "ok", None)
        for chunk in assembler.closing():
            yield frame(chunk)
        yield DONE
    except GatewayError as exc:
        failure = exc
        yield frame({"error": exc.body(), "trace_id": request_id})
    except Exception as exc:
        failure = exc
        log.exception("stream failed", extra={"request_id": request_id})
        error = GatewayError(500, "api_error", "Internal server error.")
        yield frame({"error": error.body(), "trace_id": request_id})
    finally:
        with anyio.CancelScope(shield=True):
            await pump.aclose()
            # No-op after a normal end; otherwise the client went away or the backend failed.
            await finish(assembler.usage, "client_disconnected" if failure is None else "error", failure)


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def collect(
    pump: Pump,
    accumulator: CompletionAccumulator,
    first: Event | _Marker,
    receive: Receive,
) -> dict[str, Any] | None:
    """Collect a whole completion; None if the client disconnected first (the generation is stopped)."""

    async def consume() -> dict[str, Any]:
        event = first
        while event is not END:
            if not isinstance(event, _Marker):
                accumulator.on_event(event)
            event = await pump.next(None)
        return accumulator.result()

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait((consumer, watcher), return_when=asyncio.FIRST_COMPLETED)
        if consumer.done():
            return consumer.result()
        return None
    finally:
        for task in (consumer, watcher):
            task.cancel()
        with anyio.CancelScope(shield=True):
            await pump.aclose()
