"""Whether this process is stopping: the state grokgate.drain's server sets on a SIGTERM and /readyz
(api/meta.py) and the HTTP protocol (server.py) read. Here, in core, so the api layer reads it without importing
the server."""

from __future__ import annotations

import time


class Drain:
    """Whether this process is draining: set once by its server, read by /readyz and the HTTP protocol."""

    __slots__ = ("since",)

    def __init__(self) -> None:
        self.since: float | None = None  # time.monotonic() of the SIGTERM

    @property
    def draining(self) -> bool:
        return self.since is not None

    def start(self) -> None:
        if self.since is None:
            self.since = time.monotonic()
