"""The test harness: two tiers, and every test isolated from the user's data and cache.

- In-process (the default tier): the app built by `create_app`, with scripted providers at the provider seam
  (tests/inproc.py: `ScriptedProvider`, `serve_app`, `app_server`), served over HTTP by uvicorn in a thread of the
  test process: no model, no database server, milliseconds per test.
- End-to-end (`@pytest.mark.e2e`): a real `grokgate serve` subprocess (`start_server`, the session's `server`),
  the real model, real PostgreSQL/Redis, for what only they can show. A test that uses the shared `server`,
  `pg_url` or `redis_url` is e2e by that alone; one that calls `start_server` must say so, or it fails. So
  `pytest -m "not e2e"` needs no model and no database server (SQLite files in tmp_path are fine there).

Isolation: the session (and every process it starts, inheriting its environment) runs with XDG_DATA_HOME,
XDG_CACHE_HOME, GROKGATE_DATA_DIR and GROKGATE_CACHE_DIR in a temporary directory of its own, and without the
caller's other GROKGATE_* settings; the catalog model is shared read-only through a link in that cache. So tests
never open the user's SQLite file (a running `grokgate serve` holds its lock) nor write the user's cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

TOKEN = "test-token-5f0c"
# One TLS context for every test client: httpx builds one per Client otherwise (~17 ms of CPU loading the CA
# bundle, for servers that speak plain HTTP), and the suite opens thousands of clients.
TLS = ssl.create_default_context()
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
E2E = pytest.mark.e2e

# Test configuration the harness keeps from the environment (every other GROKGATE_* variable is removed).
_KEEP = ("GROKGATE_TEST_",)
_SESSION_DIR: Path | None = None
_CURRENT: pytest.Item | None = None


def _user_cache_dir() -> Path:
    """Where `grokgate model` (make test's install step) leaves the catalog model: settings.py's default."""
    inherited = os.environ.get("GROKGATE_TEST_USER_CACHE_DIR")  # an xdist worker: the controller's finding
    if inherited:
        return Path(inherited)
    if os.environ.get("GROKGATE_CACHE_DIR"):
        return Path(os.environ["GROKGATE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grokgate"


def _share_model(user_cache: Path, cache: Path) -> None:
    """Link the verified catalog GGUF into the session's cache, with its `.verified` stamp, so servers find it
    there without hashing it again and without writing the user's cache (if ensure_model ever rebuilds it, it
    replaces the link, not the user's file). Without a verified file nothing is linked: the first server
    assembles the model into the session's cache."""
    from grokgate.providers.model_files import DEFAULT_MODEL

    source = user_cache / "models" / DEFAULT_MODEL.filename
    stamp = source.with_name(source.name + ".verified")
    if not (source.is_file() and stamp.is_file()):
        return
    target = cache / "models" / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source.resolve())
    target.with_name(stamp.name).write_text(stamp.read_text())


def _isolate_environment() -> Path:
    global _SESSION_DIR
    user_cache = _user_cache_dir()
    for name in [n for n in os.environ if n.startswith("GROKGATE_") and not n.startswith(_KEEP)]:
        del os.environ[name]
    os.environ.pop("XAI_API_KEY", None)
    _SESSION_DIR = Path(tempfile.mkdtemp(prefix="grokgate-tests-"))
    paths = {"XDG_DATA_HOME": _SESSION_DIR / "xdg-data", "XDG_CACHE_HOME": _SESSION_DIR / "xdg-cache",
             "GROKGATE_DATA_DIR": _SESSION_DIR / "data", "GROKGATE_CACHE_DIR": _SESSION_DIR / "cache"}
    for name, path in paths.items():
        path.mkdir()
        os.environ[name] = str(path)
    os.environ["GROKGATE_TEST_USER_CACHE_DIR"] = str(user_cache)
    # No server of the session serves gRPC unless its test asks (a free port of its own): 50051 may be a running
    # `make serve`'s.
    os.environ["GROKGATE_GRPC_PORT"] = "0"
    _share_model(user_cache, paths["GROKGATE_CACHE_DIR"])
    return _SESSION_DIR


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end: a real grokgate server, the real model, or a real "
                                       "SQLite/PostgreSQL/Redis (deselect with -m 'not e2e')")
    if _SESSION_DIR is None:
        _isolate_environment()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_DIR is not None:
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)


_E2E_FIXTURES = {"server", "pg_url", "redis_url"}


def _uses_harness_fixture(item: pytest.Item, name: str) -> bool:
    """Whether `item` uses this module's fixture `name` (not a module's own fixture of the same name)."""
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.get(name) if info is not None else None
    return bool(defs) and defs[-1].func.__module__ == __name__


