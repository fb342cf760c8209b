"""A deployment's shared state is its own: two deployments pointed at one Redis with the same
GROKGATE_REDIS_KEY_PREFIX share neither cached answers nor rate limits (every key carries the deployment id:
store/deployment.py), and the second one to start is warned. Replicas of one deployment still share both.

Each deployment is the real app in process (tests/inproc.py) with an accounts database of its own, so both have a
token 1. e2e by the Redis fixture; every test uses a key prefix of its own and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis

from grokgate.store.sql import SqlStore
from tests.conftest import E2E, PG_ADMIN_URL, TOKEN, _pg_execute, create_key, user
from tests.inproc import AppServer, ScriptedProvider, app_server, logged, scripted_models

ROUTING = """
backends: {local: {kind: local}}
models:
  grok-3: [{backend: local}]
  grok-4: [{backend: local}]
cache:
  grok-3: {ttl: 600}
  grok-4: {ttl: 600, scope: global}
"""
REGISTRY_KEY = "deployment"  # <prefix>deployment: who registered the prefix
CACHED: dict[str, Any] = {"model": "grok-3", "messages": user("What is 2+2?"), "temperature": 0, "max_tokens": 16}


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own in the shared Redis; its keys are deleted afterwards (never FLUSHDB)."""
    value = f"test-deployment-{uuid.uuid4().hex[:12]}:"
    yield value
    with redis.Redis.from_url(redis_url) as r:
        for key in r.scan_iter(match=f"{value}*"):
            r.delete(key)


def deployment(stack: ExitStack, tmp: Path, name: str, redis_url: str, prefix: str, text: str,
               **settings: Any) -> AppServer:
    config = tmp / "routing.yaml"
    config.write_text(ROUTING)
    provider = ScriptedProvider(text=text)
    srv = stack.enter_context(app_server(tmp / name, scripted_models(provider), config=config, redis_url=redis_url,
                                         redis_key_prefix=prefix, **settings))
    srv.extra["provider"] = provider
    return srv


