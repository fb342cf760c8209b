"""The HTTP server's own bounds: what one connection may hold or cost before its request reaches the app.

`grokgate serve` runs uvicorn with `GuardedHttpToolsProtocol`, uvicorn's httptools protocol plus:

- **head size and count** (`max_header_bytes`, `max_header_count`): 431, then the connection closes. httptools
  joins a header value that arrives in several reads with `bytes +=` (and uvicorn the URL the same way), so one
  huge header cost time quadratic in its size (a 200 MB header: 44 s of a blocked event loop). Bytes are counted
  as they arrive, before the parser sees them, so a head is cut off within one read of the limit. A chunked
  body's trailer fields go through the same joining and are bounded the same way.
- **header and body timeouts** (`header_timeout_seconds` from the connection's start, or a later request's
  first byte, until its head is complete; `body_timeout_seconds` from then until the whole body is in): 408 if
  nothing of an answer was sent yet, else the connection just closes. Time the app takes (reading paused while
  it has not consumed the body, a `100-continue` not yet sent) does not count. Idle time between requests is
  uvicorn's keep-alive timeout; a response may take as long as it takes.
- **connections** (`max_connections` in all, `max_connections_per_client` per peer address, an IPv6 client per
  /64): a connection over a limit is closed at once, without reading it. The default total is derived from the
  descriptor limit, whose soft value is first raised to the hard one.

Every time a limit bites it is counted into a warning that names it, written at most once per limit every
`LOG_INTERVAL` seconds (with the count since the last line), so an attack cannot flood the log.

The per-request cost once a head is complete: a flag test and a counter add per read, a clock read when a head
and when a body starts, a few attribute stores; the timeouts are checked by one sweep over the open
connections a few times a second, not by a timer per request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import httptools
import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.utils import get_remote_addr
from uvicorn.server import ServerState

from grokgate.core.draining import Drain
from grokgate.core.errors import GatewayError
from grokgate.settings import Settings

log = logging.getLogger("grokgate.server")

# uvicorn's default backlog, passed explicitly because the derived connection limit leaves room for one burst
# of it: the event loop accepts every pending connection before any protocol can close the ones over a limit.
BACKLOG = 2048
# Idle time between requests on a kept-alive connection (uvicorn's default, stated here). Clients' pools
# (httpx, aiohttp) keep idle connections about as long; a proxy in front should keep its idle upstream
# connections for less than this, or it will sometimes send a request on one this server just closed.
KEEP_ALIVE_SECONDS = 5
# Descriptors kept for everything else the process opens: database and Redis pools, upstream connections,
# model files, the SQLite writer's pipes, logs.
RESERVED_DESCRIPTORS = 512
LOG_INTERVAL = 5.0

# What each limit is called in the environment, and what happens when it bites.
_SETTING = {
    "max_connections": "GROKGATE_MAX_CONNECTIONS",
    "max_connections_per_client": "GROKGATE_MAX_CONNECTIONS_PER_CLIENT",
    "max_header_bytes": "GROKGATE_MAX_HEADER_BYTES",
    "max_header_count": "GROKGATE_MAX_HEADER_COUNT",
    "header_timeout": "GROKGATE_HEADER_TIMEOUT_SECONDS",
    "body_timeout": "GROKGATE_BODY_TIMEOUT_SECONDS",
}
_EFFECT = {
    "max_connections": "new connections closed at once",
    "max_connections_per_client": "new connections closed at once",
    "max_header_bytes": "requests refused (431) and closed",
    "max_header_count": "requests refused (431) and closed",
    "header_timeout": "connections closed (408 if part of a request had arrived)",
    "body_timeout": "requests ended (408 if nothing was answered yet) and closed",
    "invalid_request": "invalid HTTP requests refused (400) and closed",
    "unsupported_upgrade": "requests asking for a protocol upgrade this server does not speak (served as HTTP)",
}


def derive_max_connections(nofile: int) -> int:
    """The open connections a process with `nofile` descriptors can hold and still open what else it needs."""
    reserve = min(nofile // 2, BACKLOG + RESERVED_DESCRIPTORS)
    return max(1, nofile - reserve)


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (the default soft 1024 is far below what a server with
    thousands of clients needs); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. macOS caps it below an infinite hard limit
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, target, exc)
    return int(soft if soft != resource.RLIM_INFINITY else 1 << 20)


def client_key(peer: tuple[str, int] | None) -> str | None:
    """Whose connection this is, for the per-client limit: the IPv4 address, or the /64 of an IPv6 one (one
    host often holds a whole /64). None for a Unix socket."""
    if not peer or not peer[0]:
        return None
    host = peer[0]
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


@dataclass(frozen=True)
class ServerLimits:
    max_header_bytes: int
    max_header_count: int
    header_timeout: float
    body_timeout: float
    max_connections: int
    max_connections_per_client: int

    @classmethod
    def from_settings(cls, settings: Settings, nofile: int) -> ServerLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            header_timeout=settings.header_timeout_seconds,
            body_timeout=settings.body_timeout_seconds,
            max_connections=settings.max_connections or derive_max_connections(nofile),
            max_connections_per_client=settings.max_connections_per_client,
        )


class LimitLog:
    """At most one warning per limit every `interval` seconds; what is held back is counted into the next one
    (written by `flush` once the interval has passed, if no new hit writes it first)."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic, values: dict[str, object] | None = None) -> None:
        self._logger = logger
        self.interval = interval
        self._clock = clock
        self._values = values or {}
        self._last: dict[str, float] = {}
        self._pending: dict[str, tuple[int, str | None]] = {}  # limit -> (hits held back, the last client)

    def hit(self, limit: str, client: str | None) -> None:
        now = self._clock()
        last = self._last.get(limit)
        held, _ = self._pending.pop(limit, (0, None))
        if last is None or now - last >= self.interval:
            self._write(limit, held + 1, client, now)
        else:
            self._pending[limit] = (held + 1, client)

    def flush(self) -> float | None:
        """Write what waited its interval out; returns the seconds until the next held-back line is due, or
        None when nothing is held back."""
        now = self._clock()
        next_due: float | None = None
        for limit, (count, client) in list(self._pending.items()):
            due = self._last[limit] + self.interval
            if now >= due:
                del self._pending[limit]
                self._write(limit, count, client, now)
            else:
                next_due = due - now if next_due is None else min(next_due, due - now)
        return next_due

    def pending(self) -> bool:
        return bool(self._pending)

    def _write(self, limit: str, count: int, client: str | None, now: float) -> None:
        self._last[limit] = now
        setting = _SETTING.get(limit)
        name = f"{setting}={self._values[limit]}" if setting and limit in self._values else (setting or limit)
        times = "once" if count == 1 else f"{count} times in the last {self.interval:g} s"
        self._logger.warning(
            "HTTP limit %s reached %s: %s (last client %s)", name, times, _EFFECT.get(limit, "refused"),
            client or "-", extra={"limit": limit, "count": count, "client": client, "setting": setting},
        )


