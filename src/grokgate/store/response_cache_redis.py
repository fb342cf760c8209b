"""The exact response cache in Redis (GROKGATE_REDIS_URL set): shared by every replica that points at the same
server, so an answer one replica stored is a hit on the others. The `ResponseCacheStore` contract of
core/response_cache.py: one GET per lookup, one SET with a native expiry (PX) per stored answer.

Keys are `<prefix><digest>`, the prefix being GROKGATE_REDIS_KEY_PREFIX, the deployment's id and `cache:`
(store/deployment.py), so deployments sharing one Redis database keep their answers apart as they keep their rate
limits, even with one prefix. The digest already contains the owner (serving/response_cache.py), so one tenant's
answers are never read under another's key.

The cache is an optimisation: short timeouts and no retries, so a Redis that is down costs a request about half
a second at most and the request is then served as a miss (the serving layer counts the error). On a Redis
Cluster (`redis+cluster://`, store/redis_client.py) each key lives on the primary of its own slot: answers spread
over the nodes, and a node that is down costs the answers in its slots only.
"""

from __future__ import annotations

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from grokgate.store.redis_client import RedisClient, connect, is_cluster_url

_ONE_RETRY = Retry(NoBackoff(), 1)


class RedisResponseCache:
    def __init__(self, client: RedisClient | str, *, key_prefix: str = "grokgate:rl:cache:", max_connections: int = 64,
                 pool_timeout: float = 2.0, socket_timeout: float = 0.5) -> None:
        if isinstance(client, str):
            # On a cluster, one more try after a connection error (with the slot map refreshed), not redis-py's
            # three: a miss is cheaper than waiting. MOVED/ASK are followed whatever this says.
            client = connect(client, max_connections=max_connections, pool_timeout=pool_timeout,
                             socket_timeout=socket_timeout, retry=_ONE_RETRY if is_cluster_url(client) else None)
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
