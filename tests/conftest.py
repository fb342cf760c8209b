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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]
