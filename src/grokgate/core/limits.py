"""Per-token rate limits: requests per minute, tokens per minute and requests in flight.

Both per-minute limits are token buckets (equivalently GCRA): capacity = the per-minute limit, refilled
continuously at limit/60 per second, so a key may burst its whole minute at once and then gets a steady
trickle. That is a sliding 60 s window without storing one entry per request.

Arithmetic is exact integers so every backend (Python here, Lua in Redis) reaches the same answer: a bucket's
`level` is the amount in use scaled by WINDOW_MS (one request or token costs WINDOW_MS), and it drains by
`limit` per elapsed millisecond. A request of cost c fits when level + c*WINDOW_MS <= limit*WINDOW_MS.
Values stay far below 2**53, where Lua's doubles stop being exact, for any limit under ~10**11.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

WINDOW_MS = 60_000

# A refused request that cannot fit even in an empty bucket (more tokens than the whole per-minute budget)
# would otherwise wait forever; it is refused as "tpm" and told to come back after a full window. Callers
# that want a 4xx "request too large" instead can compare the estimate with `Limits.tpm` themselves.
NEVER_FITS_RETRY_S = WINDOW_MS / 1000

# Nobody knows when another request will end, so a concurrency refusal suggests a short, fixed pause.
CONCURRENCY_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None  # requests per minute; None = unlimited
    tpm: int | None = None  # tokens per minute; None = unlimited
    concurrency: int | None = None  # max requests in flight; None = unlimited

    def __post_init__(self) -> None:
        # A zero limit would refuse forever with a meaningless retry-after; blocking a key is authentication's job.
        for name in ("rpm", "tpm", "concurrency"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str | None  # "rpm" | "tpm" | "concurrency" | "store_unavailable" | None
    retry_after: float  # seconds until a retry may succeed (0 when allowed)
    headers: dict[str, str]  # rate-limit headers to put on the response (also when allowed)


class RateLimiter(Protocol):
    async def acquire(self, key: str, request_id: str, limits: Limits, tokens: int) -> Decision: ...

    async def release(
        self, key: str, request_id: str, limits: Limits, estimated_tokens: int, actual_tokens: int
    ) -> None:
        """End an acquired request: free its slot and correct its tokens by actual - estimated.

        Idempotent. A later acquire of the same key in this process sees it; when nothing was used
        (`actual_tokens <= 0`) a shared store may apply it for other processes a moment later, which can only
        make a limit stricter for that moment (store/limits_redis.py).
        """
        ...

    async def count_refusal(self, key: str, limits: Limits) -> Decision:
        """Count a request refused before `acquire` counted it (a body that failed validation, an unknown model)
        as one request against the rpm bucket, if it fits: not against tpm, and it takes no concurrency slot.

        Called only on the error path (api/deps.py `refusal`), so an answered request costs nothing more. Not
        allowed: the key is past its rpm (the refusal is not recorded then); a limit store that cannot be reached
        answers "store_unavailable", as `acquire` does. Always allowed without an rpm limit.
        """
        ...

    async def peek(self, key: str, limits: Limits) -> Decision:
        """Whether one more request would fit the rpm bucket now, recording nothing (only the rpm limit is
        checked): asked before a large body is parsed (core/billing.py `AccountAdmission.servable`)."""
        ...

    async def close(self) -> None: ...


def requests_only(limits: Limits) -> Limits:
    """The rpm part of `limits`: what a refused request counts against and what `peek` checks."""
    return Limits(rpm=limits.rpm)


def drain(level: int, elapsed_ms: int, limit: int | None) -> int:
    """The level after `elapsed_ms` of refill; 0 for an unlimited bucket so a later limit starts empty."""
    if limit is None:
        return 0
    return max(0, level - max(0, elapsed_ms) * limit)


def corrected(level: int, delta_tokens: int) -> int:
    """Apply release's `actual - estimated` to a drained TPM level; returned tokens never go below empty."""
    return max(0, level + delta_tokens * WINDOW_MS)


def wait_ms(level: int, cost: int, limit: int) -> int | None:
    """Milliseconds until `cost` fits (0 = now), or None when it can never fit."""
    over = level + (cost - limit) * WINDOW_MS
    if over <= 0:
        return 0
    if cost > limit:
        return None
    return -(-over // limit)


def full_in_ms(level: int, limit: int | None) -> int:
    """Milliseconds until the bucket is back to its initial (empty) state."""
    return 0 if limit is None or level <= 0 else -(-level // limit)


def remaining(level: int, limit: int) -> int:
    return max(0, (limit * WINDOW_MS - level) // WINDOW_MS)


def go_duration(ms: int) -> str:
    """Format like Go's time.Duration (OpenAI's reset headers): 0s, 20ms, 1s, 12.5s, 6m0s, 1h0m0s."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{minutes}m{seconds}"
    return seconds


def rate_limit_headers(
    limits: Limits, request_level: int, token_level: int, retry_after: float | None = None
) -> dict[str, str]:
    """OpenAI-style x-ratelimit-* headers for the limits that are set, plus retry-after when refused."""
    headers: dict[str, str] = {}
    if limits.rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(limits.rpm)
        headers["x-ratelimit-remaining-requests"] = str(remaining(request_level, limits.rpm))
        headers["x-ratelimit-reset-requests"] = go_duration(full_in_ms(request_level, limits.rpm))
    if limits.tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(remaining(token_level, limits.tpm))
        headers["x-ratelimit-reset-tokens"] = go_duration(full_in_ms(token_level, limits.tpm))
    if retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
    return headers


def decide(limits: Limits, tokens: int, request_level: int, token_level: int, in_flight: int) -> Decision:
    """Check all three limits against drained levels (before recording this request).

    When allowed, the headers describe the state after this request is recorded, so `remaining` counts it.
    """
    checks: list[tuple[str, float]] = []
    if limits.rpm is not None:
        wait = wait_ms(request_level, 1, limits.rpm)
        if wait != 0:
            checks.append(("rpm", NEVER_FITS_RETRY_S if wait is None else wait / 1000))
    if limits.tpm is not None:
        wait = wait_ms(token_level, tokens, limits.tpm)
        if wait != 0:
            checks.append(("tpm", NEVER_FITS_RETRY_S if wait is None else wait / 1000))
    if limits.concurrency is not None and in_flight >= limits.concurrency:
        checks.append(("concurrency", CONCURRENCY_RETRY_S))
    if checks:
        # Every check must pass, so a retry is pointless before the slowest one clears.
        retry_after = max(wait for _, wait in checks)
        headers = rate_limit_headers(limits, request_level, token_level, retry_after)
        return Decision(False, checks[0][0], retry_after, headers)
    after_requests = request_level + WINDOW_MS if limits.rpm is not None else 0
    after_tokens = token_level + tokens * WINDOW_MS if limits.tpm is not None else 0
    return Decision(True, None, 0.0, rate_limit_headers(limits, after_requests, after_tokens))
