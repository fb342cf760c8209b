"""The exact response cache in Redis (GROKGATE_REDIS_URL set): shared by every replica that points at the same
server, so an answer one replica stored is a hit on the others. The `ResponseCacheStore` contract of
core/response_cache.py: one GET per lookup, one SET with a native expiry (PX) per stored answer.

Keys are `<prefix><digest>`, the prefix being GROKGATE_REDIS_KEY_PREFIX, the deployment's id and `cache:`
(store/deployment.py), so deployments sharing one Redis database keep their answers apart as they keep their rate
limits, even with one prefix. The digest already contains the owner (serving/response_cache.py), so one tenant's
answers are never read under another's key.

The cache is an optimisation: short timeouts and no retries, so a Redis that is down costs a request about half
a second at most and the request is then served as a miss (the serving layer counts the error).
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis


class RedisResponseCache:
    def __init__(self, client: Redis | str, *, key_prefix: str = "grokgate:rl:cache:", max_connections: int = 64,
                 pool_timeout: float = 2.0, socket_timeout: float = 0.5) -> None:
        if isinstance(client, str):
            pool = BlockingConnectionPool.from_url(client, max_connections=max_connections, timeout=pool_timeout,
                                                   socket_timeout=socket_timeout,
                                                   socket_connect_timeout=socket_timeout)
            client = Redis.from_pool(pool)  # the client owns the pool: aclose() closes both
            self._owns_client = True
        else:
            self._owns_client = False
        self._redis = client
        self._prefix = key_prefix

    async def get(self, key: str) -> bytes | None:
        value = await self._redis.get(self._prefix + key)
        if value is None:
            return None
        return value.encode() if isinstance(value, str) else bytes(value)  # str only with decode_responses

    async def put(self, key: str, value: bytes, ttl: int) -> None:
        await self._redis.set(self._prefix + key, value, px=max(1, ttl * 1000))

    async def close(self) -> None:
        if self._owns_client:
            await self._redis.aclose()
