"""Reading a generation with a deadline per event, without ever cancelling a read in flight."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final

from grokgate.core.events import Event
from grokgate.providers.base import Generation


class Marker:
    """TIMEOUT (no event within the wait: time for a keep-alive) or END (the generation is over)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


TIMEOUT: Final = Marker("TIMEOUT")
END: Final = Marker("END")


class Pump:
    """One reader task per request moves events into a small bounded queue (the bound keeps backpressure);
    waiting on the queue with a timeout is safe to cancel, where cancelling the generation's own read would
    tear down the upstream stream. This costs one task per request instead of one per event."""

    __slots__ = ("_failure", "_queue", "_reader", "generation", "waited")

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self._queue: asyncio.Queue[Event | Marker | Exception] = asyncio.Queue(maxsize=16)
        self._reader: asyncio.Task[None] | None = None
        self.waited = 0.0  # seconds spent waiting on the backend: what is not grokgate's own overhead
        self._failure: Exception | None = None  # the generation's failure, found by `ready`: raised by `next`

    async def _read(self) -> None:
        try:
            async for event in self.generation:
                await self._queue.put(event)
        except Exception as exc:  # handed to the consumer, which raises it
            await self._queue.put(exc)
            return
        await self._queue.put(END)

    async def next(self, wait: float | None) -> Event | Marker:
        """The next event, END, or TIMEOUT after `wait` seconds (the read goes on for the next call)."""
        if self._failure is not None:
            raise self._failure
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
        if isinstance(item, Exception):
            raise item
        return item

    def ready(self) -> Event | Marker | None:
        """The next event if the reader has queued it already, END if the generation is over, None otherwise:
        never waits (a stream sends what has come in one write: serving/lifecycle.py `_stream`). A failure is
        kept for `next` to raise, so what came before it goes out first."""
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if isinstance(item, Exception):
            self._failure = item  # the reader's last item
            return None
        return item

    async def aclose(self) -> None:
        """Stop reading and close the generation (idempotent: a generation's `aclose` may be called again)."""
        reader, self._reader = self._reader, None
        if reader is not None and not reader.done():
            # Let the cancelled read unwind before closing: closing a generator that is still running raises.
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        await self.generation.aclose()
