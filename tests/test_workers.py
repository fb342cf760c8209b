"""`grokgate serve --workers 2` (grokgate/workers.py) on PostgreSQL + Redis, through the real server: one port,
two worker processes, each a replica of its own instance id.

The books and limits are exact across the workers (a funded burst: one ledger row per answer, nothing left
reserved; rpm N: exactly N of a burst pass), /metrics of any worker counts every worker's requests, a SIGHUP
replaces both workers under load without a failed request, and SIGTERM ends every process with nothing reserved.
What `--workers` refuses (SQLite, no Redis, the local engine) is refused at start with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from grokgate.core.accounts import format_credits
from tests.conftest import (
    E2E,
    PG_ADMIN_URL,
    REDIS_URL,
    Server,
    _pg_execute,
    create_key,
    raw_request,
    start_server,
    stop_server,
)
from tests.fakes.fake_xai import FakeXAI
from tests.test_billing import CHEAP, admin_get, check_books, fake, fire, reservation_of, upstream_env

__all__ = ["fake"]  # the upstream fixture, shared with tests/test_billing.py

BURST = 200


@dataclass
class Workers:
    server: Server
    database: str  # PostgreSQL URL of its database, or the SQLite file (for the test's own checks)

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.server.process.pid}/task/{self.server.process.pid}/children")
        return [int(p) for p in path.read_text().split()]

    @property
    def sqlite(self) -> bool:
        return not self.database.startswith("postgresql")

    def query(self, sql: str) -> object:
        if self.sqlite:
            import sqlite3

            with contextlib.closing(sqlite3.connect(self.database)) as conn:
                return conn.execute(sql).fetchone()[0]

        async def run() -> object:
            conn = await asyncpg.connect(self.database, timeout=5)
            try:
                return await conn.fetchval(sql)
            finally:
                await conn.close()

        return asyncio.run(run())


def _redis_or_skip() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        pytest.skip(f"Redis is not reachable at {REDIS_URL}: {exc}")


def _database() -> str:
    name = f"grokgate_test_{uuid.uuid4().hex[:12]}"
    try:
        _pg_execute(f'CREATE DATABASE "{name}"')
    except (OSError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    return name


def start_workers(tmp: Path, fake: FakeXAI, database: str | None, name: str, redis: bool = True) -> Workers:
    """`--workers 2` on PostgreSQL (`database`) + Redis (unless not `redis`), or (None) on SQLite in its data dir
    without Redis."""
    # A short drain: a stop (SIGTERM) keeps serving, /readyz 503, for that long first (grokgate.drain).
    env = upstream_env(tmp, fake, GROKGATE_MAX_CONNECTIONS_PER_CLIENT="1000", GROKGATE_LOG_LEVEL="WARNING",
                       GROKGATE_DRAIN_SECONDS="1")
    if database is not None:
        url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{database}"
        env.update(GROKGATE_DATABASE_URL=url, **({"GROKGATE_REDIS_URL": REDIS_URL} if redis else {}))
    else:
        url = str(tmp / f"{name}-data" / "grokgate.db")
    server = start_server(tmp, "--workers", "2", env=env, name=name)
    return Workers(server, url)


@contextlib.contextmanager
def deployment(tmp: Path, fake: FakeXAI, kind: str, name: str) -> Iterator[Workers]:
    database = None
    if kind.startswith("postgres"):
        if kind == "postgres":
            _redis_or_skip()
        database = _database()
    try:
        w = start_workers(tmp, fake, database, name, redis=kind == "postgres")
        try:
            yield w
        finally:
            stop_server(w.server)
    finally:
        if database is not None:
            _pg_execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def workers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            fake: FakeXAI) -> Iterator[Workers]:
    with deployment(tmp_path_factory.mktemp(f"workers-{request.param}"), fake, request.param, "workers") as w:
        yield w


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def requests_counted(server: Server) -> int:
    """grokgate_requests_total over every label, as one scrape (on a fresh connection: either worker) shows it."""
    with server.client() as c:
        text = c.get("/metrics").text
    return int(sum(float(m) for m in re.findall(r"^grokgate_requests_total\{[^}]*\} (\S+)$", text, re.M)))


@E2E
def test_two_workers_are_two_replicas_serving_one_port(workers: Workers) -> None:
    children = workers.children()
    assert len(children) == 2
    before = {pid: cpu_ticks(pid) for pid in children}
    token, _ = create_key(workers.server, "spread", credits="1000")
    responses = fire([workers.server], token, BURST, CHEAP)
    assert [r.status_code for r in responses] == [200] * BURST
    # SO_REUSEPORT spreads connections over the workers' sockets: each served a share of the burst.
    used = {pid: cpu_ticks(pid) - before[pid] for pid in children}
    assert all(ticks > 0 for ticks in used.values()), used
    if not workers.sqlite:  # each worker a replica: an instance row of its own
        owners = workers.query("SELECT string_agg(owner, ',' ORDER BY owner) FROM instances")
        assert isinstance(owners, str) and re.fullmatch(r".+-w0,.+-w1", owners), owners


@E2E
def test_funded_burst_is_exact_across_workers(workers: Workers) -> None:
    reservation = reservation_of(workers.server, CHEAP)
    initial = reservation * 10 + reservation // 2  # funded for about 10 requests
    token, key = create_key(workers.server, "racer", credits=format_credits(initial))
    responses = fire([workers.server], token, BURST, CHEAP)
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 403}, codes
    served = codes.count(200)
    assert served >= 10 and 403 in codes, served
    check_books(workers.server, key["id"], initial, served)
    assert workers.query("SELECT count(*) FROM reservations") == 0


@E2E
def test_rpm_is_exact_across_workers(workers: Workers) -> None:
    token, _ = create_key(workers.server, "limited", credits="1000", rpm=17)
    codes = [r.status_code for r in fire([workers.server], token, 60, CHEAP)]
    assert codes.count(200) == 17 and codes.count(429) == 43, codes


@E2E
def test_metrics_count_every_workers_requests(workers: Workers) -> None:
    token, _ = create_key(workers.server, "counted", credits="1000")
    before = requests_counted(workers.server)
    fire([workers.server], token, 50, CHEAP)
    # Several scrapes, each on its own connection: whichever worker answers, the sum is every worker's.
    assert {requests_counted(workers.server) - before for _ in range(6)} == {50}


@E2E
def test_a_top_up_through_one_worker_is_spendable_through_any_at_once(workers: Workers) -> None:
    reservation = reservation_of(workers.server, CHEAP)
    token, key = create_key(workers.server, "topped", credits=format_credits(reservation // 2))
    assert _post(workers.server, token) == 403  # less than one reservation
    with workers.server.client() as c:
        r = c.post(f"/admin/keys/{key['id']}/credits", json={"amount": format_credits(4 * reservation)},
                   headers={"Authorization": f"Bearer {workers.server.token}"})
    assert r.status_code == 200, r.text
    # At once, on fresh connections (either worker): SQLite's holds are the supervisor's, told of the change.
    assert [_post(workers.server, token) for _ in range(4)] == [200] * 4


@E2E
def test_postgres_without_redis_shares_the_supervisors_rate_limiter(tmp_path: Path, fake: FakeXAI) -> None:
    with deployment(tmp_path, fake, "postgres-no-redis", "no-redis") as w:
        token, key = create_key(w.server, "limited", credits="1000", rpm=11)
        codes = [r.status_code for r in fire([w.server], token, 40, CHEAP)]
        assert codes.count(200) == 11 and codes.count(429) == 29, codes
        check_books(w.server, key["id"], 1000 * 1_000_000, 11)


def load(server: Server, token: str, stop: threading.Event, results: list[int], errors: list[str]) -> None:
    """Requests back to back on one kept-alive client until `stop`."""
    with server.client(timeout=60) as c:
        while not stop.is_set():
            try:
                r = c.post("/grok/chat/completions", json=CHEAP, headers={"Authorization": f"Bearer {token}"})
                results.append(r.status_code)
            except httpx.HTTPError as exc:
                errors.append(repr(exc))


@E2E
def test_sighup_replaces_every_worker_without_a_failed_request(workers: Workers) -> None:
    token, key = create_key(workers.server, "reloaded", credits="100000")
    old = set(workers.children())
    stop, results, errors = threading.Event(), [], []
    threads = [threading.Thread(target=load, args=(workers.server, token, stop, results, errors)) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        workers.server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 120
        while "reload done" not in workers.server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert "reload done" in workers.server.log(), workers.server.log()[-3000:]
    new = set(workers.children())
    assert len(new) == 2 and not new & old, (old, new)
    assert errors == [] and set(results) == {200}, (errors[:5], sorted(set(results)))
    assert len(results) > 100
    check_books(workers.server, key["id"], 100_000 * 1_000_000, len(results))
    if not workers.sqlite:
        owners = workers.query("SELECT string_agg(owner, ',' ORDER BY owner) FROM instances")
        assert isinstance(owners, str) and re.fullmatch(r".+-w0\.1,.+-w1\.1", owners), owners


@E2E
@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
def test_sigterm_stops_every_worker_with_nothing_reserved(tmp_path: Path, fake: FakeXAI, kind: str) -> None:
    with deployment(tmp_path, fake, kind, "stopped") as w:
        token, key = create_key(w.server, "stopped", credits="100000")
        children = w.children()
        stop, results, errors = threading.Event(), [], []
        threads = [threading.Thread(target=load, args=(w.server, token, stop, results, errors)) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1)
        w.server.process.send_signal(signal.SIGTERM)
        # Every worker drains as one server does: still serving, not ready (grokgate.drain).
        readiness = set()
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            with w.server.client() as c:
                readiness.add(c.get("/readyz").json()["status"])
        assert "draining" in readiness, readiness
        assert w.server.process.wait(60) == 0, w.server.log()[-3000:]
        stop.set()
        for t in threads:
            t.join()
        assert all(not Path(f"/proc/{pid}").exists() for pid in children)
        assert results and set(results) == {200}, sorted(set(results))
        assert w.query("SELECT count(*) FROM reservations") == 0
        # SQLite: the supervisor's store closes last, after every worker's settlements: none was left held.
        assert "unsettled" not in w.server.log(), w.server.log()[-3000:]
        if not w.sqlite:
            assert w.query("SELECT count(*) FROM instances") == 0  # both retired
        charged = w.query(f"SELECT count(*) FROM ledger WHERE token_id = {key['id']} AND kind = 'usage'")
        assert charged == len(results)  # every answer billed once, nothing billed unanswered


@E2E
def test_a_killed_workers_holds_are_released(workers: Workers, fake: FakeXAI) -> None:
    """Requests in flight hold a key's whole balance; SIGKILL both workers: the supervisor starts them again, and
    what the dead ones held is released (SQLite: the supervisor drops a dead worker's holds; PostgreSQL: a worker
    restarted under its instance id releases that id's rows), nothing of it billed."""
    reservation = reservation_of(workers.server, CHEAP)
    token, key = create_key(workers.server, "killed", credits=format_credits(4 * reservation))
    fake.fail_next(*["stall;seconds=60"] * 4)
    stalled: list[object] = []
    threads = [threading.Thread(target=lambda: stalled.append(_post(workers.server, token))) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 20
        while _in_flight(workers.server) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = _post(workers.server, token)
        assert isinstance(refused, int) and refused == 403, refused  # the balance is all held
        for pid in workers.children():
            os.kill(pid, signal.SIGKILL)
        for t in threads:
            t.join(30)
    finally:
        fake.release_stalls()
    assert all(not isinstance(r, int) for r in stalled), stalled  # cut off with their workers
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (len(workers.children()) < 2 or "starting it again" not in
                                           workers.server.log()):
        time.sleep(0.1)
    answered = None
    while time.monotonic() < deadline:
        answered = _post(workers.server, token)
        if answered == 200:
            break
        time.sleep(0.2)  # a connection hashed to a worker still starting waits in its socket's queue
    assert answered == 200, answered
    # Each worker releases its holds as it starts again (PostgreSQL): the other may still be starting.
    while admin_get(workers.server, f"/admin/keys/{key['id']}")["reserved"] and time.monotonic() < deadline:
        time.sleep(0.1)
    check_books(workers.server, key["id"], 4 * reservation, 1)


def _post(server: Server, token: str) -> int | str:
    try:
        with server.client(timeout=60) as c:
            r = c.post("/grok/chat/completions", json=CHEAP, headers={"Authorization": f"Bearer {token}"})
            return r.status_code
    except httpx.HTTPError as exc:
        return repr(exc)


def _in_flight(server: Server) -> float:
    with server.client() as c:
        found = re.search(r"^grokgate_requests_in_flight (\S+)$", c.get("/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


@E2E
def test_the_local_model_is_loaded_once_and_serves_every_worker(tmp_path: Path) -> None:
    """The local engine on SQLite: the supervisor maps the model, no worker does; requests through either worker
    run on its slots (streamed and not), billed as in one process."""
    server = start_server(tmp_path, "--workers", "2", "--slots", "2", "--ctx-per-slot", "1024", name="engine")
    try:
        w = Workers(server, str(tmp_path / "engine-data" / "grokgate.db"))
        token, key = create_key(server, "local", credits="1000")
        body = {"model": "grok-3", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}
        responses = fire([server], token, 8, body) + fire([server], token, 4, {**body, "stream": True})
        assert [r.status_code for r in responses] == [200] * 12, [r.text for r in responses if r.status_code != 200]
        assert all("data: [DONE]" in r.text for r in responses[8:])
        check_books(server, key["id"], 1000 * 1_000_000, 12)

        def maps_model(pid: int) -> bool:
            return ".gguf" in Path(f"/proc/{pid}/maps").read_text()

        assert maps_model(server.process.pid)
        assert [maps_model(pid) for pid in w.children() if "workers" in Path(f"/proc/{pid}/cmdline").read_text()] \
            == [False, False]
        with server.client() as c:
            assert c.get("/readyz").json()["backends"]["local"]["slots"] == 2  # the supervisor's engine
        # A reload replaces the workers, not the model: the new ones generate through the same engine.
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while "reload done" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "reload done" in server.log(), server.log()[-3000:]
        assert [r.status_code for r in fire([server], token, 4, body)] == [200] * 4
        assert maps_model(server.process.pid)
        # A client gone while the supervisor's engine evaluates its long prompt is billed that prompt (its
        # estimate), as in one process: the stopped generation reports what it consumed back to the worker.
        long = {**body, "messages": [{"role": "user", "content": "Count the words: " + "lorem ipsum " * 400}],
                "stream": True}
        with raw_request(server, long, token) as sock:
            time.sleep(0.3)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, not a close
        deadline = time.monotonic() + 30
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = [r for r in admin_get(server, f"/admin/ledger?token={key['id']}&limit=10000")["data"]
                    if r["kind"] == "usage" and r["status"] == "client_disconnected"]
            if rows:
                break
            time.sleep(0.2)
        assert len(rows) == 1 and rows[0]["prompt_tokens"] > 400 and rows[0]["cost"] > 0, rows
    finally:
        stop_server(server)


@pytest.mark.parametrize(("env", "reason"), [
    ({"GROKGATE_ACCOUNTS": "false"}, "accounts on"),
])
def test_what_workers_cannot_serve_is_refused_at_start(tmp_path: Path, env: dict[str, str], reason: str) -> None:
    full = {**os.environ, "GROKGATE_DATA_DIR": str(tmp_path), **env}
    done = subprocess.run([sys.executable, "-m", "grokgate", "serve", "--workers", "2", "--port", "0"],
                          env=full, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and reason in done.stderr, done.stderr