# The modules that take longest (measured: `make test PYTEST_ARGS=--durations=40`), run first. pytest-xdist hands
# out whole files in collection order (--dist loadfile): a long file drawn last keeps one worker busy while the
# others idle. Stable: the rest keep their order, and a module's tests stay together.
LONGEST_FIRST = ("test_openapi_contract", "test_local_tools", "test_console", "test_generation", "test_billing",
                 "test_tenant_walls", "test_accounts_hardening", "test_local_tenant_prompt_cache",
                 "test_server_limits", "test_isolation", "test_replay", "test_routing", "test_input_hardening",
                 "test_local_tenancy", "test_responses_api", "test_cli", "test_concurrency", "test_model_files",
                 "test_tool_clients", "test_agents_offline", "test_tools_with_structured_output")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use the shared server, PostgreSQL or Redis are e2e whatever they say. A module that marks
    none of its tests and starts servers itself (written before the tiers) is e2e as a whole. The longest
    modules go first (LONGEST_FIRST)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
    tiered = {item.path for item in items if item.get_closest_marker("e2e") is not None}
    sources: dict[Path, bool] = {}
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            continue
        if any(_uses_harness_fixture(item, name) for name in _E2E_FIXTURES):
            item.add_marker(E2E)
        elif item.path not in tiered:
            if item.path not in sources:
                sources[item.path] = "start_server(" in item.path.read_text()
            if sources[item.path]:
                item.add_marker(E2E)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    global _CURRENT
    _CURRENT = item


def require_e2e(what: str) -> None:
    """Fail a test that reaches for a real server or database without saying so (`@pytest.mark.e2e`)."""
    if _CURRENT is not None and _CURRENT.get_closest_marker("e2e") is None:
        pytest.fail(f"{_CURRENT.nodeid} uses {what}: mark it @pytest.mark.e2e, or use the in-process tier "
                    "(tests/inproc.py)", pytrace=False)


def session_dir() -> Path:
    """This session's own directory (its default data and cache dirs live here)."""
    assert _SESSION_DIR is not None
    return _SESSION_DIR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    token: str = TOKEN
    extra: dict[str, Any] = field(default_factory=dict)

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("verify", TLS)
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)

    def chat(self, body: dict[str, Any], *, token: str | None = TOKEN, path: str = "/grok/chat/completions",
             **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        with self.client() as c:
            return c.post(path, json=body, headers=headers, **kwargs)

    def engine(self) -> dict[str, Any]:
        with self.client() as c:
            status: dict[str, Any] = c.get("/readyz").json()["backends"]["local"]
            return status

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(tmp: Path, *args: str, env: dict[str, str | None] | None = None, wait_ready: bool = True,
                 name: str = "server", timeout: float = 120) -> Server:
    """Start `grokgate serve` on a free port with its own data dir under `tmp`; fails at once if it exits.
    `env` adds to the session's environment; a None value removes that variable."""
    return start_servers(tmp, (name, args, env or {}), wait_ready=wait_ready, timeout=timeout)[0]


def start_servers(tmp: Path, *specs: tuple[str, tuple[str, ...], dict[str, str | None]], wait_ready: bool = True,
                  timeout: float = 120) -> list[Server]:
    """Start several servers at once, each `(name, args, env)`: their start-ups (imports, migrations, model
    load) overlap instead of adding up. Any that exits fails the call at once, and the others are stopped."""
    require_e2e("a grokgate server subprocess")
    servers = [_launch(tmp, *spec) for spec in specs]
    try:
        for i, spec in enumerate(specs):
            for attempt in range(3):
                if _wait_started(servers[i], wait_ready, timeout, retry_port=attempt < 2):
                    break
                servers[i] = _launch(tmp, *spec)  # another process took the port: try another one
        return servers
    except BaseException:
        for started in servers:
            stop_server(started)
        raise


def _launch(tmp: Path, name: str, args: tuple[str, ...], env: dict[str, str | None]) -> Server:
    port = free_port()
    log_path = tmp / f"{name}-{port}.log"
    full_env = {**os.environ, "GROKGATE_API_KEYS": TOKEN, "GROKGATE_DATA_DIR": str(tmp / f"{name}-data"), **env}
    for unset in [k for k, v in env.items() if v is None]:  # None: not in this server's environment
        del full_env[unset]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "grokgate", "serve", "--port", str(port), *args],
                                   stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
    return Server(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)