def post(srv: AppServer, body: dict[str, Any], token: str = TOKEN) -> tuple[int, str | None, str]:
    """Status, cache header and content of one request."""
    with srv.client() as c:
        r = c.post("/grok/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})
    content = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
    return r.status_code, r.headers.get("x-grokgate-cache"), content


def deployment_id(srv: AppServer) -> str:
    store = srv.app.state.gateway.store
    assert store is not None and store.deployment_id
    return str(store.deployment_id)


def warnings_of(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.name == "grokgate.deployment" and r.levelno == logging.WARNING]


def test_two_deployments_on_one_prefix_share_no_cached_answer_and_no_limit(tmp_path: Path, redis_url: str,
                                                                           prefix: str) -> None:
    with ExitStack() as stack:
        a = deployment(stack, tmp_path, "a", redis_url, prefix, "deployment A's answer")
        a_open, a_key = create_key(a, "open", credits="10")
        a_limited, _ = create_key(a, "limited", credits="10", rpm=1)
        with logged("grokgate") as records:
            b = deployment(stack, tmp_path, "b", redis_url, prefix, "deployment B's answer")
        b_open, b_key = create_key(b, "open", credits="10")
        b_limited, _ = create_key(b, "limited", credits="10", rpm=1)
        assert a_key["id"] == b_key["id"] == 1, "both deployments have a token 1"

        assert post(a, CACHED, a_open) == (200, "miss", "deployment A's answer")
        assert post(b, CACHED, b_open) == (200, "miss", "deployment B's answer")
        assert post(b, CACHED, b_open)[1] == "hit", "B's own answers are cached for B"

        uncached = {**CACHED, "model": "grok-3", "temperature": 1}
        assert post(a, uncached, a_limited)[0] == 200
        assert post(b, uncached, b_limited)[0] == 200, "A's token 2 spent its minute, not B's"
        assert post(b, uncached, b_limited)[0] == 429, "B's token 2 has its own limit"

        ids = deployment_id(a), deployment_id(b)
    assert ids[0] != ids[1]
    (warning,) = warnings_of(records)
    assert ids[0] in warning and ids[1] in warning
    assert "GROKGATE_REDIS_KEY_PREFIX" in warning and "GROKGATE_DEPLOYMENT_ID" in warning and prefix in warning
    with redis.Redis.from_url(redis_url) as r:
        keys = {k.decode() for k in r.scan_iter(match=f"{prefix}*")}
        assert r.get(prefix + REGISTRY_KEY) == ids[0].encode(), "the first to start keeps the prefix"
    owned = {k for k in keys if k != prefix + REGISTRY_KEY}
    assert owned and all(k.startswith((f"{prefix}{ids[0]}:", f"{prefix}{ids[1]}:")) for k in owned), keys
    assert any(k.startswith(f"{prefix}{ids[1]}:cache:") for k in owned)
    assert any(k.startswith(f"{prefix}{ids[1]}:{{") for k in owned), "limit buckets carry the id too"


def test_replicas_of_one_deployment_share_cached_answers_without_a_warning(tmp_path: Path, redis_url: str,
                                                                            prefix: str) -> None:
    """GROKGATE_DEPLOYMENT_ID names one deployment whatever its databases (here each replica has its own SQLite
    file, standing for replicas of one PostgreSQL)."""
    with ExitStack() as stack, logged("grokgate") as records:
        a = deployment(stack, tmp_path, "a", redis_url, prefix, "first", deployment_id="shop-eu")
        b = deployment(stack, tmp_path, "b", redis_url, prefix, "second", deployment_id="shop-eu")
        assert post(a, CACHED) == (200, "miss", "first")
        assert post(b, CACHED) == (200, "hit", "first")
    assert warnings_of(records) == []
    with redis.Redis.from_url(redis_url) as r:
        assert {k.decode() for k in r.scan_iter(match=f"{prefix}*")} >= {prefix + REGISTRY_KEY}
        assert any(k.decode().startswith(f"{prefix}shop-eu:cache:") for k in r.scan_iter(match=f"{prefix}*"))


def test_accounts_off_deployments_are_told_apart_by_their_keys(tmp_path: Path, redis_url: str, prefix: str) -> None:
    """Without accounts the id is a digest of the static keys' ids: replicas with the same keys share a globally
    scoped answer, a deployment with other keys does not get it."""
    from grokgate.store.deployment import static_deployment_id

    global_body = {**CACHED, "model": "grok-4"}
    with ExitStack() as stack, logged("grokgate") as records:
        one = deployment(stack, tmp_path, "one", redis_url, prefix, "one's answer", accounts=False,
                         api_keys=["alpha", "beta"])
        replica = deployment(stack, tmp_path, "replica", redis_url, prefix, "replica's answer", accounts=False,
                             api_keys=["beta", "alpha"])
        other = deployment(stack, tmp_path, "other", redis_url, prefix, "other's answer", accounts=False,
                           api_keys=["gamma"])
        assert post(one, global_body, "alpha") == (200, "miss", "one's answer")
        assert post(replica, global_body, "beta") == (200, "hit", "one's answer")
        assert post(other, global_body, "gamma") == (200, "miss", "other's answer")
    assert static_deployment_id(["alpha", "beta"]) == static_deployment_id(["beta", "alpha", "alpha"])
    assert static_deployment_id(["alpha", "beta"]) != static_deployment_id(["gamma"])
    (warning,) = warnings_of(records)
    assert static_deployment_id(["gamma"]) in warning


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=E2E)])
def test_the_accounts_database_keeps_the_deployment_id(tmp_path: Path, kind: str) -> None:
    """Every store opened on one database reads the same id, across restarts; another database has another."""
    names: list[str] = []

    def new_url(n: int) -> str:
        if kind == "sqlite":
            return f"sqlite:///{tmp_path}/accounts-{n}.db"
        name = f"grokgate_test_{uuid.uuid4().hex[:12]}"
        try:
            _pg_execute(f'CREATE DATABASE "{name}"')
        except (OSError, TimeoutError) as exc:
            pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
        names.append(name)
        return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"

    async def ids(url: str, count: int) -> list[str | None]:
        stores = [SqlStore(url, owner=f"replica-{i}") for i in range(count)]
        try:
            await asyncio.gather(*(s.open() for s in stores))  # replicas starting together on an empty database
            return [s.deployment_id for s in stores]
        finally:
            for s in stores:
                await s.close()

    try:
        first, second = new_url(1), new_url(2)
        count = 3 if kind == "postgresql" else 1  # SQLite serves one process
        together = asyncio.run(ids(first, count))
        assert len(set(together)) == 1 and together[0]
        assert asyncio.run(ids(first, 1)) == together[:1], "the same after a restart"
        assert asyncio.run(ids(second, 1)) != together[:1]
    finally:
        for name in names:
            _pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
