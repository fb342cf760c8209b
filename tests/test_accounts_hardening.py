"""Accounts hardening (issue 9): token references, admin auth before the body, migrations racing on first
start, and a dead replica's reservations released by the living.

The admin API and CLI tests run on the in-process tier (tests/inproc.py) over a real SQLite file and a real
PostgreSQL database: they send no chat, and show nothing a separate server process would add. In the dead-replica
test the replica killed is a real `grokgate serve` process (SIGKILL is the point) and the live one an app served
in this process, both routed to the fake xAI upstream (tests/fakes/fake_xai.py); no test loads the local model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import httpx
import pytest

from grokgate.app import create_app
from tests.conftest import (
    E2E,
    PG_ADMIN_URL,
    TOKEN,
    Server,
    _pg_execute,
    call,
    create_key,
    err,
    ok,
    start_server,
    stop_server,
    user,
)
from tests.fakes.fake_xai import FakeXAI
from tests.inproc import AppServer, app_server, app_settings, serve_app

FAKE_KEY = "xai-hardening-key"
CHEAP = {"model": "grok-3", "messages": user("hi"), "max_tokens": 5}

Gateway = AppServer  # the in-process app
Replica = Server  # a `grokgate serve` process


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeXAI]:
    with FakeXAI(api_keys=[FAKE_KEY]).start() as upstream:
        yield upstream


def routing_env(tmp: Path, fake: FakeXAI) -> dict[str, str]:
    """A routing file that sends grok-3 to the fake (with a read timeout long enough for stalled requests)."""
    path = tmp / "routing.yaml"
    path.write_text(f"""
backends:
  fake:
    kind: xai
    base_url: {fake.url}
    api_key_env: XAI_FAKE
    read_timeout: 300
models:
  grok-3: [{{backend: fake}}]
""")
    return {"GROKGATE_CONFIG": str(path), "XAI_FAKE": FAKE_KEY}


def new_database() -> tuple[str, str]:
    """A fresh PostgreSQL database: (its name, its URL); skips the test when PostgreSQL is absent."""
    name = f"grokgate_test_{uuid.uuid4().hex[:12]}"
    try:
        _pg_execute(f'CREATE DATABASE "{name}"')
    except (OSError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    return name, f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"


def drop_database(name: str) -> None:
    _pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_fetch(url: str, sql: str, *args: Any) -> list[Any]:
    import asyncpg

    async def run() -> list[Any]:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def srv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One in-process app per database for the module: the serving store (on SQLite, the one holding the file's
    lock, with its writer process), as `grokgate serve` opens it."""
    tmp = tmp_path_factory.mktemp(f"hardening-{request.param}")
    db = url = None
    if request.param == "postgresql":
        db, url = new_database()
    try:
        with app_server(tmp, database_url=url) as served:
            data_dir = tmp / "data"
            yield Gateway(url=served.url, app=served.app,
                          extra={"db": request.param, "url": url, "sqlite": data_dir / "grokgate.db",
                                 "data_dir": data_dir})
    finally:
        if db:
            drop_database(db)


def api(srv: Gateway | Replica, method: str, path: str, token: str | None = TOKEN, **kwargs: Any) -> httpx.Response:
    return call(srv, method, path, token, **kwargs)


def record(srv: Gateway, ref: int | str) -> dict[str, Any]:
    result: dict[str, Any] = ok(api(srv, "GET", f"/admin/keys/{ref}"))
    return result


def rename_behind_the_api(srv: Gateway, token_id: int, name: str) -> None:
    """Give a token a name the API now refuses, as a token created before the fix may have."""
    if srv.extra["db"] == "postgresql":
        pg_fetch(srv.extra["url"], "UPDATE api_tokens SET name = $1 WHERE id = $2", name, token_id)
    else:
        with sqlite3.connect(srv.extra["sqlite"]) as conn:
            conn.execute("UPDATE api_tokens SET name = ? WHERE id = ?", (name, token_id))


def cli_env(srv: Gateway) -> dict[str, str]:
    env = {"GROKGATE_DATA_DIR": str(srv.extra["data_dir"])}
    if srv.extra["url"]:
        env["GROKGATE_DATABASE_URL"] = srv.extra["url"]
    return env


