"""GROKGATE_REDIS_KEY_PREFIX: two deployments sharing one Redis database keep their rate limits apart.

Each deployment has its own SQLite database, so both have a token with id 1, whose limiter keys would be the same
(`<prefix>{tok-1}`) without something of their own: one deployment's traffic would spend the other's RPM. Keys
carry the prefix and the deployment's id (store/deployment.py); tests/test_deployment_identity.py shows that the
id alone keeps two deployments apart on one prefix.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis

from tests.conftest import TOKEN, call, ok
from tests.inproc import AppServer, app_server

PREFIX_DB = 14  # a Redis database of this test's own


@pytest.fixture
def shared_redis(redis_url: str) -> Iterator[str]:
    url = f"{redis_url.rsplit('/', 1)[0]}/{PREFIX_DB}"
    yield url
    with redis.Redis.from_url(url) as r:
        for key in r.scan_iter("test-*"):
            r.delete(key)


def first_answers(tmp: Path, url: str, prefixes: tuple[str, str], **settings: str) -> list[int]:
    """Statuses of one request per deployment, each through a fresh token (id 1 in both) limited to 1 RPM."""
    statuses = []
    with ExitStack() as stack:
        apps: list[AppServer] = [
            stack.enter_context(app_server(tmp / f"d{i}", redis_url=url, redis_key_prefix=prefix, **settings))
            for i, prefix in enumerate(prefixes)
        ]
        for app in apps:
            created = ok(call(app, "POST", "/admin/keys", TOKEN, json={"name": "alice", "credits": "100", "rpm": 1}),
                         201)
            assert created["key"]["id"] == 1
            r = app.chat({"model": "grok-3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                         token=created["token"])
            statuses.append(r.status_code)
    return statuses


def test_deployments_with_their_own_prefixes_do_not_share_limits(tmp_path: Path, shared_redis: str) -> None:
    run = uuid.uuid4().hex[:8]
    assert first_answers(tmp_path, shared_redis, (f"test-{run}-a:", f"test-{run}-b:")) == [200, 200]


def test_one_prefix_for_both_shares_them(tmp_path: Path, shared_redis: str) -> None:
    """The control: with one prefix and one deployment id (replicas of one deployment), the second's token 1 finds
    the first's request in its minute. Two deployments on one prefix do not: tests/test_deployment_identity.py."""
    run = uuid.uuid4().hex[:8]
    assert first_answers(tmp_path, shared_redis, (f"test-{run}:", f"test-{run}:"), deployment_id=run) == [200, 429]


def test_a_prefix_with_braces_is_refused() -> None:
    from pydantic import ValidationError

    from grokgate.settings import Settings

    with pytest.raises(ValidationError, match="redis_key_prefix"):
        Settings(redis_key_prefix="a{b}")
