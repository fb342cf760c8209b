"""Every range of the contract's request fields, both sides of each edge, over HTTP.

Validation happens before any backend runs, so these tests use the in-process tier (tests/inproc.py): the
app from `create_app` with a scripted provider, where an accepted value costs no generation (n=128 included).
What only the local engine decides (images on a text model, a tool conversation rendered by its template) is
checked end to end on the shared server.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import E2E, Server, user
from tests.inproc import AppServer, app_server


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    with app_server(tmp_path_factory.mktemp("validation")) as served:
        yield served

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
def test_range_edges(gateway: AppServer, field: str, ok: Any, bad: Any) -> None:
    refused = gateway.chat({**BASE, field: bad})
    assert_bad_request(refused, field)
    accepted = gateway.chat({**BASE, field: ok})
    assert accepted.status_code == 200, accepted.text
    expected_choices = ok if field == "n" else 1
    assert len(accepted.json()["choices"]) == expected_choices


def test_top_logprobs_edges(gateway: AppServer) -> None:
    for ok in (0, 20):
        r = gateway.chat({**BASE, "logprobs": True, "top_logprobs": ok})
        assert r.status_code == 200, r.text
    for bad in (-1, 21):
        assert_bad_request(gateway.chat({**BASE, "logprobs": True, "top_logprobs": bad}), "top_logprobs")
    assert_bad_request(gateway.chat({**BASE, "top_logprobs": 2}), "top_logprobs")


def test_messages_must_not_be_empty(gateway: AppServer) -> None:
    assert_bad_request(gateway.chat({**BASE, "messages": []}), "messages")


def test_required_fields(gateway: AppServer) -> None:
    assert_bad_request(gateway.chat({"messages": user("hi")}), "model")
    assert_bad_request(gateway.chat({"model": "grok-3"}), "messages")


@pytest.mark.parametrize("role", ["system", "developer", "user"])
def test_roles_accepted(gateway: AppServer, role: str) -> None:
    messages = [{"role": role, "content": "Be brief."}, *user("Say OK.")] if role != "user" else user("hi")
    r = gateway.chat({**BASE, "messages": messages})
    assert r.status_code == 200, r.text


TOOL_CONVERSATION = [
    *user("What is the weather?"),
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    *user("So?"),
]


def test_assistant_and_tool_messages_accepted(gateway: AppServer) -> None:
    r = gateway.chat({**BASE, "messages": TOOL_CONVERSATION})
    assert r.status_code == 200, r.text


@E2E
def test_assistant_and_tool_messages_accepted_by_the_local_engine(server: Server) -> None:
    """llama.cpp renders the tool conversation with the model's chat template."""
    r = server.chat({**BASE, "messages": TOOL_CONVERSATION})
    assert r.status_code == 200, r.text


def test_unknown_role_refused(gateway: AppServer) -> None:
    body = assert_bad_request(gateway.chat({**BASE, "messages": [{"role": "bot", "content": "x"}]}), "messages[0].role")
    assert "user" in body["error"]["message"]


def test_content_parts(gateway: AppServer) -> None:
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": " OK."}]
    assert gateway.chat({**BASE, "messages": [{"role": "user", "content": parts}]}).status_code == 200
    assert_bad_request(gateway.chat({**BASE, "messages": [{"role": "user", "content": []}]}), "messages[0].content")
    bad_part = [{"type": "audio", "data": "x"}]
    body = assert_bad_request(
        gateway.chat({**BASE, "messages": [{"role": "user", "content": bad_part}]}), "messages[0].content[0]"
    )
    assert "text" in body["error"]["message"] and "image_url" in body["error"]["message"]


def test_missing_content_refused(gateway: AppServer) -> None:
    assert_bad_request(gateway.chat({**BASE, "messages": [{"role": "user"}]}), "messages[0]")


def test_tool_message_needs_tool_call_id(gateway: AppServer) -> None:
    assert_bad_request(gateway.chat({**BASE, "messages": [{"role": "tool", "content": "x"}]}), "messages[0]")


@E2E
def test_image_parts_refused_by_text_model(server: Server) -> None:
    """The local engine's own check (providers/local.py): the default model reads no images."""
    parts = [{"type": "text", "text": "What is this?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    body = assert_bad_request(
        server.chat({**BASE, "model": "grok-2-vision", "messages": [{"role": "user", "content": parts}]}),
        "messages[0].content",
    )
    assert "does not accept images" in body["error"]["message"]


def test_unknown_fields_are_ignored(gateway: AppServer) -> None:
    r = gateway.chat({**BASE, "search_parameters": {"mode": "auto"}, "store": False, "metadata": {"k": "v"},
                     "service_tier": "auto", "logit_bias": {"1": 2}, "user": "u1", "reasoning_effort": "low",
                     "x_custom": [1, 2]})
    assert r.status_code == 200, r.text


def test_wrong_types(gateway: AppServer) -> None:
    assert_bad_request(gateway.chat({**BASE, "n": "two"}), "n")
    assert_bad_request(gateway.chat({**BASE, "stream": "yes"}), "stream")
    assert_bad_request(gateway.chat({**BASE, "stop": 5}), "stop")
    assert_bad_request(gateway.chat({**BASE, "response_format": {"type": "xml"}}), "response_format")


def test_malformed_json(gateway: AppServer) -> None:
    with gateway.client() as c:
        r = c.post("/grok/chat/completions", content=b'{"model": "grok-3",',
                   headers={"Authorization": f"Bearer {gateway.token}", "Content-Type": "application/json"})
    body = assert_bad_request(r, None)
    assert "JSON" in body["error"]["message"]


def test_body_must_be_object(gateway: AppServer) -> None:
    with gateway.client() as c:
        r = c.post("/grok/chat/completions", content=b"[1, 2]",
                   headers={"Authorization": f"Bearer {gateway.token}", "Content-Type": "application/json"})
    assert_bad_request(r, None)


def test_form_encoded_body_gets_a_hint(gateway: AppServer) -> None:
    with gateway.client() as c:
        r = c.post("/grok/chat/completions", content=b'{"model":"grok-3"}',
                   headers={"Authorization": f"Bearer {gateway.token}",
                            "Content-Type": "application/x-www-form-urlencoded"})
    body = assert_bad_request(r, None)
    assert "application/json" in body["error"]["message"]


def test_max_tokens_above_server_bound(gateway: AppServer) -> None:
    assert_bad_request(gateway.chat({**BASE, "max_tokens": 10_000_000}), "max_tokens")
    assert_bad_request(gateway.chat({**BASE, "max_completion_tokens": 10_000_000}), "max_completion_tokens")