def cli_process(srv: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m grokgate ARGS` against the server's database: the real entry point and argv decoding."""
    return subprocess.run([sys.executable, "-m", "grokgate", *args], env={**os.environ, **cli_env(srv)},
                          capture_output=True, text=True, timeout=120)


def cli(srv: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    """`grokgate ARGS` run by `grokgate.cli.main` in this process, as `python -m grokgate` runs it (its
    `SystemExit` is the exit status; an exception escapes, as a traceback would), without a second of
    interpreter start-up per call. `cli_process` keeps the real process for what argv itself carries."""
    import contextlib
    import io

    from grokgate.cli import main

    out, err_text = io.StringIO(), io.StringIO()
    saved = {name: os.environ.get(name) for name in ("GROKGATE_DATA_DIR", "GROKGATE_DATABASE_URL")}
    os.environ.pop("GROKGATE_DATABASE_URL", None)
    os.environ.update(cli_env(srv))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err_text):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return subprocess.CompletedProcess(["grokgate", *args], code, out.getvalue(), err_text.getvalue())


# -- item 4: a reference never resolves silently to the wrong token ----------------------------------------------

@E2E
@pytest.mark.parametrize("name", ["2", "0042", "gg-abcdefgh", "GG-something", "a\x00b", " "])
def test_names_that_look_like_ids_or_prefixes_are_refused(srv: Gateway, name: str) -> None:
    before = ok(api(srv, "GET", "/admin/keys"))["data"]
    err(api(srv, "POST", "/admin/keys", json={"name": name}), 400, "bad_request", param="name")
    _, key = create_key(srv, f"plain-{uuid.uuid4().hex[:8]}")
    err(api(srv, "PATCH", f"/admin/keys/{key['id']}", json={"name": name}), 400, "bad_request", param="name")
    assert record(srv, key["id"]) == key
    assert len(ok(api(srv, "GET", "/admin/keys"))["data"]) == len(before) + 1


@E2E
def test_the_cli_refuses_the_same_names(srv: Gateway) -> None:
    before = len(ok(api(srv, "GET", "/admin/keys"))["data"])
    for name in ("2", "gg-abcdefgh"):
        done = cli(srv, "keys", "create", name)
        assert done.returncode == 1, done
        assert "name" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(ok(api(srv, "GET", "/admin/keys"))["data"]) == before


@E2E
def test_the_cli_takes_only_ascii_numbers_and_answers_odd_refs_without_a_traceback(srv: Gateway) -> None:
    before = len(ok(api(srv, "GET", "/admin/keys"))["data"])
    for args in (["keys", "create", "digits", "--rpm", "\u0663"], ["keys", "create", "big", "--rpm", "9" * 30],
                 ["keys", "create", "far", "--expires", "9" * 20], ["keys", "create", "arabic", "--expires", "\u0661"],
                 ["usage", "--since", "\u0662\u0660\u0662\u0664-01-01"]):
        done = cli(srv, *args)
        assert done.returncode in (1, 2) and "Traceback" not in done.stderr, (args, done)
    assert len(ok(api(srv, "GET", "/admin/keys"))["data"]) == before
    for ref in ("\u0661", "9" * 30, "x" * 300):
        done = cli(srv, "keys", "show", ref)
        assert done.returncode == 1 and "No token matches" in done.stderr, (ref, done)
    done = cli_process(srv, "keys", "show", "\udcff")  # a byte that is not UTF-8, as argv carries it
    assert done.returncode == 1 and "No token matches" in done.stderr and "Traceback" not in done.stderr, done


@E2E
def test_a_legacy_name_that_is_another_tokens_id_is_409_not_a_silent_top_up(srv: Gateway) -> None:
    _, target = create_key(srv, f"target-{uuid.uuid4().hex[:8]}", credits="1")
    _, legacy = create_key(srv, f"legacy-{uuid.uuid4().hex[:8]}", credits="1")
    rename_behind_the_api(srv, legacy["id"], str(target["id"]))  # a token named "<target's id>", made before the fix
    ref = str(target["id"])
    for method, path, body in [("GET", "", None), ("PATCH", "", {"rpm": 5}), ("DELETE", "", None),
                               ("POST", "/credits", {"amount": "5"})]:
        error = err(api(srv, method, f"/admin/keys/{ref}{path}", json=body), 409, "ambiguous_reference")
        assert f"id {target['id']} (" in error["message"] and f"id {legacy['id']} (" in error["message"], error
        assert target["prefix"] in error["message"] and legacy["prefix"] in error["message"], error
    for path in ("/admin/usage", "/admin/ledger", "/admin/ledger/search", "/admin/ledger/errors"):
        err(api(srv, "GET", path, params={"token": ref}), 409, "ambiguous_reference")
    assert record(srv, target["prefix"])["balance"] == 1_000_000, "nothing was credited"
    assert record(srv, legacy["prefix"])["balance"] == 1_000_000
    # Both stay reachable: by prefix, and the legacy one by its own id.
    assert record(srv, target["prefix"])["id"] == target["id"]
    assert record(srv, legacy["id"])["name"] == ref
    ok(api(srv, "POST", f"/admin/keys/{target['prefix']}/credits", json={"amount": "1"}))
    assert record(srv, target["prefix"])["balance"] == 2_000_000
    assert record(srv, legacy["prefix"])["balance"] == 1_000_000
    # The CLI answers the same, changes nothing, and says which tokens are meant.
    done = cli(srv, "credits", "add", ref, "7")
    assert done.returncode == 1, done
    assert f"id {target['id']} (" in done.stderr and f"id {legacy['id']} (" in done.stderr, done.stderr
    assert record(srv, target["prefix"])["balance"] == 2_000_000
    assert record(srv, legacy["prefix"])["balance"] == 1_000_000
    # Renaming the legacy token (by its id, which is unambiguous) clears the ambiguity.
    ok(api(srv, "PATCH", f"/admin/keys/{legacy['id']}", json={"name": f"renamed-{uuid.uuid4().hex[:8]}"}))
    assert record(srv, ref)["id"] == target["id"]


@E2E
def test_a_legacy_name_that_is_another_tokens_prefix_is_409(srv: Gateway) -> None:
    _, target = create_key(srv, f"target-{uuid.uuid4().hex[:8]}")
    _, legacy = create_key(srv, f"legacy-{uuid.uuid4().hex[:8]}")
    rename_behind_the_api(srv, legacy["id"], target["prefix"])
    error = err(api(srv, "POST", f"/admin/keys/{target['prefix']}/credits", json={"amount": "1"}), 409,
                "ambiguous_reference")
    assert f"id {target['id']} (" in error["message"] and f"id {legacy['id']} (" in error["message"], error
    assert record(srv, target["id"])["balance"] == 0 and record(srv, legacy["id"])["balance"] == 0


@E2E
def test_a_legacy_name_that_matches_nothing_else_still_resolves(srv: Gateway) -> None:
    _, key = create_key(srv, f"lonely-{uuid.uuid4().hex[:8]}")
    odd = f"gg-{uuid.uuid4().hex[:12]}"  # not any token's prefix
    rename_behind_the_api(srv, key["id"], odd)
    assert record(srv, odd)["id"] == key["id"]
    ok(api(srv, "POST", f"/admin/keys/{odd}/credits", json={"amount": "1"}))
    assert record(srv, key["id"])["balance"] == 1_000_000


def test_what_a_reference_may_mean() -> None:
    from grokgate.core.accounts import ID_MAX, parse_ref

    assert (parse_ref("42").id, parse_ref("42").name) == (42, "42")  # an id, or a token named so before the fix
    assert parse_ref("0042").id == 42
    for not_an_id in ("\u0661", "\u00b2", "\u2460", "\uff11", "0", "-1", "+1", "1_0", " 1", str(ID_MAX + 1),
                      "9" * 5000):
        assert parse_ref(not_an_id).id is None, not_an_id
    assert parse_ref(str(ID_MAX)).id == ID_MAX
    assert parse_ref("gg-abcdefghijk").prefix == "gg-abcdefgh"
    assert parse_ref("\udcff").empty and parse_ref("x" * 201).empty
    assert parse_ref(2**63).empty and parse_ref(7).id == 7


# -- item 9: refs that are not ids are never taken for one, and never answer 500 ----------------------------------

ODD_REFS = ["9223372036854775808", "9223372036854775807", "2147483648", "18446744073709551616", "1" + "0" * 40,
            "²", "①", "١", "１", "0", "-1", "+1", "1_0", " 1", "1 ", "a\x00b", "\x00", "\udcff"]


def _quoted(ref: str) -> str:
    return quote(ref.encode("utf-8", "surrogatepass"), safe="")


@E2E
@pytest.mark.parametrize("ref", ODD_REFS, ids=lambda r: repr(r))
def test_odd_refs_are_404_on_every_admin_route(srv: Gateway, ref: str) -> None:
    create_key(srv, f"first-{uuid.uuid4().hex[:8]}", credits="1")
    one = record(srv, 1)  # a token with id 1 exists, so '١' taken as 1 would find it
    for method, path, body in [("GET", "", None), ("PATCH", "", {"rpm": 5}), ("DELETE", "", None),
                               ("POST", "/credits", {"amount": "1"})]:
        err(api(srv, method, f"/admin/keys/{_quoted(ref)}{path}", json=body), 404, "token_not_found")
    for path in ("/admin/usage", "/admin/ledger", "/admin/ledger/search", "/admin/ledger/errors"):
        r = api(srv, "GET", f"{path}?token={_quoted(ref)}")
        assert r.status_code in (400, 404), r.text
        err(r, r.status_code, "token_not_found" if r.status_code == 404 else "bad_request")
    assert record(srv, 1) == one, "nothing was changed"


@E2E
def test_odd_price_model_names_are_400_not_500(srv: Gateway) -> None:
    free = {"input": "0", "cached_input": "0", "output": "0"}
    for model in ("a\x00b", "x" * 201):
        err(api(srv, "PUT", f"/admin/prices/{_quoted(model)}", json=free), 400, "bad_request", param="model")


@E2E
def test_unstorable_text_in_a_name_or_a_ledger_filter_is_not_500(srv: Gateway) -> None:
    headers = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    with srv.client() as c:  # a lone surrogate, which JSON allows and UTF-8 cannot encode
        r = c.post("/admin/keys", content=b'{"name": "x\\ud800"}', headers=headers)
    err(r, 400, "bad_request", param="name")
    for model in ("a\x00b", "\x00"):  # PostgreSQL text cannot hold NUL: no row can match
        assert ok(api(srv, "GET", "/admin/ledger/search", params={"model": model}))["data"] == []


# -- item 11: the admin API checks the token before it reads the body ---------------------------------------------

BODY_ROUTES = [("POST", "/admin/keys"), ("PATCH", "/admin/keys/1"), ("POST", "/admin/keys/1/credits"),
               ("PUT", "/admin/prices/grok-3")]


@E2E
@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
def test_admin_auth_errors_come_before_body_errors(srv: Gateway, method: str, path: str) -> None:
    secret, _ = create_key(srv, f"holder-{uuid.uuid4().hex[:8]}")
    def send(token: str | None, content: bytes) -> httpx.Response:
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        with srv.client() as c:
            return c.request(method, path, content=content, headers=headers)

    for content in (b"{not json", b'{"unknown": 1}', b"[]", b""):
        err(send(None, content), 400, "no_token")
        err(send("gg-not-a-real-token", content), 401, "invalid_token")
        err(send(secret, content), 403, "forbidden")


@E2E
@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
def test_admin_answers_an_unauthenticated_client_without_waiting_for_its_body(srv: Gateway, method: str,
                                                                               path: str) -> None:
    """Headers that announce a body which never comes: the auth error must not wait for it."""
    url = urlparse(srv.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 100000\r\n\r\n{{".encode())
        received = b""
        try:
            while b"\r\n\r\n" not in received or b"no_token" not in received:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
        except TimeoutError:
            pytest.fail(f"no answer while the body was outstanding; got {received!r}")
    assert received.startswith(b"HTTP/1.1 400"), received
    assert b'"no_token"' in received, received


# -- item 8: replicas racing on first start ------------------------------------------------------------------------

# The racers are fresh processes forked, for each race, from one that paid the imports once: as many processes as
# replicas, each opening its own store, engine and connections. A closed pipe starts them all at once.
MIGRATE = """
import asyncio, json, os, sys
import alembic.command, alembic.config, asyncpg, sqlalchemy.dialects.postgresql.asyncpg  # what every racer loads
from grokgate.core.pricing import default_prices
from grokgate.store.sql import SqlStore

async def migrate(store):
    await store.open(serve=True)
    await store.seed_prices(default_prices(["grok-3", "grok-4"], 1.0))
    await store.close()

def racer(url, owner, start):
    try:
        store = SqlStore(url, owner=owner)
        os.read(start, 1)  # end of file once every racer is ready: they start at once
        asyncio.run(migrate(store))
        return "ok"
    except Exception as exc:
        return "failed: " + repr(exc).replace(chr(10), " ")

count = int(sys.argv[1])
for line in sys.stdin:  # one empty database per line: one race of `count` new processes
    start, go = os.pipe()
    racers = []
    for i in range(count):
        answer, say = os.pipe()
        pid = os.fork()
        if pid == 0:  # a racer: it reports, then ends without running anything of its parent's
            try:
                os.close(go)
                os.close(answer)
                os.write(say, racer(line.strip(), f"racer-{i}", start).encode())
            finally:
                os._exit(0)
        os.close(say)
        racers.append((pid, answer))
    os.close(start)
    print("ready", flush=True)
    sys.stdin.readline()
    os.close(go)
    outcomes = []
    for pid, answer in racers:
        with os.fdopen(answer, "rb") as f:
            said = f.read().decode()
        _, status = os.waitpid(pid, 0)
        outcomes.append(said or f"exited with status {status}")
    print(json.dumps(outcomes), flush=True)
"""


def test_replicas_starting_at_once_on_an_empty_database_all_migrate() -> None:
    processes, attempts = 6, 4
    proc = subprocess.Popen([sys.executable, "-c", MIGRATE, str(processes)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None

    def say(line: str) -> str:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    try:
        for attempt in range(attempts):
            name, url = new_database()
            try:
                assert say(url) == "ready", attempt
                outcomes = json.loads(say("go"))
                assert len(outcomes) == processes, outcomes
                failures = [f"process {i}: {o}" for i, o in enumerate(outcomes) if o != "ok"]
                assert not failures, f"attempt {attempt}: {failures}"
                version = pg_fetch(url, "SELECT version_num FROM alembic_version")
                assert len(version) == 1
                seeded = pg_fetch(url, "SELECT model, count(*) AS n FROM prices GROUP BY model ORDER BY model")
                assert [(r["model"], r["n"]) for r in seeded] == [("grok-3", 1), ("grok-4", 1)], \
                    "each price seeded once"
            finally:
                drop_database(name)
    finally:
        _, stderr = proc.communicate(timeout=120)  # closes its input: the process ends after its last race
        assert proc.returncode == 0, stderr[-2000:]


# -- item 3: a dead replica's reservations are released by the living ----------------------------------------------

HEARTBEAT, DEAD_AFTER = 0.5, 2.0  # four heartbeats: a loaded host may delay one, not four


def holds_by_owner(url: str) -> dict[str, int]:
    rows = pg_fetch(url, "SELECT owner, count(*) AS n FROM reservations GROUP BY owner")
    return {r["owner"]: int(r["n"]) for r in rows}


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@E2E
def test_a_killed_replicas_reservations_are_released_by_a_live_one(
        tmp_path_factory: pytest.TempPathFactory, fake: FakeXAI, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two replicas on one database: A, a `grokgate serve` process (it is killed), and B, the live one, an app
    served in this process with the same settings and routing file."""
    tmp = tmp_path_factory.mktemp("dead-replica")
    routing = routing_env(tmp, fake)
    started = start_server(tmp, env={**routing, "GROKGATE_DATABASE_URL": pg_url, "GROKGATE_INSTANCE_ID": "pod-a-1",
                                     "GROKGATE_INSTANCE_HEARTBEAT_SECONDS": str(HEARTBEAT),
                                     "GROKGATE_INSTANCE_DEAD_AFTER_SECONDS": str(DEAD_AFTER)}, name="replica-a")
    a = Replica(**{f.name: getattr(started, f.name) for f in dataclasses.fields(started)})
    fake.reset()
    results: dict[str, int] = {}

    def send(server: Replica | Gateway, label: str) -> None:
        try:
            results[label] = server.chat(CHEAP, token=secret, timeout=300).status_code
        except httpx.HTTPError:
            results[label] = -1

    try:
        monkeypatch.setenv("XAI_FAKE", routing["XAI_FAKE"])  # the key the routing file names, for B to read
        settings = app_settings(tmp / "replica-b", config=Path(routing["GROKGATE_CONFIG"]), database_url=pg_url,
                                instance_id="pod-b-1", instance_heartbeat_seconds=HEARTBEAT,
                                instance_dead_after_seconds=DEAD_AFTER)
        with serve_app(create_app(settings)) as served:
            b = Gateway(url=served.url, app=served.app)
            try:
                secret, key = create_key(a, "spender", credits="10")
                fake.fail_next(*[{"fault": "stall", "seconds": 600}] * 3)  # A's requests stay in flight until A dies
                threads = [threading.Thread(target=send, args=(a, f"a{i}"), daemon=True) for i in range(3)]
                for t in threads:
                    t.start()
                wait_for(lambda: len(fake.chat_requests) == 3, 60, "A's requests to reach the upstream")
                fake.fail_next({"fault": "stall", "seconds": 600})  # B's request stays in flight through the sweeps
                b_thread = threading.Thread(target=send, args=(b, "b"), daemon=True)
                b_thread.start()
                wait_for(lambda: len(fake.chat_requests) == 4, 60, "B's request to reach the upstream")
                held = ok(api(b, "GET", f"/admin/keys/{key['id']}"))
                one = held["reserved"] // 4
                assert held["reserved"] == 4 * one > 0 and held["balance"] == 10_000_000 - 4 * one
                assert holds_by_owner(pg_url) == {"pod-a-1": 3, "pod-b-1": 1}
                time.sleep(2 * DEAD_AFTER)  # many sweeps by both replicas: the living keep what they hold
                assert holds_by_owner(pg_url) == {"pod-a-1": 3, "pod-b-1": 1}, \
                    "a live replica's reservations were released"

                a.process.send_signal(signal.SIGKILL)
                a.process.wait()
                wait_for(lambda: "pod-a-1" not in holds_by_owner(pg_url), 30,
                         "B to release the dead replica's reservations")
                assert holds_by_owner(pg_url) == {"pod-b-1": 1}, "B's own in-flight reservation survives its sweeps"
                after = ok(api(b, "GET", f"/admin/keys/{key['id']}"))
                assert (after["reserved"], after["balance"]) == (one, 10_000_000 - one)

                fake.release_stalls()  # B's upstream answers now (A's stalled requests end with it; A is gone)
                b_thread.join(120)
                assert results["b"] == 200
                final = ok(api(b, "GET", f"/admin/keys/{key['id']}"))
                rows = ok(api(b, "GET", f"/admin/ledger?token={key['id']}"))["data"]
                usage = [r for r in rows if r["kind"] == "usage"]
                assert len(usage) == 1 and usage[0]["status"] == "ok"
                assert final["reserved"] == 0 and final["balance"] == 10_000_000 - usage[0]["cost"]
                assert holds_by_owner(pg_url) == {}
            finally:
                fake.release_stalls()  # nothing of B's stays in flight: its shutdown need not wait
        # B's clean shutdown (the end of the block) retires its instance; the dead one was forgotten by the sweep.
        assert pg_fetch(pg_url, "SELECT owner FROM instances") == []
    finally:
        if a.process.poll() is None:
            a.process.kill()
            a.process.wait()
        stop_server(a)
        fake.reset()
