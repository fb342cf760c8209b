"""The deployment's identity in a shared Redis: every key of its rate limits and cached answers carries it.

Token ids repeat across accounts databases (each starts at 1) and static keys repeat across deployments, so two
deployments pointed at one Redis with the same GROKGATE_REDIS_KEY_PREFIX would spend each other's limits and serve
each other's cached answers. Their keys are therefore `<prefix><deployment id>:...`, the id being:

- GROKGATE_DEPLOYMENT_ID when set (settings.deployment_id);
- with accounts on, the one kept in the accounts database (store/schema.py `deployment`, made by migration 0004):
  replicas of one database share it, two databases never do;
- with accounts off, a digest of the static keys' ids (core/admission.py static_key_id): replicas with the same
  GROKGATE_API_KEYS share it.

The id can live in the accounts database, which is opened at start (app.py's lifespan), so the Redis stores are made
then: `RedisDeployment` hands out a limiter and a cache store at build time that make their Redis-backed selves in
`start`. At start the deployment also registers itself under the bare prefix (`<prefix>deployment`): a second
deployment finding another id there logs a warning naming both, since the prefix alone was meant to keep them apart.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from grokgate.core.admission import static_key_id
from grokgate.core.limits import Decision, Limits, RateLimiter
from grokgate.core.response_cache import ResponseCacheStore
from grokgate.store.limits_redis import RedisRateLimiter
from grokgate.store.redis_client import connect

log = logging.getLogger("grokgate.deployment")

REGISTRY_KEY = "deployment"  # <prefix>deployment: the id of the deployment that uses this prefix
_REGISTER_TIMEOUT_S = 1.0  # start-up must not hang on an unreachable Redis: the limiter decides what that means


def static_deployment_id(api_keys: Sequence[str]) -> str:
    """Accounts off: the same static keys, the same deployment (a digest of their ids, never of the keys)."""
    ids = "\n".join(sorted({static_key_id(key) for key in api_keys}))
    return f"keys-{hashlib.sha256(ids.encode()).hexdigest()[:16]}"


def deployment_prefix(key_prefix: str, deployment_id: str) -> str:
    """Where a deployment's keys live. Neither part has braces or colons in the id (settings.py's patterns), so
    the limiter's {hash tag} after it stays the only one, and no deployment's keys start with another's."""
    return f"{key_prefix}{deployment_id}:"


class DeploymentLimiter:
    """The Redis rate limiter, made by `start` under the deployment's prefix. A RateLimiter; on every request's path
    it hands out the inner limiter's coroutine (no coroutine of its own)."""

    def __init__(self, make: Callable[[str], RedisRateLimiter]) -> None:
        self._make = make
        self._limiter: RedisRateLimiter | None = None

    def start(self, prefix: str) -> None:
        self._limiter = self._make(prefix)

    @property
    def _started(self) -> RedisRateLimiter:
        if self._limiter is None:
            raise RuntimeError("the rate limiter is used before the app started")
        return self._limiter

    @property
    def degraded_total(self) -> int:  # read by the metrics (observability/metrics.py backend_state)
        return 0 if self._limiter is None else self._limiter.degraded_total

    def acquire(self, key: str, request_id: str, limits: Limits, tokens: int) -> Coroutine[Any, Any, Decision]:
        return self._started.acquire(key, request_id, limits, tokens)

    def release(self, key: str, request_id: str, limits: Limits, estimated_tokens: int,
                actual_tokens: int) -> Coroutine[Any, Any, None]:
        return self._started.release(key, request_id, limits, estimated_tokens, actual_tokens)

    def count_refusal(self, key: str, limits: Limits) -> Coroutine[Any, Any, Decision]:
        return self._started.count_refusal(key, limits)

    def peek(self, key: str, limits: Limits) -> Coroutine[Any, Any, Decision]:
        return self._started.peek(key, limits)

    async def flush(self) -> None:
        await self._started.flush()

    async def close(self) -> None:
        if self._limiter is not None:
            await self._limiter.close()


class DeploymentCacheStore:
    """The Redis store of cached answers, made by `start` under the deployment's prefix. A ResponseCacheStore,
    handing out the inner store's coroutines as the limiter does."""

    def __init__(self, make: Callable[[str], ResponseCacheStore]) -> None:
        self._make = make
        self._store: ResponseCacheStore | None = None

    def start(self, prefix: str) -> None:
        self._store = self._make(prefix)

    @property
    def _started(self) -> ResponseCacheStore:
        if self._store is None:
            raise RuntimeError("the response cache is used before the app started")
        return self._store

    def get(self, key: str) -> Coroutine[Any, Any, bytes | None]:
        return self._started.get(key)

    def put(self, key: str, value: bytes, ttl: int) -> Coroutine[Any, Any, None]:
        return self._started.put(key, value, ttl)

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()


class RedisDeployment:
    """What one deployment keeps in a Redis (app.py): the stores are handed out when the app is built, and made
    under `<key_prefix><deployment id>:` when it starts."""

    def __init__(self, url: str, key_prefix: str) -> None:
        self.url = url
        self.key_prefix = key_prefix
        self.deployment_id: str | None = None
        self._stores: list[DeploymentLimiter | DeploymentCacheStore] = []

    def limiter(self, make: Callable[[str], RedisRateLimiter]) -> RateLimiter:
        limiter = DeploymentLimiter(make)
        self._stores.append(limiter)
        return limiter

    def cache_store(self, make: Callable[[str], ResponseCacheStore]) -> ResponseCacheStore:
        store = DeploymentCacheStore(make)
        self._stores.append(store)
        return store

    async def start(self, deployment_id: str) -> None:
        self.deployment_id = deployment_id
        prefix = deployment_prefix(self.key_prefix, deployment_id)
        for store in self._stores:
            store.start(prefix)
        if self._stores:
            await self.register()

    async def register(self) -> str | None:
        """Claim the prefix for this deployment (`SET <prefix>deployment <id> NX`). The id of another deployment
        found there (also logged as a warning), else None. A Redis that does not answer is logged and skipped."""
        assert self.deployment_id is not None
        key = self.key_prefix + REGISTRY_KEY
        client = connect(self.url, max_connections=1, socket_timeout=_REGISTER_TIMEOUT_S, retry=Retry(NoBackoff(), 1))
        try:
            if await client.set(key, self.deployment_id, nx=True):
                other = None
            else:
                found = await client.get(key)
                other = found.decode() if isinstance(found, bytes) else found
        except (RedisError, RedisClusterException, OSError) as exc:
            log.warning("could not register deployment %s under GROKGATE_REDIS_KEY_PREFIX %r in Redis (%s); its "
                        "keys are kept apart by the deployment id all the same", self.deployment_id, self.key_prefix,
                        exc)
            return None
        finally:
            await client.aclose()
        if other is None or other == self.deployment_id:
            log.info("deployment %s: rate limits and cached answers under %r in Redis", self.deployment_id,
                     deployment_prefix(self.key_prefix, self.deployment_id))
            return None
        log.warning(
            "another deployment (%s) already uses GROKGATE_REDIS_KEY_PREFIX %r on this Redis; this deployment is %s. "
            "Their rate limits and cached answers are kept apart by deployment id, but give each deployment its own "
            "GROKGATE_REDIS_KEY_PREFIX. If these are replicas of one deployment that must share them, give them one "
            "accounts database (with accounts off: the same GROKGATE_API_KEYS) or the same GROKGATE_DEPLOYMENT_ID. "
            "If deployment %s is gone, delete the Redis key %r.",
            other, self.key_prefix, self.deployment_id, other, key)
        return other
