"""SQLite settlements in a process of their own, fed over a pipe by the event loop.

In a thread of the serving process, the writer's statements took ~1.5 ms per batch under load instead of
~0.1 ms: sqlite3 releases the GIL around every step and must take it back from the busy event-loop thread.
A child process has its own GIL; the serving process only writes a frame and reads one back, on the event
loop, with no thread at all. The child (store/writer_child.py) imports no SQLAlchemy, asyncio or logging (it
is given the compiled SQL), so it costs about 14 MB.

Frames both ways: a 4-byte big-endian length, then a pickle. The parent sends the setup (database path,
statements), then batches: a list of settlements (as plain SettlementRows) and a list of (SQL, rows) inserts
(stored responses: store/responses_sql.py), committed in one transaction; the child answers each with
("ok", balances) or ("error", text).
The child commits a batch before it answers, finishes the batch it is in when its input closes (the parent
exited or was killed), and ignores SIGINT/SIGTERM so that a Ctrl+C or a group TERM does not cut it off
before the parent's graceful shutdown has settled its last requests.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import sys
from typing import Any

from grokgate.core.accounts import Settlement
from grokgate.store.settling import KeySpend, as_row
from grokgate.store.writer_child import LENGTH, encode_frame

log = logging.getLogger("grokgate.store")


class WriterFailed(Exception):
    """The writer process died or answered nonsense: whether the batch committed is unknown."""


class SqliteWriter:
    """The parent's side. One batch at a time (the store's drain loop is sequential)."""

    def __init__(self, path: str, statements: dict[str, tuple[str, tuple[str, ...]]], *,
                 timeout: float = 30.0) -> None:
        self._setup = {"path": path, "statements": statements}
        self._proc: asyncio.subprocess.Process | None = None
        self._closed = False
        # A batch takes milliseconds; a child silent this long is stuck (stopped, a dead disk) and is replaced.
        self.timeout = timeout

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", "grokgate.store.writer_child",  # -P: nothing from the working dir
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
        except OSError as exc:  # no process could be started (out of pids or descriptors): settle here instead
            raise WriterFailed(f"the SQLite writer process could not start ({exc!r})") from exc
        try:
            status, detail = await self._call(encode_frame(self._setup))
        except BaseException:
            await self.stop(kill=True)
            raise
        if status != "ok":
            await self.stop()
            raise WriterFailed(f"the SQLite writer did not start: {detail}")

    async def settle(self, items: list[Settlement],
                     inserts: list[tuple[str, list[tuple[Any, ...]]]] | None = None) -> KeySpend:
        """Commit the batch in the child, with `inserts` (SQL, rows) in the same transaction; raises RuntimeError
        for an error the child reported (nothing was committed), WriterFailed when the child is gone (it is
        stopped first, so nothing is still running)."""
        if self._closed:
            raise WriterFailed("the SQLite writer is closed")
        if self._proc is not None and self._proc.returncode is not None:
            log.warning("the SQLite writer process exited with %s; starting a new one", self._proc.returncode)
            self._proc = None
        # An error here is the batch's: nothing was sent yet.
        frame = encode_frame(([as_row(s) for s in items], inserts or []))
        if self._proc is None:
            await self.start()
        try:
            status, detail = await self._call(frame)
        except BaseException:
            # Half a frame may be in the pipe, or the child is stuck: it is done. Killed rather than waited
            # for, so a stuck child costs one timeout, not two; once it has exited nothing of it still writes.
            await self.stop(kill=True)
            raise
        if status != "ok":
            raise RuntimeError(f"settlement failed in the SQLite writer: {detail}")
        balances: KeySpend = (detail[0], detail[1])
        return balances

    async def _call(self, frame: bytes) -> tuple[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(frame)
            async with asyncio.timeout(self.timeout):
                await proc.stdin.drain()
                (size,) = LENGTH.unpack(await proc.stdout.readexactly(LENGTH.size))
                status, detail = pickle.loads(await proc.stdout.readexactly(size))
        except TimeoutError as exc:
            raise WriterFailed(f"the SQLite writer process did not answer in {self.timeout:g} s") from exc
        except Exception as exc:  # gone (a broken pipe, a short read) or an answer that is not one
            raise WriterFailed(f"the SQLite writer process failed ({exc!r})") from exc
        return status, detail

    async def close(self) -> None:
        """For good: a batch that comes after this settles in the serving process instead."""
        self._closed = True
        await self.stop()

    async def stop(self, *, kill: bool = False) -> None:
        """Close its input and wait for it to finish its batch; kill it if it does not (or at once)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        if not kill:
            try:
                await asyncio.wait_for(proc.wait(), self.timeout)
                return
            except TimeoutError:
                pass
        proc.kill()
        await proc.wait()
