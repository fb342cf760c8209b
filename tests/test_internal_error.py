"""A backend that fails unexpectedly gets a 500 `api_error` in the envelope, never a traceback.

The failing backend is a provider injected at the provider seam, served by a real uvicorn over HTTP, with its
own temporary data and cache directories (never the user's: a running `grokgate serve` holds their SQLite lock).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterator

import httpx
import pytest

from grokgate.core.events import Delta, Event
from grokgate.providers.base import ModelTable, Route
from grokgate.schemas.chat import ChatCompletionRequest
from tests.conftest import parse_sse, user
from tests.inproc import ScriptedProvider, app_server


async def explode(request: ChatCompletionRequest, upstream_model: str) -> AsyncGenerator[Event]:
    """Fails before any output (`boom-early`) or after some (`boom-late`)."""
    if upstream_model == "boom-late":
        yield Delta(index=0, content="partial")
        await asyncio.sleep(0)
    raise RuntimeError("secret internal detail /etc/passwd")


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    provider = ScriptedProvider("exploding", script=explode, fingerprint="fp_test")
    models = ModelTable([Route("boom-early", provider, "boom-early"), Route("boom-late", provider, "boom-late")])
    with app_server(tmp_path_factory.mktemp("internal-error"), models, api_keys=["k"], keepalive_seconds=0.2) as app:
        yield app.url


def requests_counted(url: str, model: str, status: int) -> float:
    """grokgate_requests_total for one model and status: counted only where the serving layer settled the request."""
    text = httpx.get(f"{url}/metrics").text
    mark = f'grokgate_requests_total{{backend="exploding",endpoint="chat",model="{model}",status="{status}"}} '
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

