"""Every range of contract section 1.3, both sides of each edge, over HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Server, user

BASE: dict[str, Any] = {"model": "grok-3", "messages": user("Say OK."), "max_tokens": 1}

# (field, accepted value at the edge, refused value just past it)
EDGES = [
    ("n", 1, 0),
    ("n", 128, 129),
    ("temperature", 0, -0.01),
    ("temperature", 2, 2.01),
    ("top_p", 0, -0.01),
    ("top_p", 1, 1.01),
    ("frequency_penalty", -2, -2.01),
    ("frequency_penalty", 2, 2.01),
    ("presence_penalty", -2, -2.01),
    ("presence_penalty", 2, 2.01),
    ("max_tokens", 1, 0),
    ("max_completion_tokens", 1, 0),
    ("stop", ["a", "b", "c", "d"], ["a", "b", "c", "d", "e"]),
    ("stop", "a", []),
]


def assert_bad_request(response: Any, param: str | None) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error", "trace_id"}
    assert body["error"]["code"] == "bad_request"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
    assert body["error"]["message"]
    assert body["trace_id"] == response.headers["x-request-id"]
    return body


@pytest.mark.parametrize(("field", "ok", "bad"), EDGES, ids=[f"{f}={o!r}|{b!r}" for f, o, b in EDGES])
def test_range_edges(server: Server, field: str, ok: Any, bad: Any) -> None:
    refused = server.chat({**BASE, field: bad})
    assert_bad_request(refused, field)
    accepted = server.chat({**BASE, field: ok})
    assert accepted.status_code == 200, accepted.text
    expected_choices = ok if field == "n" else 1
    assert len(accepted.json()["choices"]) == expected_choices


def test_top_logprobs_edges(server: Server) -> None:
    for ok in (0, 20):
        r = server.chat({**BASE, "logprobs": True, "top_logprobs": ok})
        assert r.status_code == 200, r.text
    for bad in (-1, 21):
        assert_bad_request(server.chat({**BASE, "logprobs": True, "top_logprobs": bad}), "top_logprobs")
    assert_bad_request(server.chat({**BASE, "top_logprobs": 2}), "top_logprobs")


def test_messages_must_not_be_empty(server: Server) -> None:
    assert_bad_request(server.chat({**BASE, "messages": []}), "messages")


def test_required_fields(server: Server) -> None:
    assert_bad_request(server.chat({"messages": user("hi")}), "model")
    assert_bad_request(server.chat({"model": "grok-3"}), "messages")


@pytest.mark.parametrize("role", ["system", "developer", "user"])
def test_roles_accepted(server: Server, role: str) -> None:
    messages = [{"role": role, "content": "Be brief."}, *user("Say OK.")] if role != "user" else user("hi")
    r = server.chat({**BASE, "messages": messages})
    assert r.status_code == 200, r.text


def test_assistant_and_tool_messages_accepted(server: Server) -> None:
    messages = [
        *user("What is the weather?"),
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        *user("So?"),
    ]
    r = server.chat({**BASE, "messages": messages})
    assert r.status_code == 200, r.text


def test_unknown_role_refused(server: Server) -> None:
    body = assert_bad_request(server.chat({**BASE, "messages": [{"role": "bot", "content": "x"}]}), "messages[0].role")
    assert "user" in body["error"]["message"]


def test_content_parts(server: Server) -> None:
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": " OK."}]
    assert server.chat({**BASE, "messages": [{"role": "user", "content": parts}]}).status_code == 200
    assert_bad_request(server.chat({**BASE, "messages": [{"role": "user", "content": []}]}), "messages[0].content")
    bad_part = [{"type": "audio", "data": "x"}]
    body = assert_bad_request(
        server.chat({**BASE, "messages": [{"role": "user", "content": bad_part}]}), "messages[0].content[0]"
    )
    assert "text" in body["error"]["message"] and "image_url" in body["error"]["message"]


def test_missing_content_refused(server: Server) -> None:
    assert_bad_request(server.chat({**BASE, "messages": [{"role": "user"}]}), "messages[0]")


def test_tool_message_needs_tool_call_id(server: Server) -> None:
    assert_bad_request(server.chat({**BASE, "messages": [{"role": "tool", "content": "x"}]}), "messages[0]")


def test_image_parts_refused_by_text_model(server: Server) -> None:
    parts = [{"type": "text", "text": "What is this?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    body = assert_bad_request(
        server.chat({**BASE, "model": "grok-2-vision", "messages": [{"role": "user", "content": parts}]}),
        "messages[0].content",
    )
    assert "does not accept images" in body["error"]["message"]


def test_unknown_fields_are_ignored(server: Server) -> None:
    r = server.chat({**BASE, "search_parameters": {"mode": "auto"}, "store": False, "metadata": {"k": "v"},
                     "service_tier": "auto", "logit_bias": {"1": 2}, "user": "u1", "reasoning_effort": "low",
                     "x_custom": [1, 2]})
    assert r.status_code == 200, r.text


def test_wrong_types(server: Server) -> None:
    assert_bad_request(server.chat({**BASE, "n": "two"}), "n")
    assert_bad_request(server.chat({**BASE, "stream": "yes"}), "stream")
    assert_bad_request(server.chat({**BASE, "stop": 5}), "stop")
    assert_bad_request(server.chat({**BASE, "response_format": {"type": "xml"}}), "response_format")


def test_malformed_json(server: Server) -> None:
    with server.client() as c:
        r = c.post("/grok/chat/completions", content=b'{"model": "grok-3",',
                   headers={"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"})
    body = assert_bad_request(r, None)
    assert "JSON" in body["error"]["message"]


def test_body_must_be_object(server: Server) -> None:
    with server.client() as c:
        r = c.post("/grok/chat/completions", content=b"[1, 2]",
                   headers={"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"})
    assert_bad_request(r, None)


def test_form_encoded_body_gets_a_hint(server: Server) -> None:
    with server.client() as c:
        r = c.post("/grok/chat/completions", content=b'{"model":"grok-3"}',
                   headers={"Authorization": f"Bearer {server.token}",
                            "Content-Type": "application/x-www-form-urlencoded"})
    body = assert_bad_request(r, None)
    assert "application/json" in body["error"]["message"]


def test_max_tokens_above_server_bound(server: Server) -> None:
    assert_bad_request(server.chat({**BASE, "max_tokens": 10_000_000}), "max_tokens")
    assert_bad_request(server.chat({**BASE, "max_completion_tokens": 10_000_000}), "max_completion_tokens")
