"""The error envelope, each AceData error code with its status, auth failures, and x-request-id.

In-process (tests/inproc.py: the app from `create_app`, a scripted provider): the envelope is the app's, not
the backend's. The one error the local engine itself raises (a prompt past its context) is checked end to end in
tests/test_streaming.py, streamed and not, on the shared server those tests use anyway.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import user
from tests.inproc import AppServer, app_server


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    with app_server(tmp_path_factory.mktemp("errors")) as served:
        yield served

BASE: dict[str, Any] = {"model": "grok-3", "messages": user("Say OK."), "max_tokens": 1}


def envelope(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "trace_id"}
    assert set(body["error"]) == {"code", "message", "type", "param"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert "Traceback" not in response.text
    assert re.fullmatch(r"[0-9a-f]{32}", body["trace_id"])
    assert body["trace_id"] == response.headers["x-request-id"]
    return body


def test_missing_authorization_is_no_token(gateway: AppServer) -> None:
    envelope(gateway.chat(BASE, token=None), 400, "no_token")


@pytest.mark.parametrize("header", ["Bearer wrong-token", "Bearer", "Basic dGVzdA==", "test-token-5f0c",
                                    "Bearer test-token-5f0c-and-more", "Bearer TEST-TOKEN-5F0C"])
def test_bad_credentials_are_invalid_token(gateway: AppServer, header: str) -> None:
    with gateway.client() as c:
        r = c.post("/grok/chat/completions", json=BASE, headers={"Authorization": header})
    body = envelope(r, 401, "invalid_token")
    assert body["error"]["type"] == "authentication_error"


def test_auth_is_checked_before_the_body(gateway: AppServer) -> None:
    """An unauthenticated caller learns nothing about the body's validity."""
    envelope(gateway.chat({"model": "grok-3", "messages": [], "n": 0}, token="nope"), 401, "invalid_token")


def test_bearer_scheme_is_case_insensitive(gateway: AppServer) -> None:
    with gateway.client() as c:
        r = c.post("/grok/chat/completions", json=BASE, headers={"Authorization": f"bearer {gateway.token}"})
    assert r.status_code == 200


def test_unknown_path_is_no_api(gateway: AppServer) -> None:
    with gateway.client() as c:
        body = envelope(c.post("/grok/images/generations", json={}), 404, "no_api")
    assert "/grok/images/generations" in body["error"]["message"]


def test_unknown_model_names_the_available_ones(gateway: AppServer) -> None:
    body = envelope(gateway.chat({**BASE, "model": "grok-99"}), 404, "model_not_found")
    assert body["error"]["param"] == "model"
    for name in ("grok-4", "grok-4-1-fast", "grok-4-1-fast-non-reasoning", "grok-3", "grok-3-mini", "grok-2-vision"):
        assert name in body["error"]["message"]


def test_oversized_body_is_413(gateway: AppServer) -> None:
    big = {**BASE, "messages": user("x" * 20_000_000)}
    body = envelope(gateway.chat(big), 413, "request_too_large")
    assert "16777216" in body["error"]["message"]


def test_oversized_chunked_body_is_413(gateway: AppServer) -> None:
    def chunks() -> Any:
        yield b'{"model": "grok-3", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 1_000_000
        yield b'"}]}'

    with gateway.client() as c:
        r = c.post("/grok/chat/completions", content=chunks(),
                   headers={"Authorization": f"Bearer {gateway.token}", "Content-Type": "application/json"})
    envelope(r, 413, "request_too_large")


def test_every_response_has_a_request_id(gateway: AppServer) -> None:
    with gateway.client() as c:
        responses = [
            c.get("/healthz"),
            c.get("/readyz"),
            c.get("/openapi.json"),
            c.get("/v1/models", headers={"Authorization": f"Bearer {gateway.token}"}),
            c.get("/missing"),
        ]
    responses.append(gateway.chat(BASE))
    responses.append(gateway.chat({**BASE, "stream": True}))
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(i and re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
    assert len(set(ids)) == len(ids)


def test_method_not_allowed_uses_the_envelope(gateway: AppServer) -> None:
    with gateway.client() as c:
        envelope(c.get("/grok/chat/completions"), 405, "method_not_allowed")
