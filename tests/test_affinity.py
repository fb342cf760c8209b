"""Prompt-cache affinity (serving/affinity.py, providers/router.py, openai_compat.py, xai.py): one conversation keeps
one id, one backend and one key while they are healthy; a failure moves only the conversations of what failed;
weights and priorities still hold across conversations; the client's id reaches xAI as xAI reads it; and against
the fake xAI's per-server prompt caches (tests/fakes/fake_xai.py `cache_servers`) the cached share rises."""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from grokgate.core.errors import GatewayError
from grokgate.providers.base import Call, ModelTable, Provider, Route, create
from grokgate.providers.openai_compat import BackendConfig, OpenAICompatBackend
from grokgate.providers.router import Candidate, RoutedModel, rendezvous
from grokgate.providers.xai import XAIBackend, responses_payload
from grokgate.schemas.chat import ChatCompletionRequest, conversation_header
from grokgate.serving.affinity import assign, derived_key, header_safe, scoped
from tests.conftest import TOKEN
from tests.fakes.fake_xai import FakeXAI
from tests.inproc import AppServer, app_server

KEYS = ["xai-key-a", "xai-key-b", "xai-key-c"]
OTHER = "gg-second-static-token"
SYSTEM = ("You are a careful assistant for a travel agency. Answer briefly, cite the booking rules, never invent "
          "prices, and ask for the traveller's dates when they are missing. ") * 3


def chat(**fields: Any) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": "grok-3", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def conversation(n: int, turns: int = 1) -> list[dict[str, Any]]:
    # Each conversation opens with its own context, so only its own earlier turns are a prefix worth caching.
    messages: list[dict[str, Any]] = [{"role": "system", "content": f"Case file {n}. {SYSTEM}"},
                                      {"role": "user", "content": f"Conversation {n}: where should I go in May?"}]
    for t in range(1, turns):
        messages += [{"role": "assistant", "content": "Hello from fake xAI"},
                     {"role": "user", "content": f"And turn {t}?"}]
    return messages


def candidates(*specs: tuple[str, int, int]) -> list[Candidate]:
    backends: list[Provider] = [OpenAICompatBackend(BackendConfig(name=name, base_url="http://127.0.0.1:9/v1"))
                                for name, _, _ in specs]
    return [Candidate(b, "m", priority=p, weight=w) for b, (_, p, w) in zip(backends, specs, strict=True)]


# -- the hashing -------------------------------------------------------------------------------------------------


def test_rendezvous_is_stable_and_moves_only_the_failed_candidates_conversations() -> None:
    model = RoutedModel("m", candidates(("a", 0, 1), ("b", 0, 1), ("c", 0, 1)))
    keys = [f"conv-{i}" for i in range(600)]
    first = {k: model.ordered(model.candidates, k)[0].backend.name for k in keys}
    assert first == {k: model.ordered(model.candidates, k)[0].backend.name for k in keys}  # every turn the same
    assert all(120 < n < 280 for n in collections.Counter(first.values()).values())  # spread over all three
    # "b" fails: its conversations go to their next choice, nobody else moves.
    without_b = [c for c in model.candidates if c.backend.name != "b"]
    after = {k: model.ordered(without_b, k)[0].backend.name for k in keys}
    assert all(after[k] == first[k] for k in keys if first[k] != "b")
    assert {after[k] for k in keys if first[k] == "b"} == {"a", "c"}
    # Without a key: today's weighted shuffle, so both orders occur.
    assert len({tuple(c.backend.name for c in model.ordered(model.candidates)) for _ in range(200)}) > 1