def _wait_started(server: Server, wait_ready: bool, timeout: float, retry_port: bool) -> bool:
    """True once the server answers; False if it lost its port to another process (and `retry_port`)."""
    deadline = time.monotonic() + timeout
    probe = f"{server.url}/readyz" if wait_ready else f"{server.url}/healthz"
    with httpx.Client(timeout=2, verify=TLS) as poller:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                if retry_port and "address already in use" in server.log().lower():
                    return False
                raise RuntimeError(f"grokgate exited with {server.process.returncode}:\n{server.log()}")
            try:
                if poller.get(probe).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"grokgate did not become ready in {timeout:.0f} s:\n{server.log()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shared server (e2e): the local engine with 4 slots, a small context per slot, a short keep-alive
    interval. One per session (per xdist worker): tests that use it must not depend on its idle state without
    `wait_idle`."""
    tmp = tmp_path_factory.mktemp("server")
    srv = start_server(tmp, "--slots", "4", "--ctx-per-slot", "1024", "--keepalive-seconds", "0.5")
    yield srv
    stop_server(srv)


def kill_under_load(server: Server, send: Callable[[int, httpx.Client], str | None], completed: int) -> list[str]:
    """Eight client threads call `send(i, client)` in a loop (it answers the request id of a completed answer,
    else None); once `completed` answers completed (or 30 s passed), SIGKILL the server. The ids completed."""
    done: list[str] = []
    stop = threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            try:
                with server.client(timeout=30) as c:
                    request_id = send(i, c)
            except (httpx.HTTPError, json.JSONDecodeError):
                return  # the server is gone
            if request_id is not None:
                done.append(request_id)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(done) < completed and time.monotonic() < deadline:
        time.sleep(0.02)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    stop.set()
    for t in threads:
        t.join()
    return done


def wait_idle(server: Server, timeout: float = 60) -> dict[str, Any]:
    """Wait until the engine runs nothing and queues nothing (other tests' jobs ended)."""
    deadline = time.monotonic() + timeout
    status = server.engine()
    while time.monotonic() < deadline:
        status = server.engine()
        if status["slots_busy"] == 0 and status["queued"] == 0:
            return status
        time.sleep(0.05)
    raise AssertionError(f"engine still busy: {status}")


@dataclass
class SSE:
    """A parsed event stream: data payloads in order, and the comment lines seen."""

    raw: str
    events: list[Any]
    comments: list[str]

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [e for e in self.events if isinstance(e, dict)]


def parse_sse(raw: str) -> SSE:
    events: list[Any] = []
    comments: list[str] = []
    assert raw.endswith("\n\n"), "every event ends with a blank line"
    for block in raw.split("\n\n")[:-1]:
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line)
            else:
                assert line.startswith("data: "), f"unexpected SSE line {line!r}"
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return SSE(raw, events, comments)


@contextmanager
def raw_request(server: Server, body: dict[str, Any], token: str | None = None) -> Iterator[socket.socket]:
    """POST a chat completion on a plain socket, so a test can read part of the answer and hang up abruptly
    (leaving the `with` block closes the connection)."""
    url = urlparse(server.url)
    payload = json.dumps(body).encode()
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall((f"POST /grok/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
                      f"Authorization: Bearer {token or server.token}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload)
        yield sock


def read_until(sock: socket.socket, marker: bytes, count: int) -> bytes:
    """Read until `marker` was seen `count` times; returns everything read (headers included)."""
    received = b""
    while received.count(marker) < count:
        data = sock.recv(65536)
        assert data, "the server closed the connection early"
        received += data
    return received


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


PG_ADMIN_URL = os.environ.get("GROKGATE_TEST_PG", "postgresql://root@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GROKGATE_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _pg_execute(sql: str) -> None:
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (skipped, with the reason, when PostgreSQL is absent)."""
    import uuid

    require_e2e("PostgreSQL")
    name = f"grokgate_test_{uuid.uuid4().hex[:12]}"
    try:
        _pg_execute(f'CREATE DATABASE "{name}"')
    except (OSError, TimeoutError) as exc:  # not reachable; any other error is a real failure
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    _pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_url() -> str:
    import redis

    require_e2e("Redis")
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        pytest.skip(f"Redis is not reachable at {REDIS_URL}: {exc}")
    return REDIS_URL


def call(server: Server, method: str, path: str, token: str | None, **kwargs: Any) -> httpx.Response:
    """One request on a fresh connection (a 500 closes the server's side of a kept-alive one)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    with server.client() as c:
        return c.request(method, path, headers=headers, **kwargs)


def ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    return r.json()


LIMIT_CODES = {"used_up", "key_limit_exceeded", "too_many_requests", "rate_limiter_unavailable"}


def err(r: httpx.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    """Check the contract's error envelope and return its `error` object."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "trace_id"}, body
    # `limit`: which limit refused a request, beside AceData's members (core/billing.py); only on such refusals.
    assert set(body["error"]) - {"limit"} == {"code", "message", "type", "param"}, body
    if "limit" in body["error"]:
        assert code in LIMIT_CODES and isinstance(body["error"]["limit"], dict), body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"], body
    assert body["trace_id"] == r.headers["x-request-id"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return dict(body["error"])


def admin_post(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    with server.client() as c:
        r = c.post(path, json=body, headers={"Authorization": f"Bearer {server.token}"})
    assert r.status_code in (200, 201), r.text
    result: dict[str, Any] = r.json()
    return result


def create_key(server: Server, name: str, credits: str | None = None, **fields: Any) -> tuple[str, dict[str, Any]]:
    """Create an account token through the admin API; returns (secret, key record)."""
    body = {"name": name, **fields}
    if credits is not None:
        body["credits"] = credits
    result = admin_post(server, "/admin/keys", body)
    return result["token"], result["key"]
