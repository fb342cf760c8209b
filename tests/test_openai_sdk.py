"""The official openai SDK against grokgate, as README users run it."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import Server, user

pytestmark = pytest.mark.e2e  # the real server, model or databases (tests/conftest.py)


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/grok", api_key=server.token, max_retries=0)


def test_create(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="grok-3", messages=user("What is 2+2?"), max_tokens=8)
    assert completion.object == "chat.completion"
    assert completion.model == "grok-3"
    assert completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion._request_id


def test_stream_helper(client: openai.OpenAI) -> None:
    deltas = []
    # A generous limit: the SDK's stream helper raises LengthFinishReasonError on finish_reason "length".
    with client.chat.completions.stream(model="grok-4", messages=user("Reply with one word: a color."),
                                        max_tokens=40, temperature=0,
                                        stream_options={"include_usage": True}) as stream:
        for event in stream:
            if event.type == "content.delta":
                deltas.append(event.delta)
        final = stream.get_final_completion()
    assert deltas
    assert final.choices[0].message.content == "".join(deltas)
    assert final.usage is not None and final.usage.completion_tokens >= 1


def test_raw_stream_with_n(client: openai.OpenAI) -> None:
    texts = {0: "", 1: ""}
    for chunk in client.chat.completions.create(model="grok-3", messages=user("Say hi."), max_tokens=4, n=2,
                                                stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert all(texts.values())


def test_v1_base_url(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0)
    completion = client.chat.completions.create(model="grok-4-1-fast", messages=user("Hi"), max_tokens=2)
    assert completion.model == "grok-4-1-fast"
    models = client.models.list()
    assert [m.id for m in models.data] == ["grok-4", "grok-4-1-fast", "grok-4-1-fast-non-reasoning", "grok-3",
                                            "grok-3-mini", "grok-2-vision"]


def test_sdk_exceptions(server: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="nope", messages=user("x"))
    assert not_found.value.code == "model_not_found"
    assert not_found.value.request_id
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="grok-3", messages=user("x"), temperature=5)
    assert bad.value.param == "temperature"
    bad_key = openai.OpenAI(base_url=f"{server.url}/grok", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        bad_key.chat.completions.create(model="grok-3", messages=user("x"))
    assert auth.value.code == "invalid_token"
