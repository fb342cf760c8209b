"""The exact response cache's domain: what a model's rule allows, what a request asks for, and the store protocol.

An answer is cached per model only when the operator opts the model in (the routing file's `cache:` section,
routing.py) and the request does not turn it off (`x-grokgate-cache: off`, or `ttl=SECONDS` to keep its answer
for a different time, at most the rule's `max_ttl`). The serving layer (serving/response_cache.py) keys an
answer by its owner and the canonical request, replays a hit through the same lifecycle and stores a miss once it
completed. The bytes live in a `ResponseCacheStore`: Redis when configured (store/response_cache_redis.py, shared
by replicas) or this process's memory (store/response_cache_memory.py).

A hit is billed by `core/pricing.py cache_hit_cost`; its ledger row and metrics name the backend `CACHE_BACKEND`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, Protocol

from grokgate.core.errors import bad_request

CACHE_BACKEND: Final = "cache"  # the backend a hit is settled, logged and counted under
CACHE_HEADER: Final = "x-grokgate-cache"  # the request's option and the response's hit | miss
MAX_TTL_SECONDS: Final = 30 * 86_400  # no rule keeps an answer longer than 30 days

Scope = Literal["principal", "global"]


@dataclass(frozen=True, slots=True)
class CacheRule:
    """One model's opt-in: `ttl` seconds by default, at most `max_ttl` when a request asks for more.

    `cache_sampled`: also cache requests sampled at random (temperature > 0, or absent: the backends' default is
    1, and no seed), whose answers a backend would not repeat; off by default, since a cache then turns a
    random answer into a fixed one. `scope`: `principal` (default) keys answers by the calling token, so no
    tenant sees another's answers; `global` shares them between every caller of the model."""

    ttl: int = 600
    max_ttl: int = 3600
    cache_sampled: bool = False
    scope: Scope = "principal"

    def __post_init__(self) -> None:
        if not 1 <= self.ttl <= MAX_TTL_SECONDS or not 1 <= self.max_ttl <= MAX_TTL_SECONDS:
            raise ValueError(f"cache ttl and max_ttl must be 1..{MAX_TTL_SECONDS} seconds")
        if self.ttl > self.max_ttl:
            raise ValueError(f"cache ttl ({self.ttl}) must not exceed max_ttl ({self.max_ttl})")


@dataclass(frozen=True, slots=True)
class CacheOption:
    """What one request asked for with its `x-grokgate-cache` header: `off`, or a time to keep its answer."""

    off: bool = False
    ttl: int | None = None


OFF: Final = CacheOption(off=True)


def parse_option(value: str | None) -> CacheOption | None:
    """The request header: absent -> None (the rule decides); `off`; or `ttl=SECONDS` (1..30 days). Anything else
    is a 400 naming the header."""
    if value is None:
        return None
    text = value.strip().lower()
    if text in ("off", "no-store", "bypass"):
        return OFF
    name, sep, number = text.partition("=")
    number = number.strip()
    # ASCII digits only: str.isdigit() also takes '²' and '①', which int() refuses.
    if sep and name.strip() == "ttl" and number.isascii() and number.isdigit() and len(number) <= 9:
        ttl = int(number)
        if 1 <= ttl <= MAX_TTL_SECONDS:
            return CacheOption(ttl=ttl)
    raise bad_request(f"The {CACHE_HEADER} header must be 'off' or 'ttl=SECONDS' (1 to {MAX_TTL_SECONDS}).",
                      CACHE_HEADER)


def effective_ttl(rule: CacheRule, option: CacheOption | None) -> int | None:
    """Seconds to keep this request's answer: None when the request turned the cache off."""
    if option is None:
        return rule.ttl
    if option.off:
        return None
    return min(option.ttl or rule.ttl, rule.max_ttl)


def is_sampled(temperature: float | None, seed: int | None) -> bool:
    """Whether an answer is drawn at random: a seed pins it; otherwise any temperature above 0, or none given
    (xAI's and OpenAI's default is 1)."""
    if seed is not None:
        return False
    return temperature is None or temperature > 0


class ResponseCacheStore(Protocol):
    """Bytes under a key for a time: a shared store (Redis) or this process's memory, bounded."""

    async def get(self, key: str) -> bytes | None:
        """The value, or None when absent or expired. Raises on a store failure (the caller then misses)."""

    async def put(self, key: str, value: bytes, ttl: int) -> None:
        """Keep `value` for `ttl` seconds (replacing any value under the key)."""

    async def close(self) -> None: ...
