"""A backend that fails unexpectedly gets a 500 `api_error` in the envelope, never a traceback.

The failing backend is a provider injected at the provider seam, served by a real uvicorn over HTTP, with its
own temporary data and cache directories (never the user's: a running `grokgate serve` holds their SQLite lock).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Iterator

import httpx
import pytest
import uvicorn

from grokgate.app import create_app
from grokgate.core.events import Delta, Event
from grokgate.providers.base import BackendStatus, EventsGeneration, ModelTable, Route
from grokgate.schemas.chat import ChatCompletionRequest
from grokgate.settings import Settings
from tests.conftest import free_port, parse_sse, user


class Exploding:
    """Fails before any output (`boom-early`) or after some (`boom-late`)."""

    name = "exploding"
    fingerprint = "fp_test"

    def ready(self) -> bool:
        return True

    def status(self) -> BackendStatus:
        return {"ready": True}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def check(self, request: ChatCompletionRequest) -> None:
        return None

    def prompt_copies(self, request: ChatCompletionRequest) -> int:
        return 1

    def generate(self, request: ChatCompletionRequest, upstream_model: str) -> EventsGeneration:
        async def events() -> AsyncGenerator[Event]:
            if upstream_model == "boom-late":
                yield Delta(index=0, content="partial")
                await asyncio.sleep(0)
            raise RuntimeError("secret internal detail /etc/passwd")

        return EventsGeneration(events(), self.name, self.fingerprint)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("internal-error")
    provider = Exploding()
    models = ModelTable([Route("boom-early", provider, "boom-early"), Route("boom-late", provider, "boom-late")])
    app = create_app(Settings(api_keys=["k"], keepalive_seconds=0.2, data_dir=tmp / "data", cache_dir=tmp / "cache",
                              tune_gc=False), models=models)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # a server that cannot start (its thread died) fails the fixture at once
        assert thread.is_alive() and time.monotonic() < deadline, "the in-thread server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def requests_counted(url: str, model: str, status: int) -> float:
    """grokgate_requests_total for one model and status: counted only where the serving layer settled the request."""
    text = httpx.get(f"{url}/metrics").text
    mark = f'grokgate_requests_total{{backend="exploding",model="{model}",status="{status}"}} '
    return sum(float(line.removeprefix(mark)) for line in text.splitlines() if line.startswith(mark))


def test_unexpected_failure_is_500_api_error(url: str) -> None:
    before = requests_counted(url, "boom-early", 500)
    r = httpx.post(f"{url}/grok/chat/completions", headers={"Authorization": "Bearer k"},
                   json={"model": "boom-early", "messages": user("x")})
    assert r.status_code == 500
    body = r.json()
    assert body["error"]["code"] == "api_error"
    assert body["error"]["message"] == "Internal server error."
    assert body["trace_id"] == r.headers["x-request-id"]
    assert "secret" not in r.text and "Traceback" not in r.text
    # The backend's failure, settled and counted: not a failure of grokgate's own before the backend ran.
    assert requests_counted(url, "boom-early", 500) == before + 1


def test_unexpected_failure_mid_stream_is_an_error_event(url: str) -> None:
    r = httpx.post(f"{url}/grok/chat/completions", headers={"Authorization": "Bearer k"},
                   json={"model": "boom-late", "messages": user("x"), "stream": True})
    assert r.status_code == 200
    sse = parse_sse(r.text)
    assert sse.chunks[-1]["error"]["code"] == "api_error"
    assert "secret" not in r.text
    contents = [ch["delta"].get("content") for c in sse.chunks[:-1] for ch in c["choices"]]
    assert "partial" in contents
    assert "[DONE]" not in sse.events

