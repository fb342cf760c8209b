"""Three replicas behind HAProxy (issue 19): one SIGKILLed under load, then a rolling restart under load.

Each test starts its own deployment: a fresh PostgreSQL database, a Redis key prefix of its own, three
`grokgate serve` replicas (GROKGATE_INSTANCE_ID lb-0..lb-2, heartbeats every 0.5 s, dead after 2 s, a 3 s drain)
serving grok-3 from a fake xAI upstream paced so that requests stay in flight (a 0.1 s stall, 25 ms between
stream chunks) and grok-4 from a slow one (a stream of 8 chunks 0.5 s apart), and HAProxy in front
(tests/haproxy.py: readiness checks, retries of requests that never reached a replica). Clients send streamed
and non-streamed requests on funded keys through HAProxy, without pause, for the whole test.

- **SIGKILL:** a replica is killed while it serves two slow streams (sent to it directly) and its share of the
  load. The only failed requests are ones that were in flight on it when it died, or sent before HAProxy
  marked it down (answered by it or by no one), at most one per client; every request started after that
  succeeds (HAProxy retries the others on a survivor). A survivor releases the dead replica's reservations.
  The books are exact: no reservation left, each key's balance moved by exactly its ledger rows, and every
  completed answer has exactly one ledger row under its request id (a row no client saw the id of is a request
  the dead replica had settled but not yet answered, bounded by the requests in flight).
- **Rolling restart:** each replica in turn gets a SIGTERM while it serves a slow stream started before it:
  /readyz answers 503 "draining" at once, HAProxy takes the replica out while the process still serves, the slow
  stream completes with [DONE], the process exits 0 after the drain, and it is started again and waits for
  HAProxy to put it back. Not one request fails, every stream ends with [DONE], and the books are exact with
  no row unaccounted for.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import (
    E2E,
    PG_ADMIN_URL,
    REDIS_URL,
    TOKEN,
    Server,
    _pg_execute,
    create_key,
    start_servers,
    stop_server,
    user,
)
from tests.fakes.fake_xai import FakeXAI
from tests.haproxy import REPLICA_HEADER, HAProxy, haproxy

pytestmark = E2E

FAKE_KEY = "xai-lb-key"
CLIENTS = 6
KEYS = 3
CREDITS = 100_000_000  # micro-credits per key: far more than a test spends
HEARTBEAT, DEAD_AFTER = 0.5, 2.0
DRAIN = 3.0
FAST_PACE = {"x-fake-fault": "stall;seconds=0.1", "x-fake-chunk-delay-ms": "25"}
SLOW_CHUNKS, SLOW_DELAY_MS = 8, 500  # a grok-4 stream lasts about 5 s: past the drain
BODY = {"model": "grok-3", "messages": user("hi"), "max_tokens": 5}
SLOW = {"model": "grok-4", "messages": user("take your time"), "max_tokens": 5, "stream": True}


def pg_fetch(url: str, sql: str) -> list[Any]:
    import asyncpg

    async def run() -> list[Any]:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return list(await conn.fetch(sql))
        finally:
            await conn.close()

    return asyncio.run(run())


# -- the deployment ----------------------------------------------------------------------------------------------


@dataclass
class Replica:
    name: str  # its instance id and HAProxy's name for it
    server: Server
    env: dict[str, str]

    @property
    def port(self) -> int:
        return int(self.server.url.rsplit(":", 1)[1])

    def restart(self) -> None:
        """The same command on the same port, data dir and instance id; returns once /readyz answers 200."""
        with self.server.log_path.open("ab") as out:
            self.server.process = subprocess.Popen(self.server.process.args, stdout=out, stderr=subprocess.STDOUT,
                                                   env=self.env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.server.process.poll() is not None:
                raise AssertionError(f"{self.name} exited on restart:\n{self.server.log()[-3000:]}")
            try:
                if httpx.get(f"{self.server.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready 60 s after its restart:\n{self.server.log()[-3000:]}")


@dataclass
class Deployment:
    replicas: list[Replica]
    proxy: HAProxy
    db_url: str
    fast: FakeXAI
    tokens: list[str] = field(default_factory=list)
    key_ids: list[int] = field(default_factory=list)

    def holds_by_owner(self) -> dict[str, int]:
        rows = pg_fetch(self.db_url, "SELECT owner, count(*) AS n FROM reservations GROUP BY owner")
        return {r["owner"]: int(r["n"]) for r in rows}


def routing(tmp: Path, fast: FakeXAI, slow: FakeXAI) -> Path:
    path = tmp / "routing.yaml"
    path.write_text(f"""
