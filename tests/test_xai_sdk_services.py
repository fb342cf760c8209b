"""xAI's Models, Tokenize and Auth services as xai-sdk calls them (sync `Client` and async `AsyncClient`, plaintext on
`localhost:<port>`), and their REST twins over HTTP, on the in-process app (accounts on, SQLite): grok-3 and grok-4
routed to the fake xAI (grok-4 falls back to a scripted provider), grok-3-mini served by a scripted provider (no
tokenizer, no context length: the documented estimate and default). Prices at 2 credits per USD."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import grpc
import httpx
import pytest
import xai_sdk
from google.protobuf import empty_pb2
from xai_sdk.proto.v6 import (
    auth_pb2_grpc,
    image_pb2,
    image_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    tokenize_pb2,
    tokenize_pb2_grpc,
)

from grokgate.providers import base
from grokgate.providers.base import ModelTable, Route
from grokgate.providers.router import Candidate, RoutedModel
from tests.conftest import TOKEN, create_key, err, free_port
from tests.fakes.fake_xai import FakeXAI, tokenize
from tests.inproc import AppServer, ScriptedProvider, app_server
from tests.test_admin_schema import check_answer

XAI_KEY = "xai-test-key"
CREDITS_PER_USD = 2
TEXT = "Grokgate counts  tokens:\nhéllo 🎉 wörld "


@dataclass
class Gateway:
    http: AppServer
    port: int
    fake: FakeXAI

    @property
    def host(self) -> str:
        return f"localhost:{self.port}"

    def client(self, key: str = TOKEN) -> xai_sdk.Client:
        return xai_sdk.Client(api_key=key, api_host=self.host, timeout=30)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.host)

    def rest(self, method: str, path: str, key: str | None = TOKEN, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        with self.http.client() as c:
            return c.request(method, path, headers=headers, **kwargs)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with FakeXAI().start() as fake:
        scripted = ScriptedProvider()
        xai = base.create("xai", name="xai", base_url=fake.url, api_keys=[XAI_KEY])
        routes = [Route("grok-3", RoutedModel("grok-3", [Candidate(xai, "grok-3")]), "grok-3"),
                  Route("grok-4", RoutedModel("grok-4", [Candidate(scripted, "grok-4", priority=1),
                                                         Candidate(xai, "grok-4-0709")]), "grok-4"),
                  Route("grok-3-mini", scripted, "grok-3-mini")]
        port = free_port()
        with app_server(tmp_path_factory.mktemp("xai-sdk"), ModelTable(routes, backends=[xai, scripted]),
                        grpc_port=port, credits_per_usd=CREDITS_PER_USD) as http:
            yield Gateway(http, port, fake)


def key(gw: Gateway, name: str, credits: str | None = "100", **fields: Any) -> tuple[str, dict[str, Any]]:
    return create_key(gw.http, name, credits, **fields)  # type: ignore[arg-type]  (an AppServer serves the same)


def ticks(credits_per_million: str) -> int:
    """What a price in credits per million tokens is in xAI's unit: USD cents per 100M tokens, rounded up."""
    return math.ceil(Fraction(credits_per_million) / CREDITS_PER_USD * 100 * 100)


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    code: grpc.StatusCode = raised.value.code()
    return code


# -- Models ---------------------------------------------------------------------------------------------------


def test_models_list_and_get_carry_grokgate_prices_in_xais_unit(gw: Gateway) -> None:
    r = gw.rest("PUT", "/admin/prices/grok-3-mini", json={"input": "1", "cached_input": "0.25", "output": "3.000001"})
    assert r.status_code == 200, r.text
    models = {m.name: m for m in gw.client().models.list_language_models()}
    assert set(models) == {"grok-3", "grok-4", "grok-3-mini"}
    mini = models["grok-3-mini"]
    assert (mini.prompt_text_token_price, mini.cached_prompt_token_price, mini.completion_text_token_price) == (
        ticks("1"), ticks("0.25"), ticks("3.000001"))
    assert mini.completion_text_token_price == 15001  # $1.5000005 per million: rounded up, never below the charge
    assert mini.prompt_image_token_price == mini.prompt_text_token_price
    # The seeded default price of grok-3 ($3 / $15 per million, at any credits per USD) is xAI's own list price.
    assert (models["grok-3"].prompt_text_token_price, models["grok-3"].completion_text_token_price) == (30000, 150000)
    assert models["grok-3"].search_price > 0
    got = gw.client().models.get_language_model("grok-3-mini")
    assert got == mini