class Guard:
    """What all connections of one server share: the counts per client, the open connections the timeout sweep
    walks, and the rate-limited log."""

    def __init__(self, limits: ServerLimits, limit_log: LimitLog | None = None) -> None:
        self.limits = limits
        self.log = limit_log or LimitLog(log, values=asdict(limits))
        self.live: set[GuardedHttpToolsProtocol] = set()
        self.per_client: dict[str, int] = {}
        # Timeouts are enforced to within this; the clock of a connection is read when a phase starts.
        self.interval = min(1.0, max(0.05, min(limits.header_timeout, limits.body_timeout) / 4))
        self._sweeper: asyncio.TimerHandle | None = None
        self._flusher: asyncio.TimerHandle | None = None
        # The process's drain (grokgate.drain), set by its server: while draining, answers close their connection.
        self.drain: Drain | None = None
        # Answers close their connection, readiness unchanged: a worker replaced by a reload (grokgate/workers.py).
        self.closing = False

    def admit(self, conn: GuardedHttpToolsProtocol, key: str | None) -> str | None:
        """Take a place for `conn`, or name the limit it is over."""
        if len(self.live) >= self.limits.max_connections:
            return "max_connections"
        if key is not None:
            held = self.per_client.get(key, 0)
            if held >= self.limits.max_connections_per_client:
                return "max_connections_per_client"
            self.per_client[key] = held + 1
        self.live.add(conn)
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(self.interval, self._sweep, conn.loop)
        return None

    def release(self, conn: GuardedHttpToolsProtocol, key: str | None) -> None:
        self.live.discard(conn)
        if key is not None:
            held = self.per_client.get(key, 0) - 1
            if held > 0:
                self.per_client[key] = held
            else:
                self.per_client.pop(key, None)

    def hit(self, limit: str, client: str | None, loop: asyncio.AbstractEventLoop) -> None:
        self.log.hit(limit, client)
        if self._flusher is None and self.log.pending():
            self._flusher = loop.call_later(self.log.interval, self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        delay = self.log.flush()
        self._flusher = None if delay is None else loop.call_later(delay, self._flush, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for conn in list(self.live):
            if conn._phase:
                conn._check_deadline(now)
        # Only while connections are open, so a stopped server leaves no timer behind.
        self._sweeper = loop.call_later(self.interval, self._sweep, loop) if self.live else None


# A connection's phase, for the timeouts: between requests (or its request fully received), in a head, in a body.
_IDLE, _HEAD, _BODY = 0, 1, 2


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds above. Built by `http_protocol`, which sets `guard`."""

    guard: ClassVar[Guard]

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = self.guard.limits
        self._max_head = limits.max_header_bytes
        self._max_count = limits.max_header_count
        self._phase = _HEAD  # from the connection's start until its first head is in
        self._since = 0.0
        # Bytes of a head (or trailer) so far, counted while `_counting`: between a message's end (or the
        # connection's start) and the next head's end, and after a chunk header until its data starts.
        self._counting = True
        self._head_bytes = 0
        self._client_key: str | None = None
        self._admitted = False

    # -- connections -------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        key = client_key(get_remote_addr(transport))
        over = self.guard.admit(self, key)
        if over is not None:
            transport.close()  # before reading a byte; uvicorn never sees it
            self.guard.hit(over, key, self.loop)
            return
        self._client_key = key
        self._admitted = True
        super().connection_made(transport)
        self._since = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self.guard.release(self, self._client_key)
        super().connection_lost(exc)

    def _should_upgrade_to_ws(self) -> bool:
        # The app serves no WebSocket; a handed-over connection would also leave the guard's accounting.
        return False

    # -- parsing (uvicorn's data_received, with the head bound and the guard's answers) ----------------------------

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._counting:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self.transport.is_closing():  # else a bound refused it from a callback and answered already
                self._refuse("invalid_request", head=True, status=400, code="bad_request",
                             message="Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            self.guard.hit("unsupported_upgrade", self._client_key, self.loop)
            return
        if self._counting and self._head_bytes > self._max_head and not self.transport.is_closing():
            # Still in a head (or a trailer) past the limit: refused before the parser joins any more of it.
            self._refuse_head("max_header_bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase == _IDLE:  # a later request on a kept-alive connection: its head's clock starts now
            self._phase = _HEAD
            self._since = self.loop.time()

    def on_headers_complete(self) -> None:
        self._counting = False
        # The count includes whatever followed the head in the same read: measure the head itself only then.
        if self._head_bytes > self._max_head and self._head_size() > self._max_head:
            self._refuse_head("max_header_bytes")
            raise _Refused
        if len(self.headers) > self._max_count:
            self._refuse_head("max_header_count")
            raise _Refused
        self._phase = _BODY
        self._since = self.loop.time()
        super().on_headers_complete()
        guard = self.guard
        if guard.closing or (guard.drain is not None and guard.drain.since is not None):
            # Draining: this answer goes out with `Connection: close` (uvicorn adds it when keep_alive is off), so
            # a load balancer keeps no idle connection here to send a request on once the server stops accepting.
            self.cycle.keep_alive = False

    def on_chunk_header(self) -> None:
        # Only for chunked bodies. The last (empty) chunk is followed by trailer fields, which httptools joins
        # like header values: count from here; the data of a non-empty chunk stops the count (`on_body`).
        self._counting = True
        self._head_bytes = 0

    def on_body(self, body: bytes) -> None:
        self._counting = False
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        self._counting = True
        self._head_bytes = 0
        super().on_message_complete()

    def _head_size(self) -> int:
        # The request line's target and every field; the fixed parts (method, version, separators) are left
        # out, so a head is refused only when what the client chose to send is over the limit.
        return len(self.url) + sum(len(name) + len(value) for name, value in self.headers)

    # -- timeouts ---------------------------------------------------------------------------------------------------

    def _check_deadline(self, now: float) -> None:
        """Called by the guard's sweep for a connection in a head or a body."""
        if self.flow.read_paused or (self._phase == _BODY and self.cycle.waiting_for_100_continue):
            self._since = now  # waiting for the app, not for the client
            return
        if self._phase == _HEAD:
            if now - self._since > self.guard.limits.header_timeout:
                if self._head_bytes:
                    self._refuse("header_timeout", head=True, status=408, code="request_timeout",
                                 message="The request head did not arrive in time.")
                else:  # nothing was sent at all: close quietly, as for an idle kept-alive connection
                    self._refuse("header_timeout", head=True)
        elif now - self._since > self.guard.limits.body_timeout:
            self._refuse("body_timeout", head=False, status=408, code="request_timeout",
                         message="The request body did not arrive in time.")

    # -- refusing ---------------------------------------------------------------------------------------------------

    def _refuse_head(self, limit: str) -> None:
        bound = self._max_head if limit == "max_header_bytes" else self._max_count
        what = "bytes" if limit == "max_header_bytes" else "fields"
        self._refuse(limit, head=True, status=431, code="headers_too_large",
                     message=f"The request's header fields exceed the limit of {bound} {what}.")

    def _refuse(self, limit: str, *, head: bool, status: int | None = None, code: str = "",
                message: str = "") -> None:
        """Count `limit`, answer `status` if nothing of an answer to another request can be on the way, and close.

        `head`: the refused request is one whose head is not complete (it has no cycle of its own); otherwise
        it is `self.cycle`'s."""
        self._phase = _IDLE
        self._counting = False
        if self.transport.is_closing():  # closed meanwhile (by the client, uvicorn or an earlier refusal)
            return
        self.guard.hit(limit, self._client_key, self.loop)
        cycle = self.cycle
        if head:
            can_answer = cycle is None or cycle.response_complete
        else:
            can_answer = not cycle.response_started and not self.pipeline
        if status is not None and can_answer:
            self.transport.write(self._error_response(status, code, message))
        if cycle is not None and not cycle.response_complete:
            # The app sees a disconnect, and nothing it sends reaches the wire.
            cycle.disconnected = True
            cycle.keep_alive = False
            cycle.message_event.set()
        self.transport.close()

    def _error_response(self, status: int, code: str, message: str) -> bytes:
        request_id = uuid.uuid4().hex
        body = orjson.dumps({"error": GatewayError(status, code, message).body(), "trace_id": request_id})
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend([
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"x-request-id: " + request_id.encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ])
        return b"".join(content)


class _Refused(Exception):
    """Raised from a parser callback after the answer was written, so httptools stops parsing the read."""


def http_protocol(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """Raise the descriptor limit, derive what is left to derive, and return the protocol class for
    `uvicorn.run(http=...)`, bound to one `Guard` (one per server)."""
    nofile = raise_descriptor_limit()
    limits = ServerLimits.from_settings(settings, nofile)
    if limits.max_connections > nofile:
        log.warning("GROKGATE_MAX_CONNECTIONS=%d is above the descriptor limit %d: past it, connections fail "
                    "to be accepted instead of being closed", limits.max_connections, nofile)
    log.info("HTTP bounds", extra={"descriptor_limit": nofile, **asdict(limits)})

    class Protocol(GuardedHttpToolsProtocol):
        guard = Guard(limits)

    return Protocol