backends:
  fast: {{kind: xai, base_url: "{fast.url}", api_key_env: XAI_FAKE}}
  slow: {{kind: xai, base_url: "{slow.url}", api_key_env: XAI_FAKE}}
models:
  grok-3: [{{backend: fast}}]
  grok-4: [{{backend: slow}}]
""")
    return path


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        pytest.skip(f"Redis is not reachable at {REDIS_URL}: {exc}")
    db = f"grokgate_test_{uuid.uuid4().hex[:12]}"
    try:
        _pg_execute(f'CREATE DATABASE "{db}"')
    except (OSError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    prefix = f"gglb{uuid.uuid4().hex[:10]}:"
    with ExitStack() as stack:
        stack.callback(_pg_execute, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        stack.callback(_delete_keys, prefix)
        fast = stack.enter_context(FakeXAI(api_keys=[FAKE_KEY]).start())
        fast.header_defaults.update(FAST_PACE)
        slow = stack.enter_context(FakeXAI(api_keys=[FAKE_KEY], chunks=SLOW_CHUNKS).start())
        slow.header_defaults["x-fake-chunk-delay-ms"] = str(SLOW_DELAY_MS)
        db_url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{db}"
        common = {"GROKGATE_CONFIG": str(routing(tmp_path, fast, slow)), "XAI_FAKE": FAKE_KEY,
                  "GROKGATE_DATABASE_URL": db_url, "GROKGATE_REDIS_URL": REDIS_URL,
                  "GROKGATE_REDIS_KEY_PREFIX": prefix, "GROKGATE_INSTANCE_HEARTBEAT_SECONDS": str(HEARTBEAT),
                  "GROKGATE_INSTANCE_DEAD_AFTER_SECONDS": str(DEAD_AFTER), "GROKGATE_DRAIN_SECONDS": str(DRAIN),
                  "GROKGATE_MAX_CONNECTIONS_PER_CLIENT": "4096", "GROKGATE_LOG_LEVEL": "WARNING"}
        envs = {f"lb-{i}": {**common, "GROKGATE_INSTANCE_ID": f"lb-{i}", "GROKGATE_API_KEYS": TOKEN,
                            "GROKGATE_DATA_DIR": str(tmp_path / f"lb-{i}-data")} for i in range(3)}
        servers = start_servers(tmp_path, *((name, ("--slots", "2"), env) for name, env in envs.items()))
        replicas = [Replica(name, s, {**os.environ, **envs[name]}) for name, s in zip(envs, servers, strict=True)]
        for r in replicas:
            stack.callback(lambda r=r: stop_server(r.server))  # the process of its last restart, if any
        proxy = stack.enter_context(haproxy(tmp_path, [(r.name, r.port) for r in replicas]))
        d = Deployment(replicas, proxy, db_url, fast)
        for i in range(KEYS):
            token, key = create_key(replicas[0].server, f"lb-{i}", credits=str(CREDITS // 1_000_000))
            d.tokens.append(token)
            d.key_ids.append(int(key["id"]))
        yield d


def _delete_keys(prefix: str) -> None:
    with redis.Redis.from_url(REDIS_URL) as r:
        keys = list(r.scan_iter(match=f"{prefix}*"))
        if keys:
            r.delete(*keys)


# -- the load ----------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    stream: bool
    started: float
    ended: float = 0.0
    status: int | None = None
    request_id: str | None = None
    replica: str | None = None
    complete: bool = False
    error: str = ""

    def __str__(self) -> str:
        kind = "stream" if self.stream else "json"
        return f"{kind} {self.status} via {self.replica} id={self.request_id} {self.error[:200]!r}"


def send(client: httpx.Client, body: dict[str, Any], token: str) -> Outcome:
    """One request; never raises: what happened is in the outcome."""
    out = Outcome(stream=bool(body.get("stream")), started=time.monotonic())
    try:
        with client.stream("POST", "/grok/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {token}"}) as r:
            out.status, out.request_id = r.status_code, r.headers.get("x-request-id")
            out.replica = r.headers.get(REPLICA_HEADER)
            text = r.read().decode()
        if out.status != 200:
            out.error = text
        elif out.stream:
            out.complete = text.endswith("data: [DONE]\n\n")
            out.error = "" if out.complete else f"unfinished stream: {text[-200:]}"
        else:
            out.complete = "choices" in text
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.ended = time.monotonic()
    return out


class Load:
    """CLIENTS threads sending through HAProxy without pause, each on its own kept-alive connection, every other
    request streamed, over the deployment's keys; until `stop`."""

    def __init__(self, url: str, tokens: list[str]) -> None:
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(url, tokens[i % len(tokens)], i), daemon=True)
                         for i in range(CLIENTS)]

    def _client(self, url: str, token: str, i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            n = i
            while not self._stop.is_set():
                self.outcomes.append(send(client, {**BODY, "stream": n % 2 == 0}, token))
                n += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)

    def wait_completed(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while sum(o.complete for o in self.outcomes) < count:
            assert time.monotonic() < deadline, f"only {sum(o.complete for o in self.outcomes)} answers in time"
            time.sleep(0.05)


class Direct(threading.Thread):
    """A slow stream sent to one replica directly (not through HAProxy); `first` is set once its first chunk is
    in, so the test knows the request is in flight there."""

    def __init__(self, replica: Replica, token: str) -> None:
        super().__init__(daemon=True)
        self.replica, self.token = replica, token
        self.first = threading.Event()
        self.outcome = Outcome(stream=True, started=time.monotonic())

    def run(self) -> None:
        out = self.outcome
        chunks: list[str] = []
        try:
            with httpx.Client(base_url=self.replica.server.url, timeout=60) as c, \
                    c.stream("POST", "/grok/chat/completions", json=SLOW,
                             headers={"Authorization": f"Bearer {self.token}"}) as r:
                out.status, out.request_id = r.status_code, r.headers.get("x-request-id")
                out.replica = self.replica.name
                for text in r.iter_text():
                    chunks.append(text)
                    if '"content"' in "".join(chunks):
                        self.first.set()
            body = "".join(chunks)
            out.complete = out.status == 200 and body.endswith("data: [DONE]\n\n")
            out.error = "" if out.complete else body[-300:]
        except httpx.HTTPError as exc:
            out.error = f"{type(exc).__name__}: {exc}"
        finally:
            out.ended = time.monotonic()
            self.first.set()


def draining(replica: Replica, timeout: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = httpx.get(f"{replica.server.url}/readyz", timeout=5)
        if ready.status_code == 503 and ready.json()["status"] == "draining":
            return True
        assert ready.status_code == 200, ready.text
        time.sleep(0.01)
    return False


def start_direct(replica: Replica, token: str) -> Direct:
    stream = Direct(replica, token)
    stream.start()
    assert stream.first.wait(30) and stream.outcome.status == 200, stream.outcome
    return stream


# -- the books ---------------------------------------------------------------------------------------------------


def check_books(d: Deployment, answered: list[Outcome]) -> list[str]:
    """No reservation left; each key's balance moved by exactly its usage rows; every completed answer has
    exactly one usage row under its request id. Returns the request ids of usage rows no client saw."""
    assert d.holds_by_owner() == {}, "no reservation is left"
    admin = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=d.proxy.url, timeout=30, headers=admin) as c:
        for key_id in d.key_ids:
            key = c.get(f"/admin/keys/{key_id}").json()
            assert key["reserved"] == 0, key
            rows = pg_fetch(d.db_url, f"SELECT amount FROM ledger WHERE token_id = {key_id} AND kind = 'usage'")
            assert CREDITS - key["balance"] == -sum(r["amount"] for r in rows), f"key {key_id}: balance vs ledger"
            assert key["balance"] >= 0
    rows = pg_fetch(d.db_url, "SELECT request_id FROM ledger WHERE kind = 'usage'")
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids))
    completed = [o for o in answered if o.complete]
    missing = [str(o) for o in completed if o.request_id not in set(ids)]
    assert not missing, f"completed answers without a ledger row: {missing[:5]}"
    seen = {o.request_id for o in answered}
    return [i for i in ids if i not in seen]