def test_weights_and_priorities_hold_across_conversations() -> None:
    model = RoutedModel("m", candidates(("light", 0, 1), ("heavy", 0, 3), ("fallback", 1, 5)))
    firsts = collections.Counter(model.ordered(model.candidates, f"c{i}")[0].backend.name for i in range(4000))
    assert firsts["fallback"] == 0  # a lower priority is only ever a fallback
    assert 0.70 < firsts["heavy"] / 4000 < 0.80  # weight 3 of 4
    for i in range(50):
        assert model.ordered(model.candidates, f"c{i}")[-1].backend.name == "fallback"
    # The score itself: weight w wins a w/(sum of weights) share of keys.
    wins = sum(rendezvous(f"k{i}", "x", 2) > rendezvous(f"k{i}", "y", 1) for i in range(6000))
    assert math.isclose(wins / 6000, 2 / 3, abs_tol=0.03)


def test_a_key_failure_moves_only_its_conversations() -> None:
    backend = OpenAICompatBackend(BackendConfig(name="x", base_url="http://127.0.0.1:9/v1", api_keys=KEYS,
                                                failure_threshold=1))
    convs = [f"conv-{i}" for i in range(300)]
    first = {c: backend._pick_key(set(), route_key=c) for c in convs}
    assert first == {c: backend._pick_key(set(), route_key=c) for c in convs}
    assert set(first.values()) == {0, 1, 2}
    backend.keys[1].breaker.failure(60)  # key b rests
    after = {c: backend._pick_key(set(), route_key=c) for c in convs}
    assert all(after[c] == first[c] for c in convs if first[c] != 1)
    assert {after[c] for c in convs if first[c] == 1} == {0, 2}
    # A retry after a failure on its key goes to the conversation's next key, not to a rotation.
    for c in convs[:20]:
        ranked = sorted(range(3), key=lambda k: rendezvous(c, backend.keys[k].ident), reverse=True)
        assert backend._pick_key({ranked[0]}, route_key=c) == (ranked[1] if ranked[1] != 1 else ranked[2])
    # No conversation: keys rotate as before.
    assert len({backend._pick_key(set()) for _ in range(6)}) == 2


# -- the conversation id ---------------------------------------------------------------------------------------


def admitted(request: ChatCompletionRequest, tenant: str = "key:key-0", *, conversation: str | None = None,
             enabled: bool = True, shared: bool = False) -> Call:
    """The call as serving/lifecycle.py passes it on: with the keys `assign` gives it."""
    call = Call(request, tenant, conversation_id=conversation)
    return call.admitted(None, *assign(call, enabled, shared=shared))


def test_derived_keys_are_stable_per_conversation_and_differ_per_token() -> None:
    one, two = "token:1", "token:2"
    turn1 = ChatCompletionRequest.model_validate({"model": "grok-3", "messages": conversation(1)})
    turn4 = ChatCompletionRequest.model_validate({"model": "grok-3", "messages": conversation(1, turns=4)})
    other = ChatCompletionRequest.model_validate({"model": "grok-3", "messages": conversation(2)})
    key = derived_key(turn1.messages, one)
    assert key == derived_key(turn4.messages, one)  # the same on every turn
    assert key != derived_key(turn1.messages, two)  # each token its own
    assert key != derived_key(other.messages, one)  # each conversation its own
    assert key.startswith("gg-") and len(key) <= 64 and header_safe(key) == key
    assert "token" not in key


def test_the_clients_id_comes_first_body_over_header_within_its_tenant() -> None:
    call = admitted(chat())
    assert call.cache_key == call.route_key and call.cache_key is not None
    assert call.cache_key.startswith("gg-")  # derived
    call = admitted(chat(), conversation="conv_abc123")
    assert call.cache_key == call.route_key == scoped("conv_abc123", "key:key-0")
    assert call.cache_key != scoped("conv_abc123", "key:key-1")  # another tenant's same id is another key
    assert call.cache_key == admitted(chat(), conversation="conv_abc123").cache_key  # stable turn after turn
    call = admitted(chat(prompt_cache_key="session-7"), conversation="side-call-1")
    assert call.cache_key == scoped("session-7", "key:key-0")  # the body wins, as xAI's own CLI means it
    call = admitted(chat(prompt_cache_key="naïve\nkey"))
    assert call.cache_key is not None and call.cache_key.startswith("gg-") and call.cache_key.isascii()
    assert len(call.cache_key) <= 64
    # A single-tenant deployment's opt-out: the client's id as sent (hashed only when it is not a header value).
    assert admitted(chat(prompt_cache_key="session-7"), shared=True).cache_key == "session-7"
    shared = admitted(chat(prompt_cache_key="naïve\nkey"), shared=True).cache_key
    assert shared is not None and shared.startswith("gg-") and shared.isascii()
    # Affinity off: the client's id still reaches the upstream, nothing is derived, the router rotates.
    call = admitted(chat(prompt_cache_key="session-7"), enabled=False)
    assert (call.cache_key, call.route_key) == (scoped("session-7", "key:key-0"), None)
    call = admitted(chat(), enabled=False)
    assert (call.cache_key, call.route_key) == (None, None)


