"""`grokgate serve --workers N` on SQLite: the supervisor holds what SQLite keeps in one process's memory.

SQLite serving is one process (store/sql.py): it holds the file's lock, reservations live in its memory (so a
request waits for one commit, its settlement), settlements commit in its writer child (store/sqlite_writer.py),
and without Redis its rate limits are in memory too (store/limits_memory.py). With workers, that one process is
the supervisor (grokgate/workers.py): it opens the store as a serving process would, and `HoldsServer`, on an
event loop in a thread of its own, answers the workers over a Unix socket in a directory only this user can
enter: reserve and settle (and, without Redis, the rate limiter's calls). So there is one set of holds, one
limiter and one SQLite writer for every worker, and credits and limits are exact across them as in one process.

Each worker opens the file for everything else (reads of tokens, prices and balances, admin changes, stored
responses: SQLite's WAL lets any number of processes read, and the rare writes of a worker wait their turn for
the file's lock) with `RemoteHoldsStore`, a SqlStore that asks the supervisor for its holds, and `RemoteLimiter`.

A worker that dies with holds (SIGKILL) loses them as a killed single process does: the supervisor drops the
holds and frees the limiter slots that worker's connection took, when the connection closes.

What this costs: two round trips on the Unix socket per request (reserve, settle; four without Redis), and the
supervisor's event loop serves them for every worker. Differences from one process, stated in
docs/operations.md: an admin's view of a key or account (`reserved`) shows what is held only on the supervisor,
so a worker's admin API shows 0 reserved while requests are in flight; commit metrics are the supervisor's,
not in /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import pickle
import struct
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from grokgate.core.accounts import Settlement
from grokgate.core.budgets import Hold, Reserved
from grokgate.core.limits import Decision, Limits, RateLimiter
from grokgate.store.sql import SqlStore

log = logging.getLogger("grokgate.workers")

_HEADER = struct.Struct("!I")
_STORE_CALLS = frozenset({"reserve", "unhold", "settle", "forget", "restart_held"})
# The supervisor's store waits this long at shutdown for what workers still settle (store/sql.py close).
_CLOSE_GRACE_S = 10.0


async def send_frame(writer: asyncio.StreamWriter, message: Any) -> None:
    """Queue one frame; the frames queued in one turn of the event loop go out in one write (under load, many
    requests' calls share a system call). Frames keep their order. Not waiting for the peer to read: both
    ends are this deployment's processes, which read all the time."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    frame = _HEADER.pack(len(data)) + data
    queued = _queued.get(writer)
    if queued is None:
        _queued[writer] = [frame]
        asyncio.get_running_loop().call_soon(_flush, writer)
    else:
        queued.append(frame)


_queued: dict[asyncio.StreamWriter, list[bytes]] = {}


def _flush(writer: asyncio.StreamWriter) -> None:
    frames = _queued.pop(writer, None)
    if frames and not writer.is_closing():
        writer.write(b"".join(frames))


def new_loop() -> asyncio.AbstractEventLoop:
    """An event loop for a thread of the supervisor: uvloop's when installed, as uvicorn's workers use."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


async def receive_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    # Only this user's processes can reach the socket (its directory is 0700), so unpickling trusts a peer
    # that could as well run its own code.
    return pickle.loads(await reader.readexactly(size))


# -- the supervisor's side ------------------------------------------------------------------------------------


class _Peer:
    """What one worker's connection holds: the supervisor releases it if the worker dies."""

    def __init__(self) -> None:
        self.holds: dict[str, Hold] = {}
        self.slots: dict[tuple[str, str], tuple[Limits, int]] = {}  # (key, request id) -> (limits, tokens)


class HoldsServer:
    """The supervisor's store and limiter, served to the workers over a Unix socket (see the module docstring)."""

    def __init__(self, store: SqlStore | None, limiter: RateLimiter | None, path: Path) -> None:
        self.store = store
        self.limiter = limiter
        self.path = path
        self._loop = new_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="holds-server", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._peers: set[_Peer] = set()
        self._held_ids: set[str] = set()  # request ids whose holds are granted and not yet settled or released

    def start(self) -> None:
        """Open the store (migrating it, taking the file's lock, starting its writer child) and listen."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()

    async def _start(self) -> None:
        if self.store is not None:  # None: PostgreSQL without Redis, only the limiter is served
            await self.store.open(serve=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    def stop(self) -> None:
        """After the workers exited: settle what is owed and close the store."""
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(_CLOSE_GRACE_S + 30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self.store is not None:
            await self.store.close(grace=_CLOSE_GRACE_S)
        if self.limiter is not None:
            await self.limiter.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _Peer()
        self._peers.add(peer)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    call_id, method, args = await receive_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                # Each call in a task: a settlement waiting for its commit must not hold up the next reservation.
                task = asyncio.create_task(self._answer(peer, writer, call_id, method, args))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            await asyncio.gather(*tasks, return_exceptions=True)
            self._peers.discard(peer)
            await self._release(peer)
            writer.close()

    async def _answer(self, peer: _Peer, writer: asyncio.StreamWriter, call_id: int, method: str,
                      args: tuple[Any, ...]) -> None:
        try:
            result = (True, await self._call(peer, method, args))
        except Exception as exc:  # the worker raises it in the request that asked
            if call_id == 0:
                log.exception("a worker's %s failed", method)
            result = (False, f"{type(exc).__name__}: {exc}")
        if call_id == 0:  # a notification (HoldsClient.notify): nobody waits for an answer
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await send_frame(writer, (call_id, *result))

    async def _call(self, peer: _Peer, method: str, args: tuple[Any, ...]) -> Any:
        if method in _STORE_CALLS:
            if self.store is None:
                raise ValueError(f"{method}: this supervisor serves no store")
            return await self._store_call(self.store, peer, method, args)
        return await self._limiter_call(peer, method, args)

    async def _store_call(self, store: SqlStore, peer: _Peer, method: str, args: tuple[Any, ...]) -> Any:
        if method == "reserve":
            hold: Hold = args[0]
            outcome = await store.reserve(hold)
            if outcome.granted and hold.amount > 0:
                peer.holds[hold.request_id] = hold
                self._held_ids.add(hold.request_id)
            return outcome
        if method == "unhold":  # a reservation whose request was cancelled while it was being granted
            dropped = peer.holds.pop(args[0], None)
            if dropped is not None:
                self._held_ids.discard(dropped.request_id)
                store.drop_hold(dropped)
            return None
        if method == "settle":
            settlement: Settlement = args[0]
            if settlement.reserved and settlement.request_id not in self._held_ids:
                # Its hold was released already (its worker's connection dropped and came back): charged, but
                # nothing is released twice.
                settlement = dataclasses.replace(settlement, reserved=0)
            try:
                await store.settle(settlement)
            finally:
                peer.holds.pop(settlement.request_id, None)
                self._held_ids.discard(settlement.request_id)
            return None
        if method == "forget":
            store._forget(**args[0])  # an admin change in a worker: read the key or account again
        else:
            store._restart_held(*args)  # a key's reset period changed: its holds move with its counters
        return None

    async def _limiter_call(self, peer: _Peer, method: str, args: tuple[Any, ...]) -> Any:
        assert self.limiter is not None, method
        if method == "acquire":
            key, request_id, limits, tokens = args
            decision = await self.limiter.acquire(key, request_id, limits, tokens)
            if decision.allowed:
                peer.slots[(key, request_id)] = (limits, tokens)
            return decision
        if method == "release":
            key, request_id = args[0], args[1]
            peer.slots.pop((key, request_id), None)
            return await self.limiter.release(*args)
        if method == "count_refusal":
            return await self.limiter.count_refusal(*args)
        if method == "peek":
            return await self.limiter.peek(*args)
        raise ValueError(f"unknown call {method!r}")

    async def _release(self, peer: _Peer) -> None:
        """A worker's connection closed: what it still holds goes, as a killed process's memory does."""
        store = self.store
        if peer.holds:
            log.warning("a worker left with %d reservation(s) unsettled: released", len(peer.holds))
        for hold in peer.holds.values():  # only with a store (reserve adds them)
            assert store is not None
            self._held_ids.discard(hold.request_id)
            store.drop_hold(hold)  # the request was never answered: no settlement
        if self.limiter is not None:
            for (key, request_id), (limits, tokens) in peer.slots.items():
                await self.limiter.release(key, request_id, limits, tokens, 0)


# -- a worker's side ------------------------------------------------------------------------------------------


class HoldsClient:
    """One connection to the supervisor's HoldsServer, shared by a worker's requests (calls are multiplexed)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._next = 0
        self._connecting: asyncio.Lock | None = None

    async def _connect(self) -> asyncio.StreamWriter:
        # One connection: the supervisor releases what a connection holds when it closes, so a second one
        # opened by a concurrent first call (and dropped) would release the holds of requests still running.
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is None:
                reader, self._writer = await asyncio.open_unix_connection(self.path)
                self._reader_task = asyncio.create_task(self._read(reader), name="holds-client")
        return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                call_id, ok, result = await receive_frame(reader)
                future = self._calls.pop(call_id, None)
                if future is not None and not future.done():
                    if ok:
                        future.set_result(result)
                    else:
                        future.set_exception(RuntimeError(f"the supervisor's store: {result}"))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writer = None
            for future in self._calls.values():
                if not future.done():
                    future.set_exception(ConnectionError("the supervisor's store connection closed"))
            self._calls.clear()

    async def call(self, method: str, *args: Any) -> Any:
        writer = await self._connect()
        self._next += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[self._next] = future
        await send_frame(writer, (self._next, method, args))
        return await future

    async def notify(self, method: str, *args: Any) -> None:
        """A call nobody waits for the answer of. Calls are taken up in the order they were sent, so a later
        call of this worker sees its effect."""
        await send_frame(await self._connect(), (0, method, args))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)