def test_models_carry_context_lengths_and_modalities_of_their_route(gw: Gateway) -> None:
    models = {m.name: m for m in gw.client().models.list_language_models()}
    assert models["grok-3"].max_prompt_length == 131_072  # xAI's grok-3
    assert list(models["grok-3"].input_modalities) == [models_pb2.TEXT]
    # grok-4 is tried on the scripted provider only after xAI: xAI's grok-4-0709 speaks for it.
    assert models["grok-4"].max_prompt_length == 256_000
    assert list(models["grok-4"].input_modalities) == [models_pb2.TEXT, models_pb2.IMAGE]
    assert models["grok-3-mini"].max_prompt_length == 32_768  # a route that does not say: the documented default
    assert all(list(m.output_modalities) == [models_pb2.TEXT] for m in models.values())


def test_the_async_client_sees_the_same_models(gw: Gateway) -> None:
    async def main() -> tuple[list[Any], Any, list[Any], list[Any]]:
        client = xai_sdk.AsyncClient(api_key=TOKEN, api_host=gw.host, timeout=30)
        return (list(await client.models.list_language_models()), await client.models.get_language_model("grok-4"),
                list(await client.models.list_embedding_models()),
                list(await client.models.list_image_generation_models()))

    listed, grok4, embedding, image = asyncio.run(main())
    assert listed == list(gw.client().models.list_language_models())
    assert grok4.name == "grok-4" and grok4.max_prompt_length == 256_000
    assert embedding == [] and image == []


def test_a_token_sees_only_its_models(gw: Gateway) -> None:
    secret, _ = key(gw, "grok-3 only", allowed_models=["grok-3"])
    client = gw.client(secret)
    assert [m.name for m in client.models.list_language_models()] == ["grok-3"]
    assert code_of(lambda: client.models.get_language_model("grok-4")) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: client.tokenize.tokenize_text("hi", "grok-4")) == grpc.StatusCode.PERMISSION_DENIED
    rest = gw.rest("GET", "/v1/language-models", secret).json()
    assert [m["id"] for m in rest["models"]] == ["grok-3"]


def test_model_errors_have_their_status(gw: Gateway) -> None:
    client = gw.client()
    assert code_of(lambda: client.models.get_language_model("no-such-model")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.models.get_language_model("")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.models.get_embedding_model("grok-3")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.models.get_image_generation_model("x")) == grpc.StatusCode.NOT_FOUND
    stranger = gw.client("not-a-token")
    for call in (stranger.models.list_language_models, lambda: stranger.models.get_language_model("grok-3"),
                 lambda: stranger.tokenize.tokenize_text("hi", "grok-3"), stranger.auth.get_api_key_info):
        assert code_of(call) == grpc.StatusCode.UNAUTHENTICATED


# -- Tokenize -------------------------------------------------------------------------------------------------


def triples(tokens: Any) -> list[tuple[int, str, bytes]]:
    return [(t.token_id, t.string_token, bytes(t.token_bytes)) for t in tokens]


def test_tokenize_on_an_xai_route_is_xais_answer(gw: Gateway) -> None:
    gw.fake.reset()
    tokens = gw.client().tokenize.tokenize_text(TEXT, model="grok-3")
    expected = [(t["token_id"], t["string_token"], bytes(t["token_bytes"])) for t in tokenize(TEXT)]
    assert triples(tokens) == expected and len(expected) == len(TEXT.split())
    sent = gw.fake.tokenize_requests
    assert [r["body"] for r in sent] == [{"text": TEXT, "model": "grok-3"}]
    assert sent[0]["headers"]["authorization"] == f"Bearer {XAI_KEY}"  # grokgate's key, never the caller's
    # A routed model's upstream id goes out, for the route tried first.
    gw.client().tokenize.tokenize_text("a b", model="grok-4")
    assert gw.fake.tokenize_requests[-1]["body"] == {"text": "a b", "model": "grok-4-0709"}


