"""Rate limits in Redis, shared by every gateway process that points at the same server.

Check-and-record is one Lua script, so it is atomic across processes, and it reads the clock with
`redis.call('TIME')` so replicas whose clocks disagree still share one window. The bucket arithmetic is
the integer form from `grokgate.core.limits`; the script only mirrors its "does it fit" test and returns
the drained levels, from which Python builds the same Decision the in-process limiter would.

Keys per limited key (hash-tagged so both land in one cluster slot):
  <prefix>{<key>}:b  hash: r/rt = requests level/updated ms, t/tt = tokens level/updated ms
  <prefix>{<key>}:f  sorted set: in-flight request ids scored by lease expiry (ms)

Round trips: one per acquire, one per release of a request that used tokens, one per request refused before
its acquire (`count_refusal`: the error path only) and one before a large body is parsed (`peek`). A release of
a request that used nothing (refused for credits after the limiter let it through, or failed before any output)
is not sent on its own: it rides on this process's next acquire or release of the same key, or on a batched
flush a moment later (`release_delay`). Giving capacity back late can only make a limit stricter for that
moment, never looser, and a burst of credit refusals then costs Redis one round trip each instead of two.

Connections come from a blocking pool: a command waits up to `pool_timeout` for a free connection (redis-py's
default pool raises at once when its 100 connections are busy, which turned healthy bursts into 503s); a pool
still exhausted after that is a store error like an unreachable server (counted in `degraded_total`).
"""

from __future__ import annotations

import asyncio
import logging
from itertools import islice
from typing import Literal

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ClusterDownError, ReadOnlyError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from grokgate.core.limits import WINDOW_MS, Decision, Limits, decide, requests_only
from grokgate.store.redis_client import RedisClient, connect

log = logging.getLogger("grokgate.limits")

# Failures that mean "the store is unreachable right now", not a bug in the script: a replica promoted
# mid-failover answers READONLY until clients reconnect to the new primary. On a Redis Cluster
# (store/redis_client.py): CLUSTERDOWN once a primary is known to have failed (with
# cluster-require-full-coverage, every node answers it), TRYAGAIN while a slot migrates, and redis-py's own
# RedisClusterException when no node of the cluster can be reached or a slot has no node.
STORE_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError,
                                                 ClusterDownError, TryAgainError, RedisClusterException)

# Slack added to every TTL so a key never vanishes while its state still matters.
_TTL_SLACK_MS = 1000

# Deferred releases carried by one acquire or release (on a request's path: kept short), and by one call
# of a background flush per key.
_CARRY_MAX = 64
_FLUSH_MAX = 1000
# Deferred releases held at most: past it (Redis unreachable for long, fail_open serving on), a release is
# dropped with a warning and its lease frees the slot instead.
_DEFERRED_MAX = 10_000
# A flush that failed for a store error is retried after this long.
_FLUSH_RETRY_S = 1.0

ReleasePairs = list[str | int]  # request id, actual - estimated tokens, request id, ...

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Releases carried by a call: ARGV from `first` on are pairs (request id, actual - estimated tokens). A request
# still in flight gives its slot back and its token correction is applied to the drained level `tk`; one no
# longer there (released already, or its lease expired and was purged) changes nothing, so a release sent
# twice counts once. Counts the requests found in `found`; sets `given` when the token level moved.
def _apply_releases(first: int) -> str:
    return f"""
local found, given = 0, false
for i = {first}, #ARGV, 2 do
  if redis.call('ZREM', KEYS[2], ARGV[i]) == 1 then
    found = found + 1
    local d = tonumber(ARGV[i + 1])
    if tpm > 0 and d ~= 0 then tk = math.max(0, tk + d * {WINDOW_MS}); given = true end
  end
end
"""


# Writes the token level `tk` back after releases moved it, keeping the hash alive until it drains.
_STORE_TOKENS = f"""
redis.call('HSET', KEYS[1], 't', string.format('%.0f', tk), 'tt', string.format('%.0f', now))
local need = math.ceil(tk / tpm) + {_TTL_SLACK_MS}
if redis.call('PTTL', KEYS[1]) < need then redis.call('PEXPIRE', KEYS[1], string.format('%.0f', need)) end
"""

