"""The fake xAI's `POST /v1/tokenize-text` and its `cost_in_usd_ticks` behave as tests/fakes/fake_xai.py documents."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import TLS
from tests.fakes.fake_xai import TICKS_PER_TOKEN, FakeXAI, words

KEY = "xai-test-key"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeXAI]:
    with FakeXAI().start() as server:
        yield server


def post(fake: FakeXAI, path: str, body: Any, key: str | None = KEY, **headers: str) -> httpx.Response:
    auth = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(f"{fake.url}{path}", json=body, headers={**auth, **headers}, timeout=10, verify=TLS)


@pytest.mark.parametrize("text", ["Hello world", "  leading and trailing  ", "héllo 🎉\nwörld", "", "   "])
def test_tokens_are_words_with_their_whitespace(fake: FakeXAI, text: str) -> None:
    r = post(fake, "/tokenize-text", {"text": text, "model": "grok-3"})
    assert r.status_code == 200, r.text
    tokens = r.json()["token_ids"]
    assert set(r.json()) == {"token_ids"}
    assert b"".join(bytes(t["token_bytes"]) for t in tokens) == text.encode()
    assert all(bytes(t["token_bytes"]).decode() == t["string_token"] for t in tokens)
    assert all(isinstance(t["token_id"], int) and 0 <= t["token_id"] < 131_072 for t in tokens)
    assert len(tokens) == (words(text) or (1 if text else 0))
    assert fake.tokenize_requests[-1]["body"] == {"text": text, "model": "grok-3"}


def test_a_text_adds_its_tokens_to_a_chat_prompt(fake: FakeXAI) -> None:
    text = "one two three four"
    tokens = post(fake, "/tokenize-text", {"text": text, "model": "grok-3"}).json()["token_ids"]
    with_text = post(fake, "/chat/completions", {"model": "grok-3", "messages": [{"role": "user", "content": text}]})
    empty = post(fake, "/chat/completions", {"model": "grok-3", "messages": [{"role": "user", "content": ""}]})
    assert with_text.json()["usage"]["prompt_tokens"] - empty.json()["usage"]["prompt_tokens"] == len(tokens)


def test_tokenize_refuses_as_xai_does(fake: FakeXAI) -> None:
    assert post(fake, "/tokenize-text", {"text": "a", "model": "grok-3"}, key=None).status_code == 401
    bad = post(fake, "/tokenize-text", {"text": "a", "model": "grok-3"}, key="xai-wrong")
    assert bad.status_code == 400 and "Incorrect API key" in bad.json()["error"]
    assert post(fake, "/tokenize-text", {"text": "a", "model": "grok-9"}).status_code == 404
    assert post(fake, "/tokenize-text", {"text": "a"}).status_code == 422
    assert post(fake, "/tokenize-text", {"text": 5, "model": "grok-3"}).status_code == 422
    fake.fail_next("503")
    assert post(fake, "/tokenize-text", {"text": "a", "model": "grok-3"}).status_code == 503
    assert post(fake, "/tokenize-text", {"text": "a", "model": "grok-3"}).status_code == 200


def cost(usage: dict[str, Any]) -> int:
    """The documented rate, from the usage's own counts."""
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    output = usage["completion_tokens"] + usage["completion_tokens_details"]["reasoning_tokens"]
    return ((usage["prompt_tokens"] - cached) * TICKS_PER_TOKEN["input"] + cached * TICKS_PER_TOKEN["cached_input"]
            + output * TICKS_PER_TOKEN["output"])


def test_chat_usage_carries_xais_cost(fake: FakeXAI) -> None:
    body = {"model": "grok-3-mini", "messages": [{"role": "user", "content": "hi there"}], "n": 2}
    usage = post(fake, "/chat/completions", body, **{"x-fake-cached-tokens": "4"}).json()["usage"]
    assert usage["cost_in_usd_ticks"] == cost(usage) > 0
    assert usage["completion_tokens_details"]["reasoning_tokens"] and usage["prompt_tokens_details"]["cached_tokens"]
    r = post(fake, "/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}},
             **{"x-fake-usage-every-chunk": "1", "x-fake-cached-tokens": "4"})
    chunks = [orjson.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    assert all(c["usage"]["cost_in_usd_ticks"] == cost(c["usage"]) for c in chunks)
    assert chunks[-1]["usage"]["cost_in_usd_ticks"] == usage["cost_in_usd_ticks"]


def test_cost_is_reported_unless_turned_off() -> None:
    """xAI always reports its cost; `report_cost=False` plays an upstream that does not (an older API)."""
    body = {"model": "grok-3", "messages": [{"role": "user", "content": "a"}]}
    with FakeXAI().start() as usual, FakeXAI(report_cost=False).start() as plain:
        assert "cost_in_usd_ticks" in post(usual, "/chat/completions", body).json()["usage"]
        assert "cost_in_usd_ticks" not in post(plain, "/chat/completions", body).json()["usage"]
