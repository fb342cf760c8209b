"""SSE exactly as clients expect it (contract sections 1.6, 3.3 and 5).

The local engine's streams are checked end to end; what the stream does around a backend's silence or failure
(keep-alive comments, an error once the 200 is sent) is the serving layer's, checked in process with a
scripted provider that is silent or fails on cue (tests/inproc.py): milliseconds instead of filling the
engine's slots for seconds.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import httpx
import pytest

from grokgate.core.errors import GatewayError
from grokgate.core.events import Event
from grokgate.schemas.chat import ChatCompletionRequest
from tests.conftest import E2E, SSE, Server, err, parse_sse, user
from tests.inproc import AppServer, ScriptedProvider, app_server, scripted_models

SILENCE = 0.6  # seconds before the scripted backend's first event: several keep-alive intervals


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """A backend that says its text after a silence (`slow`), or fails after one (`fails-late`)."""
    provider = ScriptedProvider()

    async def script(request: ChatCompletionRequest, model: str) -> AsyncGenerator[Event]:
        await asyncio.sleep(SILENCE)
        if model == "fails-late":
            raise GatewayError(400, "bad_request", "The prompt does not fit the model's context window.")
        async for event in provider.say(provider.calls[-1], model):
            yield event

    provider.script = script
    with app_server(tmp_path_factory.mktemp("streaming"), scripted_models(provider, ("slow", "fails-late")),
                    keepalive_seconds=0.1) as served:
        yield served


def stream(server: Server | AppServer, body: dict[str, Any]) -> tuple[httpx.Response, SSE]:
    with server.client() as c, c.stream(
        "POST", "/grok/chat/completions", json={**body, "stream": True},
        headers={"Authorization": f"Bearer {server.token}"},
    ) as r:
        raw = r.read().decode()
    return r, parse_sse(raw)


def check_invariants(sse: SSE, n: int, model: str, fingerprint: str = "fp_local_") -> None:
    assert sse.events[-1] == "[DONE]"
    assert sse.events.count("[DONE]") == 1
    chunks = sse.chunks
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == model
        assert c["system_fingerprint"].startswith(fingerprint)
        assert "error" not in c
    choice_chunks = [c for c in chunks if c["choices"]]
    seen_role: set[int] = set()
    finished: dict[int, int] = {}
    for c in choice_chunks:
        assert c["usage"] is None
        for choice in c["choices"]:
            i = choice["index"]
            assert 0 <= i < n
            assert {"index", "delta", "logprobs", "finish_reason"} <= set(choice)
            if "role" in choice["delta"]:
                assert choice["delta"]["role"] == "assistant"
                assert i not in seen_role
                seen_role.add(i)
            else:
                assert i in seen_role, "the role delta comes first for each choice"
            assert i not in finished, "nothing follows a choice's finish chunk"
            if choice["finish_reason"] is not None:
                assert choice["finish_reason"] in {"stop", "length"}
                finished[i] = finished.get(i, 0) + 1
    assert seen_role == set(range(n))
    assert finished == dict.fromkeys(range(n), 1), "exactly one finish chunk per choice"


@E2E
@pytest.mark.parametrize("n", [1, 3])
def test_sse_invariants(server: Server, n: int) -> None:
    r, sse = stream(server, {"model": "grok-4", "messages": user("Count to five."), "max_tokens": 4, "n": n})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-accel-buffering"] == "no"
    assert r.headers["cache-control"] == "no-cache"
    check_invariants(sse, n, "grok-4")
    assert all(not c["choices"] == [] for c in sse.chunks), "no usage chunk unless asked for"
    texts = ["".join(ch["delta"].get("content", "") for c in sse.chunks for ch in c["choices"] if ch["index"] == i)
             for i in range(n)]
    assert all(texts), texts


@E2E
@pytest.mark.parametrize("n", [1, 3])
def test_usage_chunk(server: Server, n: int) -> None:
    body = {"model": "grok-3", "messages": user("Count to five."), "max_tokens": 4, "n": n,
            "stream_options": {"include_usage": True}}
    _, sse = stream(server, body)
    check_invariants(sse, n, "grok-3")
    usage_chunks = [c for c in sse.chunks if c["choices"] == []]
    assert len(usage_chunks) == 1
    assert sse.chunks[-1] is usage_chunks[0], "the usage chunk is the last before [DONE]"
    usage = usage_chunks[0]["usage"]
    assert usage["prompt_tokens"] > 0
    assert 1 <= usage["completion_tokens"] <= 4 * n
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    content_chunks = sum(1 for c in sse.chunks for ch in c["choices"] if ch["delta"].get("content"))
    assert usage["completion_tokens"] >= content_chunks


@E2E
@pytest.mark.parametrize("stream", [True, False])
def test_prompt_longer_than_context_is_a_clear_400(server: Server, stream: bool) -> None:
    """The local engine's own refusal, before any output: streamed or not, an HTTP 400 in the error envelope
    (tests/test_errors.py checks the envelope of the app's own errors in process), naming the context."""
    body = {"model": "grok-3", "messages": user("hello " * 3000), **({"stream": True} if stream else {"max_tokens": 1})}
    r = server.chat(body)
    error = err(r, 400, "bad_request")
    assert r.headers["content-type"].startswith("application/json")
    assert "Traceback" not in r.text
    assert re.fullmatch(r"[0-9a-f]{32}", r.json()["trace_id"])
    assert "context" in error["message"]


def test_keepalive_comments_while_waiting(gateway: AppServer) -> None:
    r, sse = stream(gateway, {"model": "slow", "messages": user("Say OK."), "max_tokens": 2})
    assert r.status_code == 200
    assert ": keep-alive" in sse.comments, "a stream waiting for its first event sends keep-alive comments"
    check_invariants(sse, 1, "slow", fingerprint="fp_scripted")


def test_error_after_first_byte_is_an_error_event(gateway: AppServer) -> None:
    """A failure once the 200 is sent arrives as `data: {"error": ...}`, never as content."""
    r, sse = stream(gateway, {"model": "fails-late", "messages": user("hello")})
    assert r.status_code == 200
    assert ": keep-alive" in sse.comments, "the 200 went out before the failure"
    errors = [c for c in sse.chunks if "error" in c]
    assert len(errors) == 1
    assert sse.chunks[-1] is errors[0]
    assert "[DONE]" not in sse.events
    assert errors[0]["error"]["code"] == "bad_request"
    assert "context" in errors[0]["error"]["message"]
    assert errors[0]["trace_id"] == r.headers["x-request-id"]
    for c in sse.chunks[:-1]:
        for ch in c["choices"]:
            assert "context" not in (ch["delta"].get("content") or "")