def test_bounds_on_the_id_name_their_param() -> None:
    with pytest.raises(GatewayError) as caught:
        conversation_header("x" * 257)
    assert (caught.value.status, caught.value.param) == (400, "x-grok-conv-id")
    with pytest.raises(GatewayError):
        conversation_header("  ")
    assert conversation_header(" conv-1 ") == "conv-1" and conversation_header(None) is None


def test_what_each_upstream_is_sent() -> None:
    call = admitted(chat(prompt_cache_key="client-key"))
    scoped_key = scoped("client-key", "key:key-0")
    xai = XAIBackend(BackendConfig(name="xai", base_url="http://127.0.0.1:9/v1"))
    body = xai.payload(call, "grok-3", False)
    assert "prompt_cache_key" not in body  # xAI's chat reads the header
    assert xai.request_headers(call) == {"x-grok-conv-id": scoped_key}
    assert responses_payload(call, {"input": []}, "grok-3", 10)["prompt_cache_key"] == scoped_key
    derived = admitted(chat())
    assert responses_payload(derived, {"input": []}, "grok-3", 10)["prompt_cache_key"] == derived.cache_key
    # The client's raw key in a native body never leaves as it is: the tenant's key replaces it.
    assert responses_payload(call, {"input": [], "prompt_cache_key": "client-key"}, "grok-3", 10)[
        "prompt_cache_key"] == scoped_key
    # OpenAI-compatible: the client's own field, namespaced; a derived one only where configured.
    plain = OpenAICompatBackend(BackendConfig(name="vllm", base_url="http://127.0.0.1:9/v1"))
    opted = OpenAICompatBackend(BackendConfig(name="openai", base_url="http://127.0.0.1:9/v1",
                                              prompt_cache_key=True))
    assert "prompt_cache_key" not in plain.payload(derived, "m", False) and plain.request_headers(derived) == {}
    assert opted.payload(derived, "m", False)["prompt_cache_key"] == derived.cache_key
    assert plain.payload(call, "m", False)["prompt_cache_key"] == scoped_key
    shared = admitted(chat(prompt_cache_key="client-key"), shared=True)
    assert plain.payload(shared, "m", False)["prompt_cache_key"] == "client-key"


# -- through the gateway, against the fake xAI's prompt caches -------------------------------------------------


def xai_table(*fakes: tuple[FakeXAI, int]) -> ModelTable:
    backends = [create("xai", name=f"xai{i}", base_url=fake.url, api_keys=list(fake.api_keys), cooldown=60,
                       failure_threshold=1) for i, (fake, _) in enumerate(fakes)]
    route = [Candidate(b, "grok-3", weight=w) for b, (_, w) in zip(backends, fakes, strict=True)]
    model = RoutedModel("grok-3", route)
    return ModelTable([Route("grok-3", model, "grok-3")], backends=backends)


@pytest.fixture()
def fake() -> Iterator[FakeXAI]:
    with FakeXAI(api_keys=KEYS, cache_servers=4).start() as server:
        yield server


