"""One Redis client for every Redis user (limits, cached answers, the deployment's registration): a single server
or a Redis Cluster, chosen by GROKGATE_REDIS_URL's scheme.

- `redis://host:port/db`, `rediss://...`: one server (or a proxy in front of several), through a blocking pool.
- `redis+cluster://host:port[,host:port...]`, `rediss+cluster://...`: a Redis Cluster, through redis-py's
  `RedisCluster`, which learns the slot map from any of the listed nodes, sends each command to the primary of its
  key's slot and follows MOVED/ASK redirections itself (refreshing the map). Scripts run with EVALSHA on the node
  of their keys' slot; a node that does not know a script answers NOSCRIPT and redis-py loads it there (SCRIPT LOAD
  goes to every primary). Each script of store/limits_redis.py touches the keys of one bucket, which share one
  {hash tag}, so no script spans two slots (no CROSSSLOT); cached answers are one key per command.

redis-py's cluster client raises at once when all of a node's connections are busy, where the single-server
client waits for one (limits_redis.py's docstring says why that matters): `_BoundedCluster` makes commands wait up
to `pool_timeout` for one of `max_connections` in flight, and reports a wait that ran out as the blocking pool
does (a ConnectionError caused by a TimeoutError).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.exceptions import ConnectionError as RedisConnectionError

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

RedisClient = Redis | RedisCluster


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() in CLUSTER_SCHEMES


def cluster_nodes(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A cluster URL as the URL of its first node (the scheme redis-py knows, credentials and options kept) and
    every listed node's (host, port)."""
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES[parts.scheme.lower()]
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for hostport in hosts.split(","):
        host, _, port = hostport.strip().rpartition(":")
        if not host:  # no port given
            host, port = port, "6379"
        nodes.append((host.strip("[]"), int(port)))
    if not nodes or not nodes[0][0]:
        raise ValueError("a Redis Cluster URL names its nodes: redis+cluster://host:port[,host:port...]")
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has database 0 only: no /<db> in a redis+cluster:// URL")
    first = f"{userinfo}@{hosts.split(',')[0]}" if userinfo else hosts.split(",")[0]
    return urlunsplit((scheme, first, "", parts.query, "")), nodes


class _BoundedCluster(RedisCluster):
    """A cluster client whose commands wait for a free connection (at most `limit` in flight, which is also each
    node's connection limit, so no node runs out) instead of failing at once."""

    def __init__(self, *, limit: int, pool_timeout: float, **kwargs: Any) -> None:
        super().__init__(max_connections=limit, **kwargs)
        self._slots = asyncio.Semaphore(limit)
        self._pool_timeout = pool_timeout

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            await asyncio.wait_for(self._slots.acquire(), self._pool_timeout)
        except TimeoutError as exc:
            raise RedisConnectionError("no connection available within the pool timeout") from exc
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self._slots.release()


def connect(url: str, *, max_connections: int = 64, pool_timeout: float = 2.0, socket_timeout: float = 0.5,
            connect_timeout: float | None = None, retry: Retry | None = None) -> RedisClient:
    """A client for `url` that owns its connections (aclose() closes them). `retry`: how often a command is sent
    again after a connection error (on a cluster, after the slot map was refreshed); None: redis-py's default."""
    connect_timeout = socket_timeout if connect_timeout is None else connect_timeout
    if not is_cluster_url(url):
        pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=pool_timeout,
                                               socket_timeout=socket_timeout,
                                               socket_connect_timeout=connect_timeout,
                                               **({"retry": retry} if retry is not None else {}))
        return Redis.from_pool(pool)
    first, nodes = cluster_nodes(url)
    from redis.asyncio.connection import parse_url

    options: dict[str, Any] = dict(parse_url(first))
    if options.pop("connection_class", None) is not None:  # rediss: TLS to every node
        options["ssl"] = True
    for placed in ("host", "port", "db"):  # the nodes say where; a cluster has database 0 only
        options.pop(placed, None)
    return _BoundedCluster(startup_nodes=[ClusterNode(host, port) for host, port in nodes], limit=max_connections,
                           pool_timeout=pool_timeout, socket_timeout=socket_timeout,
                           socket_connect_timeout=connect_timeout,
                           **({"retry": retry} if retry is not None else {}), **options)
