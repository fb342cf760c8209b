"""Graceful drain: how a `grokgate serve` process leaves a load balancer's pool without failing a request.

uvicorn stops accepting connections on the first SIGTERM. Behind a load balancer that checks readiness, that is
too early: until its next check marks this server down, it keeps sending new connections here, and they are
refused. `DrainingServer` (a `uvicorn.Server`) splits the stop in three:

1. **drain** (`drain_seconds` after a SIGTERM): `/readyz` answers 503 `{"status": "draining"}` (api/meta.py) while
   new and in-flight requests are served as before; every answer now carries `Connection: close` (server.py's
   protocol reads the `Drain`), so no idle keep-alive connection is left for the balancer to reuse later.
2. **graceful stop** (uvicorn's, `timeout_graceful_shutdown`): the listening socket closes, idle connections
   close, requests in flight (streams included) run to their end; past the timeout their tasks are cancelled.
3. **lifespan shutdown**: the app closes its store, which waits for every unsettled reservation to settle
   (app.py), and the process exits 0.

`drain_seconds` = 0 skips step 1; so does SIGINT (Ctrl+C in a terminal: nothing balances a terminal's server).
A second SIGTERM or SIGINT forces the stop: nothing more is waited for, and the process ends by that signal
(uvicorn re-raises it; a SIGINT exits 130), as an operator who insisted expects. Like a kill, the forced stop
settles nothing more: requests in flight go unbilled, and what they held is released by the survivors' instance
sweep on PostgreSQL (store/instances.py); on SQLite holds live in memory and go with the process.

One process, one `DrainingServer`: `grokgate serve` runs it through `serve` below; a worker process of a
multi-process server runs its own the same way, with its share of the listening socket (`sockets=`), and drains
when the supervisor forwards it the SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import time
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from grokgate.core.draining import Drain

log = logging.getLogger("grokgate.server")


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain above. uvicorn's signal handler only sets flags its main loop reads every
    0.1 s (`should_exit`, `force_exit`); this one sets the drain's deadline instead, and the loop's tick turns it
    into `should_exit` once it has passed."""

    def __init__(self, config: uvicorn.Config, *, drain: Drain, drain_seconds: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_seconds = drain_seconds
        self._drain_until: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit or self._drain_until is not None:
            # A second signal: stop now. uvicorn's `capture_signals` re-raises what is in `_captured_signals`
            # once the loop has ended, so the process ends by the signal. Only a forced stop is put there: a
            # graceful one exits 0, so a supervisor can tell a clean drain from a forced one.
            self._captured_signals.append(sig)
            self.should_exit = self.force_exit = True
            return
        if sig == signal.SIGTERM and self.drain_seconds > 0 and self.started:
            self.drain.start()
            self._drain_until = time.monotonic() + self.drain_seconds
            log.warning("SIGTERM: draining for %g s (/readyz answers 503), then stopping", self.drain_seconds)
            return
        self.drain.start()  # not ready from here on, whatever stops the server
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None and not self.should_exit and time.monotonic() >= self._drain_until:
            log.warning("drain over: no longer accepting connections; finishing requests in flight")
            self.should_exit = True
        return await super().on_tick(counter)


def serve(app: Any, *, drain_seconds: float, sockets: list[socket.socket] | None = None, **options: Any) -> int:
    """Run `app` as `uvicorn.run(app, **options)` would, with the drain; returns the exit status (0 after a
    graceful stop). `app.state.gateway.drain` (api/deps.py) is the state /readyz reports, and `options["http"]`,
    when it is server.py's protocol, is told about it too (its answers close their connections while draining)."""
    drain: Drain = app.state.gateway.drain
    protocol = options.get("http")
    guard = getattr(protocol, "guard", None)
    if guard is not None:
        guard.drain = drain
    server = DrainingServer(uvicorn.Config(app, **options), drain=drain, drain_seconds=drain_seconds)
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:  # as uvicorn.run: a SIGINT that arrived before the handlers were installed
        if server.force_exit:  # or a SIGINT that forced the stop (re-raised by uvicorn): not a clean stop
            return 128 + signal.SIGINT
    if not server.started:
        sys.exit(STARTUP_FAILURE)
    return 0

