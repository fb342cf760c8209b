"""Rate limits in Redis, shared by every gateway process that points at the same server.

Check-and-record is one Lua script, so it is atomic across processes, and it reads the clock with
`redis.call('TIME')` so replicas whose clocks disagree still share one window. The bucket arithmetic is
the integer form from `grokgate.core.limits`; the script only mirrors its "does it fit" test and returns
the drained levels, from which Python builds the same Decision the in-process limiter would.

Keys per limited key (hash-tagged so both land in one cluster slot):
  <prefix>{<key>}:b  hash: r/rt = requests level/updated ms, t/tt = tokens level/updated ms
  <prefix>{<key>}:f  sorted set: in-flight request ids scored by lease expiry (ms)
"""

from __future__ import annotations

import logging
from typing import Literal

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from grokgate.core.limits import WINDOW_MS, Decision, Limits, decide

log = logging.getLogger("grokgate.limits")

# Failures that mean "the store is unreachable right now", not a bug in the script: a replica promoted
# mid-failover answers READONLY until clients reconnect to the new primary.
STORE_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)

# Slack added to every TTL so a key never vanishes while its state still matters.
_TTL_SLACK_MS = 1000

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: bucket hash, in-flight zset. ARGV: rpm, tpm, concurrency (0 = unlimited), tokens, request id, lease ms.
# Returns {allowed, drained requests level, drained tokens level, live in-flight count}, levels before this
# request is recorded. Numbers are formatted with %.0f because tostring() would round them to 14 digits.
ACQUIRE_LUA = _NOW + f"""
local W = {WINDOW_MS}
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cost, lease = tonumber(ARGV[4]), tonumber(ARGV[6])
local s = redis.call('HMGET', KEYS[1], 'r', 'rt', 't', 'tt')
local function drain(level, at, limit)
  if limit == 0 or level == nil then return 0 end
  return math.max(0, level - math.max(0, now - tonumber(at or now)) * limit)
end
local r = drain(tonumber(s[1]), s[2], rpm)
local tk = drain(tonumber(s[3]), s[4], tpm)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local n = redis.call('ZCARD', KEYS[2])
local ok = (rpm == 0 or r + (1 - rpm) * W <= 0)
  and (tpm == 0 or tk + (cost - tpm) * W <= 0)
  and (conc == 0 or n < conc)
if not ok then return {{0, r, tk, n}} end
local nr, nt, ttl = 0, 0, 0
if rpm > 0 then nr = r + W; ttl = math.ceil(nr / rpm) end
if tpm > 0 then nt = tk + cost * W; ttl = math.max(ttl, math.ceil(nt / tpm)) end
if ttl > 0 then
  redis.call('HSET', KEYS[1], 'r', string.format('%.0f', nr), 'rt', string.format('%.0f', now),
    't', string.format('%.0f', nt), 'tt', string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[1], string.format('%.0f', ttl + {_TTL_SLACK_MS}))
end
redis.call('ZADD', KEYS[2], string.format('%.0f', now + lease), ARGV[5])
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[2], string.format('%.0f', tonumber(last[2]) - now + {_TTL_SLACK_MS}))
return {{1, r, tk, n}}
"""

# KEYS: bucket hash, in-flight zset. ARGV: request id, tpm (0 = unlimited), actual - estimated tokens.
# Returns 1 if the request was in flight, 0 if unknown (already released, or its lease expired and was purged).
RELEASE_LUA = _NOW + f"""
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
local tpm, delta = tonumber(ARGV[2]), tonumber(ARGV[3])
if tpm == 0 or delta == 0 then return 1 end
local s = redis.call('HMGET', KEYS[1], 't', 'tt')
local tk = 0
if s[1] then tk = math.max(0, tonumber(s[1]) - math.max(0, now - tonumber(s[2] or now)) * tpm) end
tk = math.max(0, tk + delta * {WINDOW_MS})
redis.call('HSET', KEYS[1], 't', string.format('%.0f', tk), 'tt', string.format('%.0f', now))
local need = math.ceil(tk / tpm) + {_TTL_SLACK_MS}
if redis.call('PTTL', KEYS[1]) < need then redis.call('PEXPIRE', KEYS[1], string.format('%.0f', need)) end
return 1
"""


class RedisRateLimiter:
    def __init__(
        self,
        client: Redis | str,
        *,
        key_prefix: str = "grokgate:rl:",
        on_store_error: Literal["fail_open", "fail_closed"] = "fail_open",
        lease_seconds: float = 600.0,
        max_connections: int = 64,
        pool_timeout: float = 2.0,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        if on_store_error not in ("fail_open", "fail_closed"):
            raise ValueError(f"on_store_error must be 'fail_open' or 'fail_closed', got {on_store_error!r}")
        if isinstance(client, str):
            # The limiter sits on every request's path: when Redis is down, answer (degraded) within about a
            # second instead of redis-py's defaults of 5 s timeouts and 10 retries.
            client = Redis.from_url(
                client, socket_timeout=0.5, socket_connect_timeout=0.5,
                retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
            )
            self._owns_client = True
        else:
            self._owns_client = False
        self._redis = client
        self._prefix = key_prefix
        self._on_store_error = on_store_error
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._acquire = client.register_script(ACQUIRE_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self.degraded_total = 0  # decisions made without the store; read by metrics

    def _keys(self, key: str) -> list[str]:
        base = f"{self._prefix}{{{key}}}"
        return [f"{base}:b", f"{base}:f"]

    async def acquire(self, key: str, request_id: str, limits: Limits, tokens: int) -> Decision:
        cost = max(0, tokens)
        args: list[int | str] = [
            limits.rpm or 0, limits.tpm or 0, limits.concurrency or 0, cost, request_id, self._lease_ms
        ]
        try:
            result = await self._acquire(keys=self._keys(key), args=args)
        except STORE_ERRORS as exc:
            self.degraded_total += 1
            log.warning("rate-limit store unavailable (%s: %s); %s for key %s",
                        type(exc).__name__, exc, self._on_store_error.replace("_", " "), key)
            if self._on_store_error == "fail_open":
                return Decision(True, "store_unavailable", 0.0, {})
            return Decision(False, "store_unavailable", 1.0, {"retry-after": "1"})
        allowed, requests_level, tokens_level, in_flight = (int(v) for v in result)
        decision = decide(limits, cost, requests_level, tokens_level, in_flight)
        if decision.allowed != bool(allowed):
            # Only possible if the script's fit test drifts from decide(); tests keep them equal.
            log.error("rate-limit script and decide() disagree for key %s (script allowed=%s)", key, allowed)
        return decision

    async def release(
        self, key: str, request_id: str, limits: Limits, estimated_tokens: int, actual_tokens: int
    ) -> None:
        delta = max(0, actual_tokens) - max(0, estimated_tokens)
        try:
            await self._release(keys=self._keys(key), args=[request_id, limits.tpm or 0, delta])
        except STORE_ERRORS as exc:
            # The lease expiry frees the slot eventually; a lost token correction only errs by one request.
            log.warning("rate-limit release failed for key %s (%s: %s); its lease will expire instead",
                        key, type(exc).__name__, exc)

    async def close(self) -> None:
        if self._owns_client:
            await self._redis.aclose()
