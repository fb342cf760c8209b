"""A TCP proxy the tests can cut: a database or Redis that becomes unreachable and comes back, for real.

`TcpProxy(target_port).start()` listens on a free port of 127.0.0.1 in a thread of its own and forwards each
connection to the target. `refuse()` resets every connection and closes the port (connects are refused, as when a
server is down); `blackhole()` keeps accepting but forwards nothing (as a network that drops packets: clients wait
for their own timeouts); `restore()` forwards again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Literal

Mode = Literal["forward", "refuse", "blackhole"]


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.mode: Mode = "forward"
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    @contextlib.contextmanager
    def running(self) -> Iterator[TcpProxy]:
        self.start()
        try:
            yield self
        finally:
            self.close()

    def refuse(self) -> None:
        self._call(self._set("refuse"))

    def blackhole(self) -> None:
        self._call(self._set("blackhole"))

    def restore(self) -> None:
        self._call(self._set("forward"))

    def close(self) -> None:
        self._call(self._set("refuse"))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        if self.port == 0:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def _set(self, mode: Mode) -> None:
        self.mode = mode
        if mode == "forward":
            if self._server is None:
                await self._listen()
            return
        for writer in list(self._writers):  # every connection through us is cut
            transport = writer.transport
            if isinstance(transport, asyncio.Transport):
                transport.abort()
        self._writers.clear()
        if mode == "refuse" and self._server is not None:
            self._server.close()
            self._server = None
        elif mode == "blackhole" and self._server is None:
            await self._listen()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode != "forward":  # blackhole: hold the connection, say nothing
            self._writers.add(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        self._writers.difference_update((writer, up_writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.mode != "forward":
                    return
                writer.write(data)
                await writer.drain()
        finally:
            if self.mode == "forward":
                writer.close()
