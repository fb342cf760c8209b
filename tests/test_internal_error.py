"""A backend that fails unexpectedly gets a 500 `api_error` in the envelope, never a traceback.

The failing backend is a provider injected at the provider seam, served by a real uvicorn over HTTP.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from grokgate.app import create_app
from grokgate.core.events import Delta, Event
from grokgate.providers.base import ModelTable, Route
from grokgate.schemas.chat import ChatCompletionRequest
from grokgate.settings import Settings
from tests.conftest import free_port, parse_sse, user


class Exploding:
    """Fails before any output (`boom-early`) or after some (`boom-late`)."""

    name = "exploding"
    fingerprint = "fp_test"

    def ready(self) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {"ready": True}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def check(self, request: ChatCompletionRequest) -> None:
        return None

    def generate(self, request: ChatCompletionRequest, upstream_model: str) -> Any:
        async def events() -> Any:
            if upstream_model == "boom-late":
                yield Delta(index=0, content="partial")
                await asyncio.sleep(0)
            raise RuntimeError("secret internal detail /etc/passwd")

        return events()


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    provider = Exploding()
    models = ModelTable([Route("boom-early", provider, "boom-early"), Route("boom-late", provider, "boom-late")])
    app = create_app(Settings(api_keys=["k"], keepalive_seconds=0.2), models=models)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_unexpected_failure_is_500_api_error(url: str) -> None:
    r = httpx.post(f"{url}/grok/chat/completions", headers={"Authorization": "Bearer k"},
                   json={"model": "boom-early", "messages": user("x")})
    assert r.status_code == 500
    body = r.json()
    assert body["error"]["code"] == "api_error"
    assert body["error"]["message"] == "Internal server error."
    assert body["trace_id"] == r.headers["x-request-id"]
    assert "secret" not in r.text and "Traceback" not in r.text


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


_ = Event
