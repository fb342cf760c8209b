"""Tests drive a real grokgate server, started in a subprocess on a free port, over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

TOKEN = "test-token-5f0c"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


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


def start_server(tmp: Path, *args: str, env: dict[str, str] | None = None, wait_ready: bool = True,
                 name: str = "server") -> Server:
    port = free_port()
    log_path = tmp / f"{name}-{port}.log"
    full_env = {**os.environ, "GROKGATE_API_KEYS": TOKEN, "GROKGATE_DATA_DIR": str(tmp / f"{name}-data"),
                **(env or {})}
    # The default model is assembled once into the user's cache and reused by every server the tests start.
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "grokgate", "serve", "--port", str(port), *args],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=full_env,
    )
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"grokgate exited with {process.returncode}:\n{server.log()}")
        try:
            r = httpx.get(f"{server.url}/readyz" if wait_ready else f"{server.url}/healthz", timeout=2)
            if r.status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"grokgate did not become ready:\n{server.log()}")


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
    """The shared server: 4 slots, a small context per slot, a short keep-alive interval."""
    tmp = tmp_path_factory.mktemp("server")
    srv = start_server(tmp, "--slots", "4", "--ctx-per-slot", "1024", "--keepalive-seconds", "0.5")
    yield srv
    stop_server(srv)


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


def err(r: httpx.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    """Check the contract's error envelope and return its `error` object."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "trace_id"}, body
    assert set(body["error"]) == {"code", "message", "type", "param"}, body
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