def post(srv: AppServer, body: dict[str, Any], token: str = TOKEN, path: str = "/grok/chat/completions",
         **headers: str) -> dict[str, Any]:
    with srv.client() as c:
        r = c.post(path, json=body, headers={"Authorization": f"Bearer {token}", **headers})
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def run_conversations(srv: AppServer, n: int, turns: int) -> tuple[int, int]:
    """n conversations x turns through chat; (prompt tokens, cached tokens) in all."""
    prompt = cached = 0
    for t in range(turns):  # turn by turn across conversations, as concurrent agents interleave
        for c in range(n):
            usage = post(srv, {"model": "grok-3", "messages": conversation(c, t + 1), "max_tokens": 8})["usage"]
            prompt += usage["prompt_tokens"]
            cached += usage["prompt_tokens_details"]["cached_tokens"]
    return prompt, cached


def test_one_conversation_one_key_and_the_cache_is_read(tmp_path: Path, fake: FakeXAI) -> None:
    with app_server(tmp_path / "on", xai_table((fake, 1)), accounts=False) as srv:
        prompt_on, cached_on = run_conversations(srv, 6, 4)
        log = list(fake.cache_log)
        by_conv: dict[str | None, set[tuple[str, int]]] = collections.defaultdict(set)
        for key, conv, server, _ in log:
            by_conv[conv].add((key, server))
        assert len(by_conv) == 6 and None not in by_conv
        assert all(len(placed) == 1 for placed in by_conv.values())  # every turn: the same key and server
        assert len({next(iter(p))[0] for p in by_conv.values()}) > 1  # conversations spread over the keys
        assert all(cached > 0 for _, _, _, cached in log[6:])  # turns 2..4 all read the cache
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'grokgate_backend_prompt_tokens_total{backend="xai0",kind="cached",model="grok-3"}' in metrics
    fake.reset()
    with app_server(tmp_path / "off", xai_table((fake, 1)), accounts=False) as srv:
        srv.app.state.gateway.serving.affinity = False
        prompt_off, cached_off = run_conversations(srv, 6, 4)
        assert {conv for _, conv, _, _ in fake.cache_log} == {None}  # nothing derived, nothing sent
    assert cached_on / prompt_on > 0.5
    assert cached_off / prompt_off < cached_on / prompt_on / 2


def test_the_clients_id_reaches_xai_as_xai_reads_it(tmp_path: Path, fake: FakeXAI) -> None:
    with app_server(tmp_path, xai_table((fake, 1)), accounts=False, api_keys=[TOKEN, OTHER]) as srv:
        body = {"model": "grok-3", "messages": conversation(1), "max_tokens": 8}
        post(srv, body, **{"x-grok-conv-id": "conv_abc123"})
        sent = fake.chat_requests[-1]
        ours = sent["headers"]["x-grok-conv-id"]  # the client's id within its tenant, the same on every turn
        assert ours.startswith("gg-") and "prompt_cache_key" not in sent["body"]
        post(srv, body, **{"x-grok-conv-id": "conv_abc123"})
        assert fake.chat_requests[-1]["headers"]["x-grok-conv-id"] == ours
        post(srv, body, token=OTHER, **{"x-grok-conv-id": "conv_abc123"})  # another tenant, the same id
        assert fake.chat_requests[-1]["headers"]["x-grok-conv-id"] not in (ours, "conv_abc123")
        post(srv, {**body, "prompt_cache_key": "session-7"}, path="/v1/chat/completions")
        session = fake.chat_requests[-1]["headers"]["x-grok-conv-id"]
        assert session.startswith("gg-") and session != ours
        post(srv, body)
        derived = fake.chat_requests[-1]["headers"]["x-grok-conv-id"]
        assert derived.startswith("gg-")
        post(srv, body, token=OTHER)  # another token, the same messages: another conversation
        assert fake.chat_requests[-1]["headers"]["x-grok-conv-id"] not in (derived, None)
        with srv.client() as c:
            r = c.post("/grok/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {TOKEN}", "x-grok-conv-id": "x" * 300})
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-grok-conv-id"
        r = srv.chat({**body, "prompt_cache_key": 7})
        assert r.status_code == 400 and "prompt_cache_key" in r.text