def test_tokenize_says_whether_it_is_exact(gw: Gateway) -> None:
    stub = tokenize_pb2_grpc.TokenizeStub(gw.channel())
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    for model, expected in (("grok-3", "exact"), ("grok-3-mini", "estimate")):
        response, call = stub.TokenizeText.with_call(tokenize_pb2.TokenizeTextRequest(text="hi", model=model),
                                                     metadata=metadata)
        assert response.model == model
        assert dict(call.trailing_metadata())["x-grokgate-tokenizer"] == expected


def test_tokenize_without_a_tokenizer_is_the_documented_estimate(gw: Gateway) -> None:
    async def main() -> Any:
        return await xai_sdk.AsyncClient(api_key=TOKEN, api_host=gw.host).tokenize.tokenize_text(TEXT, "grok-3-mini")

    tokens = asyncio.run(main())
    data = TEXT.encode()
    assert len(tokens) == math.ceil(len(data) / 3)  # one token per 3 bytes of UTF-8 (core/pricing.py)
    assert b"".join(bytes(t.token_bytes) for t in tokens) == data
    assert {t.token_id for t in tokens} == {0}


def test_tokenize_refuses_bad_input_with_its_status(gw: Gateway) -> None:
    client = gw.client()
    assert code_of(lambda: client.tokenize.tokenize_text("hi", "no-such-model")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.tokenize.tokenize_text("hi", "")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.tokenize.tokenize_text("x" * 131_073, "grok-3")) == grpc.StatusCode.INVALID_ARGUMENT
    assert len(client.tokenize.tokenize_text("x " * 65_536, "grok-3")) == 65_536  # at the bound


def test_tokenize_upstream_failures_are_unavailable(gw: Gateway) -> None:
    gw.fake.reset()
    gw.fake.fail_next("503")
    stub = tokenize_pb2_grpc.TokenizeStub(gw.channel())
    request = tokenize_pb2.TokenizeTextRequest(text="hi", model="grok-3")
    assert code_of(lambda: stub.TokenizeText(request, metadata=(("authorization", f"Bearer {TOKEN}"),))) == (
        grpc.StatusCode.UNAVAILABLE)
    # xai-sdk retries UNAVAILABLE: its call is answered on the retry.
    gw.fake.fail_next("502")
    assert triples(gw.client().tokenize.tokenize_text("hi", "grok-3")) == [(t["token_id"], "hi", b"hi")
                                                                            for t in tokenize("hi")]
    assert len(gw.fake.tokenize_requests) == 3


def test_tokenize_counts_against_the_rpm_and_costs_nothing(gw: Gateway) -> None:
    secret, record = key(gw, "two a minute", rpm=2)
    client = gw.client(secret)
    for _ in range(2):
        assert client.tokenize.tokenize_text("one two", "grok-3")
    with pytest.raises(grpc.RpcError) as raised:
        client.tokenize.tokenize_text("one two", "grok-3")
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(raised.value.trailing_metadata())["retry-after"]) >= 1
    # Models and Auth do not count; no credits were taken, no ledger row written.
    for _ in range(3):
        client.models.list_language_models()
        client.auth.get_api_key_info()
    balance = gw.rest("GET", "/v1/balance", secret).json()
    assert balance["balance"] == record["balance"] and balance["reserved"] == 0
    assert [row["kind"] for row in gw.rest("GET", "/v1/ledger", secret).json()["data"]] == ["topup"]


def test_refused_tokenize_requests_count_too(gw: Gateway) -> None:
    secret, _ = key(gw, "two refused", rpm=2)
    assert code_of(lambda: gw.client(secret).tokenize.tokenize_text("hi", "no-such")) == grpc.StatusCode.NOT_FOUND
    err(gw.rest("POST", "/v1/tokenize-text", secret, content=b"{not json"), 400, "bad_request")
    err(gw.rest("POST", "/v1/tokenize-text", secret, json={"text": "hi", "model": "grok-3"}), 429,
        "too_many_requests")


# -- Auth -----------------------------------------------------------------------------------------------------


