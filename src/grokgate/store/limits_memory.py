"""Rate limits held in this process: right for a single gateway process, wrong for several replicas.

The event loop runs one coroutine at a time and nothing here awaits, so check-and-record is atomic
without locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from grokgate.core.limits import (
    WINDOW_MS,
    Decision,
    Limits,
    corrected,
    decide,
    drain,
    full_in_ms,
    requests_only,
)

ALLOWED = Decision(True, None, 0.0, {})


@dataclass(slots=True)
class _KeyState:
    requests: int = 0
    requests_at: int = 0
    tokens: int = 0
    tokens_at: int = 0
    # request id -> lease expiry (ms). Every lease runs the same length from when it was taken, so the dict's
    # (insertion) order is expiry order: expired leases are at its front and the last one ends latest.
    in_flight: dict[str, int] = field(default_factory=dict)
    last_lease_end: int = 0  # of the newest live lease; 0 when none
    idle_at: int = 0  # when both buckets are empty and every lease has expired, given the last limits seen


class MemoryRateLimiter:
    def __init__(self, *, lease_seconds: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._clock = clock
        self._states: dict[str, _KeyState] = {}
        self._next_sweep = 0

    @property
    def tracked_keys(self) -> int:
        """How many keys hold state (idle ones are dropped at most a window after going idle)."""
        return len(self._states)

    def _now(self) -> int:
        return int(self._clock() * 1000)

    def _sweep(self, now: int) -> None:
        # Once a window is cheap enough (one pass over the keys) and bounds memory to the keys active
        # in the last couple of minutes; a key that went idle starts again from empty buckets either way.
        if now < self._next_sweep:
            return
        self._next_sweep = now + WINDOW_MS
        for key in [k for k, s in self._states.items() if s.idle_at <= now]:
            del self._states[key]

    @staticmethod
    def _drain(state: _KeyState, limits: Limits, now: int) -> None:
        state.requests = drain(state.requests, now - state.requests_at, limits.rpm)
        state.requests_at = now
        state.tokens = drain(state.tokens, now - state.tokens_at, limits.tpm)
        state.tokens_at = now

    @staticmethod
    def _update_idle_at(state: _KeyState, limits: Limits) -> None:
        state.idle_at = max(
            state.requests_at + full_in_ms(state.requests, limits.rpm),
            state.tokens_at + full_in_ms(state.tokens, limits.tpm),
            state.last_lease_end,
        )

    @staticmethod
    def _expire_leases(state: _KeyState, now: int) -> None:
        # A lease that ran out belongs to a request whose release never came (crashed or lost); stop counting it.
        in_flight = state.in_flight
        while in_flight:
            oldest = next(iter(in_flight))
            if in_flight[oldest] > now:
                break
            del in_flight[oldest]

    async def acquire(self, key: str, request_id: str, limits: Limits, tokens: int) -> Decision:
        now = self._now()
        self._sweep(now)
        cost = max(0, tokens)
        state = self._states.get(key) or _KeyState(requests_at=now, tokens_at=now)
        self._drain(state, limits, now)
        self._expire_leases(state, now)
        decision = decide(limits, cost, state.requests, state.tokens, len(state.in_flight))
        if decision.allowed:
            if limits.rpm is not None:
                state.requests += WINDOW_MS
            if limits.tpm is not None:
                state.tokens += cost * WINDOW_MS
            state.in_flight.pop(request_id, None)  # re-inserted at the end, where the newest lease belongs
            state.last_lease_end = state.in_flight[request_id] = max(now + self._lease_ms, state.last_lease_end)
            self._update_idle_at(state, limits)
            self._states[key] = state
        return decision

    async def release(
        self, key: str, request_id: str, limits: Limits, estimated_tokens: int, actual_tokens: int
    ) -> None:
        state = self._states.get(key)
        if state is None or state.in_flight.pop(request_id, None) is None:
            return
        state.last_lease_end = state.in_flight[next(reversed(state.in_flight))] if state.in_flight else 0
        now = self._now()
        delta = max(0, actual_tokens) - max(0, estimated_tokens)
        if limits.tpm is not None and delta:
            state.tokens = corrected(drain(state.tokens, now - state.tokens_at, limits.tpm), delta)
            state.tokens_at = now
        self._update_idle_at(state, limits)

    async def count_refusal(self, key: str, limits: Limits) -> Decision:
        if limits.rpm is None:
            return ALLOWED
        now = self._now()
        self._sweep(now)
        state = self._states.get(key) or _KeyState(requests_at=now, tokens_at=now)
        self._drain(state, limits, now)
        decision = decide(requests_only(limits), 0, state.requests, 0, 0)
        if decision.allowed:
            state.requests += WINDOW_MS
            self._update_idle_at(state, limits)
            self._states[key] = state
        return decision

    async def peek(self, key: str, limits: Limits) -> Decision:
        if limits.rpm is None:
            return ALLOWED
        state = self._states.get(key)
        level = 0 if state is None else drain(state.requests, self._now() - state.requests_at, limits.rpm)
        return decide(requests_only(limits), 0, level, 0, 0)

    async def close(self) -> None:
        self._states.clear()