# -- the tests ---------------------------------------------------------------------------------------------------


@E2E
def test_sigkill_of_one_replica_behind_haproxy_fails_only_its_requests_in_flight(deployment: Deployment) -> None:
    d = deployment
    victim = d.replicas[1]
    with Load(d.proxy.url, d.tokens) as load:
        load.wait_completed(30)
        slow = [start_direct(victim, d.tokens[i]) for i in range(2)]
        held = d.holds_by_owner()
        assert held.get(victim.name, 0) >= 2, held
        killed_at = time.monotonic()
        victim.server.process.send_signal(signal.SIGKILL)
        victim.server.process.wait()
        down_at = d.proxy.wait_state(victim.name, "DOWN", timeout=10)
        # The survivors' instance sweep releases what the dead replica held (DEAD_AFTER after its last beat).
        deadline = time.monotonic() + 30
        while victim.name in d.holds_by_owner():
            assert time.monotonic() < deadline, f"{victim.name}'s reservations are still held: {d.holds_by_owner()}"
            time.sleep(0.1)
        released_at = time.monotonic()
        after = len(load.outcomes)
        load.wait_completed(sum(o.complete for o in load.outcomes) + 30)
    for stream in slow:
        stream.join(30)
        assert not stream.outcome.complete, "a stream on the killed replica cannot have completed"
    outcomes = load.outcomes
    assert len(outcomes) > after, "requests were served after the release"
    failed = [o for o in outcomes if not o.complete]
    # Failed: in flight on the victim at the kill, or sent before HAProxy marked it down (HAProxy retries most of
    # those elsewhere, not all: a request on a kept-alive connection it reused may fail); never after, and never
    # answered by another replica.
    stray = [str(o) for o in failed if not (o.started < down_at and o.ended >= killed_at
                                            and o.replica in (None, victim.name))]
    assert not stray, f"failures that were not in flight on the killed replica: {stray}"
    assert len(failed) <= CLIENTS, [str(o) for o in failed]
    unseen = check_books(d, outcomes + [s.outcome for s in slow])
    # A usage row whose id no client got: a request the victim settled and died before answering (or retried by
    # HAProxy after it: see docs/operations.md), one per request in flight at most.
    assert len(unseen) <= CLIENTS, unseen
    print(f"\nSIGKILL: {len(outcomes)} requests, {len(failed)} failed in flight; DOWN after "
          f"{down_at - killed_at:.2f} s, holds released after {released_at - killed_at:.2f} s; "
          f"{len(unseen)} ledger rows unseen")