def test_api_key_info_describes_the_token_without_its_secret(gw: Gateway) -> None:
    secret, record = key(gw, "described", allowed_models=["grok-3", "grok-3-mini"])
    info = gw.client(secret).auth.get_api_key_info()
    assert info.name == "described" and info.api_key_id == str(record["id"])
    assert info.redacted_api_key == record["prefix"] + "..." and secret.startswith(record["prefix"])
    assert list(info.acls) == ["api-key:model:grok-3", "api-key:model:grok-3-mini", "api-key:endpoint:*"]
    assert (info.disabled, info.api_key_blocked, info.team_blocked) == (False, False, False)
    assert info.team_id == f"account:{record['account_id']}"
    assert info.create_time.seconds == record["created_at"]
    secret_part = secret[len(record["prefix"]):]
    assert secret_part not in info.SerializeToString().decode("utf-8", "replace") and secret_part not in str(info)
    rest = gw.rest("GET", "/v1/api-key", secret).json()
    assert secret_part not in str(rest)
    assert (rest["name"], rest["redacted_api_key"], rest["acls"], rest["api_key_disabled"]) == (
        info.name, info.redacted_api_key, list(info.acls), False)
    assert gw.rest("GET", "/grok/api-key", secret).json() == rest


def test_api_key_info_flags_a_used_up_disabled_or_expired_token(gw: Gateway) -> None:
    secret, record = key(gw, "used up", credits=None)  # no credits: every request is refused `used_up`
    info = gw.client(secret).auth.get_api_key_info()
    assert info.team_blocked and not info.disabled and list(info.acls) == ["api-key:model:*", "api-key:endpoint:*"]
    r = gw.rest("PATCH", f"/admin/keys/{record['id']}", json={"disabled": True})
    assert r.status_code == 200, r.text
    assert gw.client(secret).auth.get_api_key_info().disabled  # answered, as xAI answers for a blocked key
    assert gw.rest("GET", "/v1/api-key", secret).json()["api_key_disabled"] is True
    # Everything else of a disabled token is refused.
    assert code_of(lambda: gw.client(secret).models.list_language_models()) == grpc.StatusCode.PERMISSION_DENIED
    expired, _ = key(gw, "expired", expires_at=1)
    assert gw.client(expired).auth.get_api_key_info().api_key_blocked
    assert code_of(lambda: gw.client(expired).models.list_language_models()) == grpc.StatusCode.UNAUTHENTICATED


def test_api_key_info_of_the_admin_token_names_no_part_of_it(gw: Gateway) -> None:
    info = gw.client().auth.get_api_key_info()
    assert info.name == "admin token" and TOKEN not in str(info) and TOKEN[:6] not in info.redacted_api_key
    assert list(info.acls) == ["api-key:model:*", "api-key:endpoint:*"]


# -- the REST twins -------------------------------------------------------------------------------------------


def test_rest_language_models_are_the_grpc_ones(gw: Gateway) -> None:
    grpc_models = {m.name: m for m in gw.client().models.list_language_models()}
    for prefix in ("/v1", "/grok"):
        listed = gw.rest("GET", f"{prefix}/language-models").json()["models"]
        assert [m["id"] for m in listed] == list(grpc_models)
        for card in listed:
            m = grpc_models[card["id"]]
            assert card["object"] == "model" and card["owned_by"] == "grokgate"
            assert (card["prompt_text_token_price"], card["cached_prompt_text_token_price"],
                    card["completion_text_token_price"], card["prompt_image_token_price"], card["search_price"],
                    card["max_prompt_length"], card["fingerprint"], card["created"]) == (
                m.prompt_text_token_price, m.cached_prompt_token_price, m.completion_text_token_price,
                m.prompt_image_token_price, m.search_price, m.max_prompt_length, m.system_fingerprint,
                m.created.seconds)
            assert gw.rest("GET", f"{prefix}/language-models/{card['id']}").json() == card
    err(gw.rest("GET", "/v1/language-models/no-such-model"), 404, "model_not_found")
    err(gw.rest("GET", "/grok/language-models", None), 400, "no_token")
    err(gw.rest("GET", "/v1/language-models", "not-a-token"), 401, "invalid_token")


