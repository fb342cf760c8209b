"""SSE exactly as clients expect it (contract sections 1.6, 3.3 and 5)."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from tests.conftest import SSE, Server, parse_sse, user, wait_idle


def stream(server: Server, body: dict[str, Any]) -> tuple[httpx.Response, SSE]:
    with server.client() as c, c.stream(
        "POST", "/grok/chat/completions", json={**body, "stream": True},
        headers={"Authorization": f"Bearer {server.token}"},
    ) as r:
        raw = r.read().decode()
    return r, parse_sse(raw)


def check_invariants(sse: SSE, n: int, model: str) -> None:
    assert sse.events[-1] == "[DONE]"
    assert sse.events.count("[DONE]") == 1
    chunks = sse.chunks
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == model
        assert c["system_fingerprint"].startswith("fp_local_")
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


@pytest.mark.parametrize("n", [1, 3])
def test_sse_invariants(server: Server, n: int) -> None:
    r, sse = stream(server, {"model": "grok-4", "messages": user("Count to five."), "max_tokens": 6, "n": n})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-accel-buffering"] == "no"
    assert r.headers["cache-control"] == "no-cache"
    check_invariants(sse, n, "grok-4")
    assert all(not c["choices"] == [] for c in sse.chunks), "no usage chunk unless asked for"
    texts = ["".join(ch["delta"].get("content", "") for c in sse.chunks for ch in c["choices"] if ch["index"] == i)
             for i in range(n)]
    assert all(texts), texts


@pytest.mark.parametrize("n", [1, 3])
def test_usage_chunk(server: Server, n: int) -> None:
    body = {"model": "grok-3", "messages": user("Count to five."), "max_tokens": 5, "n": n,
            "stream_options": {"include_usage": True}}
    _, sse = stream(server, body)
    check_invariants(sse, n, "grok-3")
    usage_chunks = [c for c in sse.chunks if c["choices"] == []]
    assert len(usage_chunks) == 1
    assert sse.chunks[-1] is usage_chunks[0], "the usage chunk is the last before [DONE]"
    usage = usage_chunks[0]["usage"]
    assert usage["prompt_tokens"] > 0
    assert 1 <= usage["completion_tokens"] <= 5 * n
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    content_chunks = sum(1 for c in sse.chunks for ch in c["choices"] if ch["delta"].get("content"))
    assert usage["completion_tokens"] >= content_chunks


def test_stream_error_before_output_is_an_http_error(server: Server) -> None:
    r, _ = (None, None)
    with server.client() as c:
        r = c.post("/grok/chat/completions", headers={"Authorization": f"Bearer {server.token}"},
                   json={"model": "grok-3", "messages": user("hello " * 3000), "stream": True})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "bad_request"


def _occupy_slots(server: Server, seconds_of_work: int, results: list[int]) -> list[threading.Thread]:
    """Fill every slot with a long generation, from background threads."""
    def run() -> None:
        r = server.chat({"model": "grok-3", "messages": user("Write a long story about a lighthouse."),
                         "max_tokens": seconds_of_work, "n": 4})
        results.append(r.status_code)

    threads = [threading.Thread(target=run)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while server.engine()["slots_busy"] < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    return threads


def test_keepalive_comments_while_waiting(server: Server) -> None:
    wait_idle(server)
    results: list[int] = []
    threads = _occupy_slots(server, 40, results)
    try:
        r, sse = stream(server, {"model": "grok-3", "messages": user("Say OK."), "max_tokens": 2})
    finally:
        for t in threads:
            t.join()
    assert results == [200]
    assert r.status_code == 200
    assert ": keep-alive" in sse.comments, "a queued stream sends keep-alive comments"
    check_invariants(sse, 1, "grok-3")


def test_error_after_first_byte_is_an_error_event(server: Server) -> None:
    """A failure once the 200 is sent arrives as `data: {"error": ...}`, never as content."""
    wait_idle(server)
    results: list[int] = []
    threads = _occupy_slots(server, 40, results)
    try:
        r, sse = stream(server, {"model": "grok-3", "messages": user("hello " * 3000)})
    finally:
        for t in threads:
            t.join()
    assert r.status_code == 200
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