def test_responses_carry_the_id_in_the_body_and_the_cache_is_read(tmp_path: Path, fake: FakeXAI) -> None:
    # Two keys, two tenants: a client's own id goes out within its tenant (with one, it would go as sent).
    with app_server(tmp_path, xai_table((fake, 1)), accounts=False, api_keys=[TOKEN, OTHER]) as srv:
        first = post(srv, {"model": "grok-3", "instructions": SYSTEM, "input": "Where should I go in May?",
                           "max_output_tokens": 8}, path="/v1/responses")
        derived = fake.responses_requests[-1]["body"]["prompt_cache_key"]
        assert derived.startswith("gg-") and "x-grok-conv-id" not in fake.responses_requests[-1]["headers"]
        # Instructions are not inherited along a chain: a client sends them on every turn (the Agents SDK does).
        second = post(srv, {"model": "grok-3", "instructions": SYSTEM, "input": "And in June?",
                            "previous_response_id": first["id"], "max_output_tokens": 8}, path="/v1/responses")
        assert fake.responses_requests[-1]["body"]["prompt_cache_key"] == derived  # the chain keeps its id
        assert first["usage"]["input_tokens_details"]["cached_tokens"] == 0
        assert second["usage"]["input_tokens_details"]["cached_tokens"] > first["usage"]["input_tokens"] // 2
        post(srv, {"model": "grok-3", "input": "hi", "prompt_cache_key": "own-key"}, path="/v1/responses")
        own = fake.responses_requests[-1]["body"]["prompt_cache_key"]
        assert own.startswith("gg-") and own not in (derived, "own-key")  # the client's key, within its tenant
        post(srv, {"model": "grok-3", "input": "hi"}, path="/grok/responses", **{"x-grok-conv-id": "own-key"})
        assert fake.responses_requests[-1]["body"]["prompt_cache_key"] == own  # the header, as a body field
        with srv.client() as c:
            r = c.post("/v1/responses", json={"model": "grok-3", "input": "hi", "prompt_cache_key": ""},
                       headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_cache_key"


def test_a_failed_backend_moves_only_its_conversations(tmp_path: Path, fake: FakeXAI) -> None:
    with FakeXAI(api_keys=KEYS, cache_servers=4).start() as other, \
            app_server(tmp_path, xai_table((fake, 1), (other, 1)), accounts=False) as srv:
        def placement() -> dict[int, str]:
            where = {}
            for c in range(16):
                before = len(fake.cache_log)  # only an answered request reaches a prompt cache
                post(srv, {"model": "grok-3", "messages": conversation(c), "max_tokens": 8})
                where[c] = "fake" if len(fake.cache_log) > before else "other"
            return where

        first = placement()
        assert first == placement()  # the same backend on every turn
        assert set(first.values()) == {"fake", "other"}
        other.header_defaults["x-fake-fault"] = "503"  # "other" fails: its breaker opens (threshold 1)
        after = placement()
        assert all(after[c] == "fake" for c in first)
    keys: dict[str | None, set[str]] = collections.defaultdict(set)
    for key, conv, _, _ in fake.cache_log:
        keys[conv].add(key)
    assert all(len(used) == 1 for used in keys.values())  # whoever moved in kept one key, and nobody else moved


def test_a_refused_key_moves_only_its_conversations(tmp_path: Path, fake: FakeXAI) -> None:
    with app_server(tmp_path, xai_table((fake, 1)), accounts=False) as srv:
        def keys() -> dict[str | None, str]:
            start = len(fake.cache_log)
            for c in range(12):
                post(srv, {"model": "grok-3", "messages": conversation(c), "max_tokens": 8})
            return {conv: key for key, conv, _, _ in fake.cache_log[start:]}

        first = keys()
        assert len(set(first.values())) == 3
        fake.api_keys.remove(KEYS[1])  # xAI now refuses key b: its breaker rests, its conversations move
        after = keys()
        assert all(after[c] == first[c] for c in first if first[c] != KEYS[1])
        assert all(after[c] != KEYS[1] for c in first)