# KEYS: bucket hash, in-flight zset. ARGV: rpm, tpm, concurrency (0 = unlimited), tokens, request id, lease ms,
# then release pairs (see _apply_releases), applied before the decision.
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
{_apply_releases(7)}
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local n = redis.call('ZCARD', KEYS[2])
local ok = (rpm == 0 or r + (1 - rpm) * W <= 0)
  and (tpm == 0 or tk + (cost - tpm) * W <= 0)
  and (conc == 0 or n < conc)
if not ok then
  if given then {_STORE_TOKENS} end
  return {{0, r, tk, n}}
end
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

# KEYS: bucket hash, in-flight zset. ARGV: tpm (0 = unlimited), then release pairs (see _apply_releases).
# Returns how many of them were in flight (the others were released already, or their lease expired and was
# purged).
RELEASE_LUA = _NOW + f"""
local tpm = tonumber(ARGV[1])
local tk = 0
if tpm > 0 then
  local s = redis.call('HMGET', KEYS[1], 't', 'tt')
  if s[1] then tk = math.max(0, tonumber(s[1]) - math.max(0, now - tonumber(s[2] or now)) * tpm) end
end
{_apply_releases(2)}
if given then {_STORE_TOKENS} end
return found
"""


# The rpm bucket alone, for requests refused before `acquire` (core/limits.py RateLimiter.count_refusal) and for
# the read-only check before a large body is parsed (`peek`). KEYS: bucket hash. ARGV: rpm.
_REQUESTS_LEVEL = _NOW + """
local rpm = tonumber(ARGV[1])
local s = redis.call('HMGET', KEYS[1], 'r', 'rt')
local r = 0
if s[1] then r = math.max(0, tonumber(s[1]) - math.max(0, now - tonumber(s[2] or now)) * rpm) end
"""

# Returns {fitted, drained requests level}, the level before this refusal; the refusal is recorded when it fits.
# The hash's expiry is only ever lengthened: it may also hold a token level that drains for longer.
REFUSAL_LUA = _REQUESTS_LEVEL + f"""
if r + (1 - rpm) * {WINDOW_MS} > 0 then return {{0, r}} end
local nr = r + {WINDOW_MS}
redis.call('HSET', KEYS[1], 'r', string.format('%.0f', nr), 'rt', string.format('%.0f', now))
local need = math.ceil(nr / rpm) + {_TTL_SLACK_MS}
if redis.call('PTTL', KEYS[1]) < need then redis.call('PEXPIRE', KEYS[1], string.format('%.0f', need)) end
return {{1, r}}
"""

# Returns the drained requests level; writes nothing.
PEEK_LUA = _REQUESTS_LEVEL + """
return r
"""


def _pool_exhausted(exc: BaseException) -> bool:
    # How redis-py's BlockingConnectionPool reports its wait running out (redis/asyncio/connection.py).
    return isinstance(exc, RedisConnectionError) and isinstance(exc.__cause__, TimeoutError)


