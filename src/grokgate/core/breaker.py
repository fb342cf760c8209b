"""A circuit breaker per upstream key and per backend: cool down after repeated failures, then probe.

closed -> (threshold consecutive failures, or a 429 with retry-after) -> open for `cooldown` seconds ->
half-open: one request may probe; success closes, failure opens again.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Breaker:
    def __init__(self, threshold: int = 3, cooldown: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0
        self._probing = False
        self._probe_started = 0.0

    @property
    def state(self) -> str:
        if self._open_until == 0.0:
            return "closed"
        return "open" if self._clock() < self._open_until else "half_open"

    def retry_in(self) -> float:
        return max(0.0, self._open_until - self._clock())

    def allow(self) -> bool:
        """May a request go through now? In half-open state only one probe at a time."""
        state = self.state
        if state == "closed":
            return True
        # A probe that never reported back (its client left) must not keep the breaker shut for good.
        if state == "open" or (self._probing and self._clock() - self._probe_started < self.cooldown):
            return False
        self._probing = True
        self._probe_started = self._clock()
        return True

    def success(self) -> None:
        self._failures = 0
        self._open_until = 0.0
        self._probing = False

    def failure(self, retry_after: float | None = None) -> None:
        self._failures += 1
        self._probing = False
        if retry_after is not None:
            self._open_until = max(self._open_until, self._clock() + retry_after)
        elif self._failures >= self.threshold or self._open_until:
            self._open_until = self._clock() + self.cooldown
