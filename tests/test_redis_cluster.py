"""grokgate on a 3-node Redis Cluster (issue 19): `GROKGATE_REDIS_URL=redis+cluster://...` (store/redis_client.py).

Two replicas on one PostgreSQL database share a Redis Cluster of three primaries, started by the test
(tests/services.py) and stopped at the end. Through their HTTP servers: a key's rpm and an account's rpm (all its
keys) hold exactly across the replicas, an answer cached by one is a hit on the other, the keys of many tenants
spread over the three nodes while each tenant's bucket stays in one slot, and no CROSSSLOT or MOVED error is ever
logged. Last, a node fails: with fail_closed, limited requests are refused with 503 (never served unlimited nor
billed) until it is back, then served again. The replicas serve grok-3 from the fake upstream (as
tests/test_billing.py does: the limiter, not the backend, is under test).
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    E2E,
    PG_ADMIN_URL,
    Server,
    _pg_execute,
    admin_post,
    create_key,
    start_servers,
    stop_server,
    user,
)
from tests.fakes.fake_xai import FakeXAI
from tests.services import RedisClusterNodes, redis_cluster, stop_process
from tests.test_billing import CHEAP, check_books, fake, upstream_env

__all__ = ["fake"]  # the upstream fixture, shared with tests/test_billing.py

CACHED = {"model": "grok-3", "messages": user("What is 2+2?"), "temperature": 0, "max_tokens": 8}
CACHE_RULES = "cache:\n  grok-3: {ttl: 600}\n"


@dataclass
class Deployment:
    a: Server
    b: Server
    cluster: RedisClusterNodes
    tmp: Path

    def logs(self) -> str:
        return self.a.log() + self.b.log()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, fake: FakeXAI) -> Iterator[Deployment]:
    db = f"grokgate_test_{uuid.uuid4().hex[:12]}"
    try:
        _pg_execute(f'CREATE DATABASE "{db}"')
    except (OSError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    tmp = tmp_path_factory.mktemp("redis-cluster")
    try:
        with redis_cluster(tmp) as cluster:
            env = upstream_env(tmp, fake, GROKGATE_DATABASE_URL=f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{db}",
                               GROKGATE_REDIS_URL=cluster.url, GROKGATE_RATE_LIMIT_STORE_ERROR="fail_closed",
                               GROKGATE_LOG_LEVEL="WARNING")
            routing = Path(str(env["GROKGATE_CONFIG"]))
            routing.write_text(routing.read_text() + CACHE_RULES)
            a, b = start_servers(tmp, ("cluster-a", ("--slots", "2"), env), ("cluster-b", ("--slots", "2"), env))
            try:
                yield Deployment(a, b, cluster, tmp)
            finally:
                stop_server(a)
                stop_server(b)
    finally:
        _pg_execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout


def node_keys(cluster: RedisClusterNodes) -> dict[int, list[str]]:
    """Each node's keys (a node's SCAN lists only the keys of the slots it serves)."""
    return {n.port: [k for k in cli(n.port, "--scan").split("\n") if k] for n in cluster.nodes}


def no_cluster_errors(logs: str) -> None:
    for marker in ("CROSSSLOT", "MOVED", "ASK ", "Traceback", "rate-limit store unavailable"):
        assert marker not in logs, f"{marker!r} in the replicas' logs:\n{logs[-4000:]}"


def alternate(d: Deployment, count: int, body: dict[str, Any], tokens: list[str]) -> list[int]:
    """`count` requests one after the other, alternating replicas and tokens; their statuses."""
    return [((d.a, d.b)[i % 2]).chat(body, token=tokens[i % len(tokens)]).status_code for i in range(count)]


@E2E
def test_a_keys_rpm_holds_exactly_across_replicas(deployment: Deployment) -> None:
    token, key = create_key(deployment.a, f"rpm-{uuid.uuid4().hex[:6]}", credits="10", rpm=5)
    codes = alternate(deployment, 12, CHEAP, [token])
    assert codes == [200] * 5 + [429] * 7, codes
    check_books(deployment.a, key["id"], 10_000_000, 5)  # the 429s cost nothing
    no_cluster_errors(deployment.logs())


@E2E
def test_an_accounts_rpm_spans_its_keys_and_the_replicas(deployment: Deployment) -> None:
    account = admin_post(deployment.a, "/admin/accounts", {"name": f"acct-{uuid.uuid4().hex[:6]}", "credits": "10",
                                                           "rpm": 4})
    tokens = [admin_post(deployment.a, f"/admin/accounts/{account['id']}/keys", {"name": f"k{i}"})["token"]
              for i in range(3)]
    codes = alternate(deployment, 10, CHEAP, tokens)
    assert codes.count(200) == 4 and codes.count(429) == 6, codes
    assert codes[:4] == [200] * 4, codes
    limited = deployment.b.chat(CHEAP, token=tokens[0])
    assert limited.status_code == 429
    assert limited.headers["x-grokgate-limit"] == "account.rpm"
    no_cluster_errors(deployment.logs())


@E2E
def test_an_answer_cached_by_one_replica_is_a_hit_on_the_other(deployment: Deployment) -> None:
    token, _ = create_key(deployment.a, f"cache-{uuid.uuid4().hex[:6]}", credits="10")
    body = {**CACHED, "messages": user(f"What is 2+2? ({uuid.uuid4().hex[:8]})")}
    first = deployment.a.chat(body, token=token)
    second = deployment.b.chat(body, token=token)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.headers["x-grokgate-cache"] == "miss"
    assert second.headers["x-grokgate-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    cached = [k for keys in node_keys(deployment.cluster).values() for k in keys if ":cache:" in k]
    assert cached, "the answer is stored in the cluster"
    no_cluster_errors(deployment.logs())


@E2E
def test_tenants_spread_over_the_nodes_each_in_one_slot(deployment: Deployment) -> None:
    # rpm 1: a bucket that served one request drains for a minute, so none expires before it is looked at.
    tokens = [create_key(deployment.a, f"spread-{i}-{uuid.uuid4().hex[:6]}", credits="10", rpm=1,
                         max_concurrency=10)[0] for i in range(24)]
    assert set(alternate(deployment, len(tokens), CHEAP, tokens)) == {200}
    by_node = node_keys(deployment.cluster)
    buckets = {port: [k for k in keys if re.search(r"\{(tok|acct)-\d+\}", k)] for port, keys in by_node.items()}
    assert all(len(keys) >= 2 for keys in buckets.values()), f"keys on every node: {buckets}"
    slots: dict[str, set[int]] = defaultdict(set)
    nodes: dict[str, set[int]] = defaultdict(set)
    for port, keys in buckets.items():
        for k in keys:
            tag = re.search(r"\{[^}]+\}", k)
            assert tag is not None
            slots[tag.group()].add(int(cli(port, "cluster", "keyslot", k)))
            nodes[tag.group()].add(port)
    assert len(slots) >= 24
    assert all(len(s) == 1 for s in slots.values()), "one slot per tenant bucket"
    assert all(len(n) == 1 for n in nodes.values()), "one node per tenant bucket"
    no_cluster_errors(deployment.logs())


@E2E
def test_a_failed_node_refuses_limited_requests_until_it_is_back(deployment: Deployment) -> None:
    """Last in the module (it stops a node). fail_closed: a request whose bucket cannot be checked is refused
    with 503 rate_limiter_unavailable and costs nothing; once the cluster reports the node failed (after
    cluster-node-timeout, 2 s here) every slot is down (cluster-require-full-coverage), so every limited
    request is refused. The node restarted from its nodes.conf rejoins and requests are served again; the
    buckets of its slots start empty (no persistence: docs/operations.md)."""
    d = deployment
    token, key = create_key(d.a, f"fail-{uuid.uuid4().hex[:6]}", credits="10", rpm=100)
    assert d.a.chat(CHEAP, token=token).status_code == 200
    victim = d.cluster.nodes[-1]
    stop_process(victim.process)
    survivor = d.cluster.nodes[0].port
    deadline = time.monotonic() + 30
    while "cluster_state:fail" not in cli(survivor, "cluster", "info"):
        assert time.monotonic() < deadline, "the cluster never noticed the stopped node"
        time.sleep(0.1)
    started = time.monotonic()
    refused = [(d.a, d.b)[i % 2].chat(CHEAP, token=token) for i in range(4)]
    assert [r.status_code for r in refused] == [503] * 4, [r.text for r in refused]
    assert {r.json()["error"]["code"] for r in refused} == {"rate_limiter_unavailable"}
    assert time.monotonic() - started < 10, "refused promptly, not after long retries"
    check_books(d.a, key["id"], 10_000_000, 1)

    d.cluster.restart(victim)
    deadline = time.monotonic() + 30
    while any("cluster_state:ok" not in cli(n.port, "cluster", "info") for n in d.cluster.nodes):
        assert time.monotonic() < deadline, "the restarted node never rejoined"
        time.sleep(0.1)
    deadline = time.monotonic() + 15
    for replica in (d.a, d.b):
        while (r := replica.chat(CHEAP, token=token)).status_code != 200:  # until its slot map is fresh
            assert r.status_code == 503 and time.monotonic() < deadline, r.text
            time.sleep(0.2)
    check_books(d.a, key["id"], 10_000_000, 3)


def test_cluster_urls_list_their_nodes_and_keep_credentials() -> None:
    from grokgate.store.redis_client import cluster_nodes, connect, is_cluster_url

    assert not is_cluster_url("redis://127.0.0.1:6379/0")
    assert is_cluster_url("rediss+cluster://h:1")
    first, nodes = cluster_nodes("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002,10.0.0.4")
    assert first == "redis://u:p%40ss@10.0.0.1:7000"
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002), ("10.0.0.4", 6379)]
    with pytest.raises(ValueError, match="database 0"):
        cluster_nodes("redis+cluster://h:1/3")
    client = connect("rediss+cluster://u:pw@h:7000,h2:7001", max_connections=7)
    assert {(n.host, n.port) for n in client.nodes_manager.startup_nodes.values()} == {("h", 7000), ("h2", 7001)}
    assert client.connection_kwargs["password"] == "pw" and client.connection_kwargs["username"] == "u"
    assert client.connection_kwargs["connection_class"].__name__ == "SSLConnection"