def test_rest_tokenize_is_the_grpc_tokenize(gw: Gateway) -> None:
    for model in ("grok-3", "grok-3-mini"):
        expected = triples(gw.client().tokenize.tokenize_text(TEXT, model))
        for prefix in ("/v1", "/grok"):
            r = gw.rest("POST", f"{prefix}/tokenize-text", json={"text": TEXT, "model": model, "user": "u1"})
            assert r.status_code == 200, r.text
            got = [(t["token_id"], t["string_token"], bytes(t["token_bytes"])) for t in r.json()["token_ids"]]
            assert got == expected
            assert r.headers["x-grokgate-tokenizer"] == ("exact" if model == "grok-3" else "estimate")
    err(gw.rest("POST", "/v1/tokenize-text", json={"text": "hi", "model": "nope"}), 404, "model_not_found", "model")
    err(gw.rest("POST", "/v1/tokenize-text", json={"text": 5, "model": "grok-3"}), 400, "bad_request", "text")
    err(gw.rest("POST", "/v1/tokenize-text", json={"text": "hi"}), 400, "bad_request", "model")
    err(gw.rest("POST", "/v1/tokenize-text", json={"text": "hi", "model": "grok-3", "x": 1}), 400, "bad_request")
    err(gw.rest("POST", "/v1/tokenize-text", None, json={"text": "hi", "model": "grok-3"}), 400, "no_token")
    err(gw.rest("POST", "/v1/tokenize-text", json={"text": "x" * 131_073, "model": "grok-3"}), 400, "bad_request",
        "text")
    err(gw.rest("POST", "/v1/tokenize-text", json={"text": "x" * 1_700_000, "model": "grok-3"}), 413,
        "request_too_large")


# -- what is not served, and what is not a message ------------------------------------------------------------


def test_other_services_are_unimplemented_naming_these(gw: Gateway) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        image_pb2_grpc.ImageStub(gw.channel()).GenerateImage(image_pb2.GenerateImageRequest(),
                                                             metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    for service in ("xai_api.Models", "xai_api.Tokenize", "xai_api.Auth"):
        assert service in raised.value.details()


METHODS = ["/xai_api.Models/ListLanguageModels", "/xai_api.Models/GetLanguageModel",
           "/xai_api.Models/ListEmbeddingModels", "/xai_api.Models/GetEmbeddingModel",
           "/xai_api.Models/ListImageGenerationModels", "/xai_api.Models/GetImageGenerationModel",
           "/xai_api.Tokenize/TokenizeText", "/xai_api.Auth/get_api_key_info"]


@pytest.mark.parametrize("method", METHODS)
def test_a_malformed_message_is_invalid_argument(gw: Gateway, method: str) -> None:
    channel = gw.channel()
    raw = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with pytest.raises(grpc.RpcError) as raised:
        raw(b"\xff\xff\xff\xff", metadata=metadata, timeout=10)  # a varint that never ends
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value
    for junk in (b"\x0a\x05ab", b"\x0a\x02\xc3\x28", b"\x12\x02\xc3\x28"):  # a cut string, bad UTF-8
        try:
            raw(junk, metadata=metadata, timeout=10)
        except grpc.RpcError as exc:  # whatever the method makes of it: never the server's fault
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), exc
    # The server is still up.
    assert models_pb2_grpc.ModelsStub(channel).ListLanguageModels(empty_pb2.Empty(), metadata=metadata).models
    assert auth_pb2_grpc.AuthStub(channel).get_api_key_info(empty_pb2.Empty(), metadata=metadata).name


def test_rest_answers_match_the_openapi_document(gw: Gateway) -> None:
    doc = gw.rest("GET", "/openapi.json", None).json()
    secret, _ = key(gw, "documented")
    for method, template, path, body in (
            ("GET", "/v1/language-models", "/v1/language-models", None),
            ("GET", "/v1/language-models/{model}", "/v1/language-models/grok-4", None),
            ("POST", "/v1/tokenize-text", "/v1/tokenize-text", {"text": TEXT, "model": "grok-3"}),
            ("POST", "/v1/tokenize-text", "/v1/tokenize-text", {"text": TEXT, "model": "grok-3-mini"}),
            ("GET", "/v1/api-key", "/v1/api-key", None)):
        for token in (TOKEN, secret):
            check_answer(doc, method, template, gw.rest(method, path, token, json=body))
    unknown = gw.rest("POST", "/v1/tokenize-text", json={"text": "", "model": "x"})
    assert unknown.status_code == 404
    check_answer(doc, "POST", "/v1/tokenize-text", unknown)