class RedisRateLimiter:
    def __init__(
        self,
        client: RedisClient | str,
        *,
        key_prefix: str = "grokgate:rl:",
        on_store_error: Literal["fail_open", "fail_closed"] = "fail_open",
        lease_seconds: float = 600.0,
        max_connections: int = 64,
        pool_timeout: float = 2.0,
        release_delay: float = 0.05,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        if on_store_error not in ("fail_open", "fail_closed"):
            raise ValueError(f"on_store_error must be 'fail_open' or 'fail_closed', got {on_store_error!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections!r}")
        if pool_timeout <= 0 or release_delay < 0:
            raise ValueError("pool_timeout must be positive and release_delay not negative")
        if isinstance(client, str):
            # The limiter sits on every request's path: when Redis is down, answer (degraded) within about a
            # second instead of redis-py's defaults of 5 s timeouts and 10 retries. The retry covers sending
            # and reading, not the wait for a pool connection, which `pool_timeout` bounds on its own.
            client = connect(client, max_connections=max_connections, pool_timeout=pool_timeout,
                             socket_timeout=0.5, retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1))
            self._owns_client = True
            self._pool_hint = (f"; all {max_connections} connections stayed busy for {pool_timeout:g} s: see "
                               "GROKGATE_REDIS_MAX_CONNECTIONS and GROKGATE_REDIS_POOL_TIMEOUT_SECONDS")
        else:
            self._owns_client = False
            self._pool_hint = ""
        self._redis = client
        self._prefix = key_prefix
        self._on_store_error = on_store_error
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._acquire = client.register_script(ACQUIRE_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self._refusal = client.register_script(REFUSAL_LUA)
        self._peek = client.register_script(PEEK_LUA)
        self._release_delay = release_delay
        # Releases of requests that used nothing, not sent yet: key -> {request id: actual - estimated tokens},
        # and the key's tpm limit when they were made.
        self._deferred: dict[str, dict[str, int]] = {}
        self._deferred_tpm: dict[str, int] = {}
        self._deferred_total = 0
        self._flusher: asyncio.Task[None] | None = None
        self.degraded_total = 0  # decisions made without the store; read by metrics

    def _keys(self, key: str) -> list[str]:
        base = f"{self._prefix}{{{key}}}"
        return [f"{base}:b", f"{base}:f"]

    def _take(self, key: str, limit: int) -> ReleasePairs:
        """Remove up to `limit` deferred releases of `key`, as script arguments."""
        held = self._deferred.get(key)
        if not held:
            return []
        if len(held) <= limit:
            del self._deferred[key]
            self._deferred_tpm.pop(key, None)
            taken = list(held.items())
        else:
            taken = [(request_id, held.pop(request_id)) for request_id in list(islice(held, limit))]
        self._deferred_total -= len(taken)
        return [v for pair in taken for v in pair]

    def _put_back(self, key: str, tpm: int, pairs: ReleasePairs) -> None:
        """Keep releases whose call failed for a later one (sending one twice is harmless: see the scripts)."""
        if not pairs:
            return
        held = self._deferred.setdefault(key, {})
        self._deferred_tpm.setdefault(key, tpm)
        for i in range(0, len(pairs), 2):
            request_id = str(pairs[i])
            if request_id not in held:
                held[request_id] = int(pairs[i + 1])
                self._deferred_total += 1
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flusher is None and self._deferred:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def acquire(self, key: str, request_id: str, limits: Limits, tokens: int) -> Decision:
        cost = max(0, tokens)
        tpm = limits.tpm or 0
        carried = self._take(key, _CARRY_MAX)
        args: list[int | str] = [limits.rpm or 0, tpm, limits.concurrency or 0, cost, request_id, self._lease_ms,
                                 *carried]
        try:
            result = await self._acquire(keys=self._keys(key), args=args)
        except STORE_ERRORS as exc:
            self._put_back(key, tpm, carried)
            return self._unavailable(exc, key)
        except BaseException:
            self._put_back(key, tpm, carried)  # cancelled (the client left) or a bug: the releases still count
            raise
        allowed, requests_level, tokens_level, in_flight = (int(v) for v in result)
        decision = decide(limits, cost, requests_level, tokens_level, in_flight)
        if decision.allowed != bool(allowed):
            # Only possible if the script's fit test drifts from decide(); tests keep them equal.
            log.error("rate-limit script and decide() disagree for key %s (script allowed=%s)", key, allowed)
        return decision

    def _unavailable(self, exc: BaseException, key: str) -> Decision:
        self.degraded_total += 1
        log.warning("rate-limit store unavailable (%s: %s%s); %s for key %s", type(exc).__name__, exc,
                    self._pool_hint if _pool_exhausted(exc) else "", self._on_store_error.replace("_", " "), key)
        if self._on_store_error == "fail_open":
            return Decision(True, "store_unavailable", 0.0, {})
        return Decision(False, "store_unavailable", 1.0, {"retry-after": "1"})

    async def count_refusal(self, key: str, limits: Limits) -> Decision:
        if limits.rpm is None:
            return Decision(True, None, 0.0, {})
        try:
            fitted, level = (int(v) for v in await self._refusal(keys=self._keys(key)[:1], args=[limits.rpm]))
        except STORE_ERRORS as exc:
            return self._unavailable(exc, key)
        decision = decide(requests_only(limits), 0, level, 0, 0)
        if decision.allowed != bool(fitted):
            log.error("rate-limit refusal script and decide() disagree for key %s (script fitted=%s)", key, fitted)
        return decision

    async def peek(self, key: str, limits: Limits) -> Decision:
        if limits.rpm is None:
            return Decision(True, None, 0.0, {})
        try:
            level = int(await self._peek(keys=self._keys(key)[:1], args=[limits.rpm]))
        except STORE_ERRORS as exc:
            return self._unavailable(exc, key)
        return decide(requests_only(limits), 0, level, 0, 0)

    async def release(
        self, key: str, request_id: str, limits: Limits, estimated_tokens: int, actual_tokens: int
    ) -> None:
        delta = max(0, actual_tokens) - max(0, estimated_tokens)
        tpm = limits.tpm or 0
        if actual_tokens <= 0:
            # Nothing used: only capacity goes back, and late is safe (module docstring). No await, so a later
            # acquire of this key in this process carries it.
            if self._deferred_total >= _DEFERRED_MAX:
                log.warning("rate-limit release dropped for key %s (%d releases waiting for the store); "
                            "its lease will expire instead", key, self._deferred_total)
                return
            held = self._deferred.setdefault(key, {})
            if request_id not in held:
                self._deferred_total += 1
            held[request_id] = delta
            self._deferred_tpm[key] = tpm
            self._schedule_flush()
            return
        carried = [request_id, delta, *self._take(key, _CARRY_MAX)]
        try:
            await self._release(keys=self._keys(key), args=[tpm, *carried])
        except STORE_ERRORS as exc:
            # The lease expiry frees the slot eventually; a lost token correction only errs by one request.
            # Releases it carried for others are kept for the next call.
            self._put_back(key, tpm, carried[2:])
            log.warning("rate-limit release failed for key %s (%s: %s); its lease will expire instead",
                        key, type(exc).__name__, exc)
        except BaseException:
            self._put_back(key, tpm, carried[2:])
            raise

    async def _flush_later(self) -> None:
        """Send the deferred releases a moment after the first one, batched per key, until none is left."""
        delay = self._release_delay
        try:
            while True:
                await asyncio.sleep(delay)
                if not self._deferred:
                    return
                delay = _FLUSH_RETRY_S if await self._flush() else self._release_delay
        finally:
            self._flusher = None

    async def _flush(self) -> bool:
        """One call per key with deferred releases, all at once; True when a store error kept some back."""
        batch: list[tuple[str, int, ReleasePairs]] = []
        for key in list(self._deferred):
            tpm = self._deferred_tpm.get(key, 0)
            batch.append((key, tpm, self._take(key, _FLUSH_MAX)))
        try:
            results = await asyncio.gather(
                *(self._release(keys=self._keys(key), args=[tpm, *pairs]) for key, tpm, pairs in batch),
                return_exceptions=True)
        except BaseException:
            for key, tpm, pairs in batch:
                self._put_back(key, tpm, pairs)
            raise
        failed: BaseException | None = None
        for (key, tpm, pairs), result in zip(batch, results, strict=True):
            if isinstance(result, STORE_ERRORS):
                failed = result
                self._put_back(key, tpm, pairs)
            elif isinstance(result, BaseException):
                log.error("rate-limit release failed for key %s (%s: %s); its lease will expire instead",
                          key, type(result).__name__, result)
        if failed is not None:
            log.warning("rate-limit releases not sent (%s: %s); %d waiting, retried in %.0f s",
                        type(failed).__name__, failed, self._deferred_total, _FLUSH_RETRY_S)
        return failed is not None

    async def flush(self) -> None:
        """Send the deferred releases now (close() does; tests use it to make "a moment later" now)."""
        if self._deferred:
            await self._flush()

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.wait([self._flusher])  # what it carried was put back
        try:
            # Best effort: what is not sent now is freed by the leases.
            await asyncio.wait_for(self.flush(), timeout=1.0)
        except TimeoutError:
            pass
        if self._flusher is not None:  # a failed flush scheduled a retry: nobody is left to run it
            self._flusher.cancel()
        self._deferred.clear()
        self._deferred_tpm.clear()
        self._deferred_total = 0
        if self._owns_client:
            await self._redis.aclose()