class RemoteHoldsStore(SqlStore):
    """A worker's store on SQLite: the supervisor reserves and settles (its writer child commits); everything
    else is this process's, on the file the supervisor migrated."""

    def __init__(self, url: str, client: HoldsClient, **options: Any) -> None:
        super().__init__(url, **options)
        self.client = client

    async def open(self, *, migrate: bool = True, serve: bool = False) -> None:
        # Not `serve`: the supervisor holds the file's lock and the reservations (store/sql.py open).
        await super().open(migrate=False, serve=False)

    async def reserve(self, hold: Hold) -> Reserved:
        call = asyncio.ensure_future(self.client.call("reserve", hold))
        try:
            outcome: Reserved = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The request is gone, but the supervisor may grant the hold all the same: then it is given back.
            call.add_done_callback(functools.partial(self._unhold, hold))
            raise
        self._unsettled += outcome.granted and hold.amount > 0
        return outcome

    def _unhold(self, hold: Hold, call: asyncio.Future[Any]) -> None:
        if not call.cancelled() and call.exception() is None and call.result().granted:
            self._background(self.client.notify("unhold", hold.request_id))

    async def settle(self, s: Settlement) -> None:
        try:
            await self.client.call("settle", s)
        finally:
            if s.account_id is not None and s.reserved:
                self._unsettled = max(0, self._unsettled - 1)

    def _forget(self, *, token_id: int | None = None, account_id: int | None = None) -> None:
        super()._forget(token_id=token_id, account_id=account_id)
        # The supervisor's cached balance and key counters (what reservations check) are read again too.
        self._background(self.client.notify("forget", {"token_id": token_id, "account_id": account_id}))

    def _restart_held(self, token_id: int, before: int, start: int) -> None:
        # The holds are the supervisor's: it moves them (store/holds.py), before this worker's next call.
        self._background(self.client.notify("restart_held", token_id, before, start))

    def _background(self, call: Coroutine[Any, Any, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop: nothing is served, nothing held
            task = asyncio.get_running_loop().create_task(call)
            _background.add(task)
            task.add_done_callback(_background.discard)
            return
        call.close()

    async def close(self, grace: float = 10.0) -> None:
        await super().close(grace)
        await self.client.close()


_background: set[asyncio.Task[Any]] = set()


class RemoteLimiter:
    """The supervisor's in-memory rate limiter (without Redis), for a worker: one limiter for all workers."""

    def __init__(self, client: HoldsClient) -> None:
        self.client = client

    async def acquire(self, key: str, request_id: str, limits: Limits, tokens: int) -> Decision:
        decision: Decision = await self.client.call("acquire", key, request_id, limits, tokens)
        return decision

    async def release(self, key: str, request_id: str, limits: Limits, estimated_tokens: int,
                      actual_tokens: int) -> None:
        # Not waited for: the supervisor applies it before this worker's next call (see HoldsClient.notify).
        await self.client.notify("release", key, request_id, limits, estimated_tokens, actual_tokens)

    async def count_refusal(self, key: str, limits: Limits) -> Decision:
        decision: Decision = await self.client.call("count_refusal", key, limits)
        return decision

    async def peek(self, key: str, limits: Limits) -> Decision:
        decision: Decision = await self.client.call("peek", key, limits)
        return decision

    async def close(self) -> None:
        return None  # the client closes with the store


def worker_accounts(path: str, *, holds: bool) -> Callable[..., Any]:
    """app.py's `build_accounts` for a worker: the supervisor's holds (`holds`: SQLite) and, without Redis, its
    rate limiter; on PostgreSQL the store is the worker's own (a replica)."""
    from grokgate import app
    from grokgate.core.billing import AccountAdmission

    def build(settings: Any, redis: Any = None) -> tuple[AccountAdmission, SqlStore]:
        client = HoldsClient(path)
        local, store = app.build_accounts(settings, redis)  # as one process builds them
        if holds:  # that store stays closed: the worker's asks the supervisor
            store = RemoteHoldsStore(store.url, client, owner=store.owner, writer_process=False)
        limiter = local.limiter if redis is not None else RemoteLimiter(client)
        return AccountAdmission(store, limiter, settings.api_keys, local.policy), store

    return build


def socket_dir() -> Path:
    """A directory only this user can enter, for the socket."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="grokgate-holds-"))
    os.chmod(path, 0o700)
    return path
