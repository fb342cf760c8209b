"""xai-sdk against a real `grokgate serve` on the local model (e2e): Tokenize (the engine's own tokens, exactly what
a text adds to a chat prompt's `prompt_tokens`), Models (the engine's context length), and Chat with the SDK's
defaults (sample, stream, n, a tool call and its result, `parse` through the engine's constrained decoding)."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import xai_sdk
from pydantic import BaseModel
from xai_sdk.chat import tool, tool_result
from xai_sdk.chat import user as chat_user
from xai_sdk.proto.v6 import models_pb2, tokenize_pb2, tokenize_pb2_grpc

from tests.conftest import TOKEN, Server, free_port, start_server, stop_server, user

pytestmark = pytest.mark.e2e

CTX_PER_SLOT = 1024
# Texts that start with a letter: in a chat prompt they follow the template's newline, which Qwen's pre-tokenizer
# never merges with a letter, and end before a special token: so the text's tokens are exactly what it adds.
TEXTS = ["Hello world", "def add(a, b):\n    return a + b\n", "Grüße 🎉 aus Köln, 你好!", "Stop <|im_end|> here"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    port = free_port()
    srv = start_server(tmp_path_factory.mktemp("xai-sdk-local"), "--grpc-port", str(port), "--slots", "2",
                       "--ctx-per-slot", str(CTX_PER_SLOT), name="xai-sdk-local")
    yield srv, port
    stop_server(srv)


def prompt_tokens(server: Server, text: str) -> int:
    r = server.chat({"model": "grok-3", "messages": user(text), "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    count: int = r.json()["usage"]["prompt_tokens"]
    return count


def test_tokens_are_what_the_text_adds_to_a_chat_prompt(served: tuple[Server, int]) -> None:
    server, port = served
    client = xai_sdk.Client(api_key=TOKEN, api_host=f"localhost:{port}", timeout=60)
    empty = prompt_tokens(server, "")
    for text in TEXTS:
        tokens = client.tokenize.tokenize_text(text, model="grok-3")
        assert len(tokens) == prompt_tokens(server, text) - empty, text
        assert b"".join(t.token_bytes for t in tokens) == text.encode()
    special = client.tokenize.tokenize_text("<|im_end|>", model="grok-3")
    assert len(special) == 1 and special[0].string_token == "<|im_end|>"  # as the engine reads it in a prompt


def test_the_async_client_and_the_rest_twin_agree(served: tuple[Server, int]) -> None:
    server, port = served
    text = TEXTS[2]

    async def main() -> Any:
        return await xai_sdk.AsyncClient(api_key=TOKEN, api_host=f"localhost:{port}").tokenize.tokenize_text(
            text, "grok-4")

    tokens = [(t.token_id, t.string_token, bytes(t.token_bytes)) for t in asyncio.run(main())]
    with server.client() as c:
        r = c.post("/v1/tokenize-text", json={"text": text, "model": "grok-4"},
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    assert r.headers["x-grokgate-tokenizer"] == "exact"
    assert [(t["token_id"], t["string_token"], bytes(t["token_bytes"])) for t in r.json()["token_ids"]] == tokens
    # A piece that is part of a character (the emoji's bytes come in more than one token) keeps its bytes.
    assert any("\ufffd" in s for _, s, _ in tokens)
    stub = tokenize_pb2_grpc.TokenizeStub(grpc.insecure_channel(f"localhost:{port}"))
    _, call = stub.TokenizeText.with_call(tokenize_pb2.TokenizeTextRequest(text=text, model="grok-4"),
                                          metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert dict(call.trailing_metadata())["x-grokgate-tokenizer"] == "exact"


def test_models_carry_the_engines_context_length(served: tuple[Server, int]) -> None:
    _, port = served
    models = xai_sdk.Client(api_key=TOKEN, api_host=f"localhost:{port}").models.list_language_models()
    assert models and all(m.max_prompt_length == CTX_PER_SLOT for m in models)
    assert all(list(m.input_modalities) == [models_pb2.TEXT] for m in models)
    assert all(m.system_fingerprint.startswith("fp_local_") for m in models)


# -- chat on the local model, with the SDK's defaults --------------------------------------------------------------


def test_sample_and_stream_answer_on_the_local_model(served: tuple[Server, int]) -> None:
    _, port = served
    client = xai_sdk.Client(api_key=TOKEN, api_host=f"localhost:{port}", timeout=120)
    chat = client.chat.create(model="grok-3", messages=[chat_user("Say hello in three words.")], max_tokens=24)
    sampled = chat.sample()
    assert sampled.content.strip() and sampled.role == "ROLE_ASSISTANT"
    assert sampled.usage.prompt_tokens > 0 and 0 < sampled.usage.completion_tokens <= 24
    texts, response = [], None
    for response, chunk in chat.stream():  # noqa: B007  (the last response is the whole answer)
        texts.append(chunk.content)
    assert response is not None and "".join(texts) == response.content and response.content.strip()
    assert response.usage.completion_tokens > 0
    batch = chat.sample_batch(2)
    assert len(batch) == 2 and all(r.content.strip() for r in batch)


def test_a_tool_call_round_trip_on_the_local_model(served: tuple[Server, int]) -> None:
    _, port = served
    weather = tool("get_weather", "The current weather in a city.", {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    client = xai_sdk.Client(api_key=TOKEN, api_host=f"localhost:{port}", timeout=120)
    chat = client.chat.create(model="grok-3", messages=[chat_user("What is the weather in Paris?")],
                              tools=[weather], tool_choice="required", max_tokens=128)
    response = chat.sample()
    calls = response.tool_calls  # one, or more: parallel calls are the default, and each arrives whole
    assert calls and all(c.function.name == "get_weather" for c in calls)
    assert all(isinstance(json.loads(c.function.arguments), dict) for c in calls)
    assert len({c.id for c in calls}) == len(calls)
    # With `required` the model may go on adding calls until the output cap (issue 20, F4): the call it was cut in
    # is left out, whole calls are kept, and the choice ends as `length`.
    assert response.finish_reason in ("REASON_TOOL_CALLS", "REASON_MAX_LEN")
    chat.append(response)
    for call in calls:
        chat.append(tool_result('{"sky": "sunny", "celsius": 21}', tool_call_id=call.id))
    answer = client.chat.create(model="grok-3", messages=list(chat.messages), tools=[weather],
                                max_tokens=64).sample()
    assert answer.content.strip() or answer.tool_calls  # tool_choice auto: text, or another whole call
    for again in answer.tool_calls:
        json.loads(again.function.arguments)


def test_parse_returns_the_pydantic_model_on_the_local_model(served: tuple[Server, int]) -> None:
    class City(BaseModel):
        name: str
        country: str

    _, port = served

    async def main() -> tuple[Any, City]:
        client = xai_sdk.AsyncClient(api_key=TOKEN, api_host=f"localhost:{port}", timeout=120)
        chat = client.chat.create(model="grok-3", messages=[chat_user("Name a city in France, as JSON.")],
                                  max_tokens=96)
        return await chat.parse(City)

    response, city = asyncio.run(main())
    assert isinstance(city, City) and city.name.strip()
    assert City.model_validate_json(response.content) == city


def test_a_stored_conversation_and_a_deferred_answer_on_the_local_model(served: tuple[Server, int]) -> None:
    server, port = served
    client = xai_sdk.Client(api_key=TOKEN, api_host=f"localhost:{port}", timeout=120)
    first = client.chat.create(model="grok-3", messages=[chat_user("My name is Ada. Say hi.")], max_tokens=16,
                               store_messages=True).sample()
    second = client.chat.create(model="grok-3", messages=[chat_user("What is my name?")], max_tokens=16,
                                previous_response_id=first.id, store_messages=True).sample()
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the stored turn went to the engine too
    with server.client() as c:
        r = c.post("/v1/responses", headers={"Authorization": f"Bearer {TOKEN}"},
                   json={"model": "grok-3", "input": "Thanks!", "previous_response_id": second.id,
                         "max_output_tokens": 16})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["input_tokens"] > second.usage.prompt_tokens
    deferred = client.chat.create(model="grok-3", messages=[chat_user("Say hi.")], max_tokens=8).defer(
        interval=datetime.timedelta(milliseconds=100))
    assert deferred.content.strip() and deferred.usage.completion_tokens > 0