@E2E
def test_rolling_restart_behind_haproxy_fails_no_request(deployment: Deployment) -> None:
    d = deployment
    report = []
    with Load(d.proxy.url, d.tokens) as load:
        load.wait_completed(20)
        slow: list[Direct] = []
        for i, replica in enumerate(d.replicas):
            stream = start_direct(replica, d.tokens[i % KEYS])
            slow.append(stream)
            process = replica.server.process
            termed_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert draining(replica), "/readyz answers 503 draining once the SIGTERM is in"
            down_at = d.proxy.wait_state(replica.name, "DOWN", timeout=DRAIN)
            assert process.poll() is None, "HAProxy took the replica out before it stopped serving"
            code = process.wait(30)
            exited_at = time.monotonic()
            assert code == 0, f"{replica.name} exited with {code}:\n{replica.server.log()[-3000:]}"
            assert exited_at - termed_at >= DRAIN, "it served for the whole drain"
            stream.join(30)
            assert stream.outcome.complete, f"the stream started before the SIGTERM: {stream.outcome}"
            assert stream.outcome.ended > termed_at + DRAIN, "the stream outlived the drain"
            replica.restart()
            up_at = d.proxy.wait_state(replica.name, "UP", timeout=30)
            report.append(f"{replica.name}: DOWN {down_at - termed_at:.2f} s after SIGTERM, exit 0 after "
                          f"{exited_at - termed_at:.2f} s, UP again {up_at - exited_at:.2f} s later")
            load.wait_completed(sum(o.complete for o in load.outcomes) + 10)
    outcomes = load.outcomes
    failed = [str(o) for o in outcomes if not o.complete]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed[:10]}"
    assert {o.replica for o in outcomes} == {r.name for r in d.replicas}
    unseen = check_books(d, outcomes + [s.outcome for s in slow])
    assert not unseen, f"usage rows no client saw: {unseen}"
    print(f"\nrolling restart: {len(outcomes)} requests, none failed; " + "; ".join(report))
