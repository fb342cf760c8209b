"""`GET /v1/models/{id}` (and `/grok/models/{id}`): the openai SDK's `client.models.retrieve`."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import TOKEN, Server, call, err, ok


def test_the_sdk_retrieves_a_model_and_lists_them(server: Server) -> None:
    for base in ("/v1", "/grok"):
        client = openai.OpenAI(base_url=server.url + base, api_key=TOKEN, max_retries=0)
        model = client.models.retrieve("grok-3")
        assert (model.id, model.object, model.owned_by) == ("grok-3", "model", "grokgate")
        listed = {m.id: m for m in client.models.list()}
        assert listed["grok-3"] == model


def test_an_unknown_model_is_model_not_found(server: Server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.NotFoundError) as failure:
        client.models.retrieve("grok-99")
    assert failure.value.code == "model_not_found"
    body = err(call(server, "GET", "/grok/models/grok-99", TOKEN), 404, "model_not_found")
    assert body["param"] == "model" and "grok-3" in body["message"]


def test_retrieving_a_model_needs_a_token(server: Server) -> None:
    err(call(server, "GET", "/v1/models/grok-3", token=None), 400, "no_token")
    err(call(server, "GET", "/v1/models/grok-3", token="wrong"), 401, "invalid_token")
    assert ok(call(server, "GET", "/v1/models/grok-3", TOKEN))["id"] == "grok-3"
