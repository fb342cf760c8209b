"""What one caller can make an upstream say never cools a key, nor opens a breaker, that every tenant shares.

grokgate in process (tests/inproc.py) in front of a fake vLLM (tests/fakes/fake_vllm.py: it quotes a bad field's
value in its 400) and the fake xAI (tests/fakes/fake_xai.py: its wrong key is a 400 too), each upstream with one
key, and two tenants with tokens of their own. A key is judged by status (401, 402, 403, 429) and, where the key
and the request share a status (xAI's 400 and 403), by what xAI's key endpoint says of the key alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grokgate.app import create_app
from grokgate.core.errors import GatewayError
from grokgate.providers.base import Call
from grokgate.providers.openai_compat import BackendConfig, OpenAICompatBackend
from grokgate.providers.router import Candidate, RoutedModel
from grokgate.providers.xai import XAIBackend
from grokgate.schemas.chat import ChatCompletionRequest
from tests.conftest import call, create_key, user
from tests.fakes.fake_vllm import FakeVLLM
from tests.fakes.fake_xai import FakeXAI
from tests.inproc import AppServer, app_settings, serve_app

VLLM_KEY = "vllm-key-for-tests-7Hq2"
XAI_KEY = "xai-key-for-tests-Lr8p"


@pytest.fixture(scope="module")
def vllm() -> Iterator[FakeVLLM]:
    with FakeVLLM(api_key=VLLM_KEY).start() as fake:
        yield fake


@pytest.fixture(scope="module")
def xai() -> Iterator[FakeXAI]:
    with FakeXAI(api_keys=[XAI_KEY]).start() as fake:
        yield fake


@pytest.fixture
def upstreams(vllm: FakeVLLM, xai: FakeXAI) -> tuple[FakeVLLM, FakeXAI]:
    vllm.requests.clear()
    vllm.stream_error_field = None
    xai.reset()
    return vllm, xai


@pytest.fixture
def gw(tmp_path: Path, vllm: FakeVLLM, xai: FakeXAI, monkeypatch: pytest.MonkeyPatch) -> Iterator[AppServer]:
    """A gateway of its own per test (so no key or breaker state carries over), with the test's cool-down long
    enough that a cooled key would still be resting when the next tenant asks."""
    monkeypatch.setenv("VLLM_KEY", VLLM_KEY)
    monkeypatch.setenv("XAI_KEY", XAI_KEY)
    config = tmp_path / "grokgate.yaml"
    config.write_text(f"""
backends:
  vllm: {{kind: openai, base_url: {vllm.url}, api_key_env: VLLM_KEY, cooldown: 60, failure_threshold: 3}}
  xai: {{kind: xai, base_url: {xai.url}, api_key_env: XAI_KEY, cooldown: 60, failure_threshold: 3}}
models:
  grok-3: [{{backend: vllm, model: served-model}}]
  grok-4: [{{backend: xai}}]
""")
    with serve_app(create_app(app_settings(tmp_path, config=config))) as srv:
        yield srv


def tenants(gw: AppServer) -> tuple[str, str]:
    return create_key(gw, "attacker", "100")[0], create_key(gw, "bystander", "100")[0]


def posts(fake: FakeVLLM | FakeXAI) -> list[dict[str, Any]]:
    return [r for r in fake.requests if r["method"] == "POST"]


def test_a_value_echoed_as_invalid_api_key_is_the_callers_400_and_cools_no_key(
        gw: AppServer, upstreams: tuple[FakeVLLM, FakeXAI]) -> None:
    vllm, _ = upstreams
    attacker, bystander = tenants(gw)
    refused = [gw.chat({"model": "grok-3", "messages": user("hi"), "top_k": "invalid api key"}, token=attacker)
               for _ in range(3)]
    r = gw.chat({"model": "grok-3", "messages": user("hi")}, token=bystander)
    assert ([a.status_code for a in refused], r.status_code) == ([400] * 3, 200), (refused[-1].text, r.text)
    assert r.json()["choices"][0]["message"]["content"] == "Hello from fake vLLM"
    error = refused[0].json()["error"]
    assert error["code"] == "bad_request" and "input_value='invalid api key'" in error["message"]  # kept
    assert [p["headers"]["authorization"] for p in posts(vllm)] == [f"Bearer {VLLM_KEY}"] * 4  # the same key


def test_xai_400_quoting_api_key_is_the_callers_when_xai_vouches_for_the_key(
        gw: AppServer, upstreams: tuple[FakeVLLM, FakeXAI]) -> None:
    """xAI's own 400 (an `include` value it does not know, quoted in its message) is told from its wrong-key 400
    by asking xAI about the key alone; the answer holds for a while, so a flood of 400s asks once."""
    _, xai = upstreams
    attacker, bystander = tenants(gw)
    refused = [call(gw, "POST", "/grok/responses", attacker,
                    json={"model": "grok-4", "input": "hi", "include": ["invalid api key"]}) for _ in range(3)]
    r = gw.chat({"model": "grok-4", "messages": user("hi")}, token=bystander)
    assert ([a.status_code for a in refused], r.status_code) == ([400] * 3, 200), (refused[-1].text, r.text)
    assert "unsupported include value 'invalid api key'" in refused[0].json()["error"]["message"]
    assert posts(xai)[-1]["headers"]["authorization"] == f"Bearer {XAI_KEY}"
    checks = [r for r in xai.requests if r["path"] == "/v1/api-key"]
    assert len(checks) == 1 and checks[0]["headers"]["authorization"] == f"Bearer {XAI_KEY}"


def test_errors_inside_the_stream_that_blame_the_request_open_no_breaker(
        gw: AppServer, upstreams: tuple[FakeVLLM, FakeXAI]) -> None:
    """vLLM reports an error met while streaming inside the 200 stream, with the status it means (400). Before the
    first byte that is the caller's 400; three of them in a row do not open the backend's breaker."""
    vllm, _ = upstreams
    vllm.stream_error_field = "guided_grammar"
    attacker, bystander = tenants(gw)
    refused = [gw.chat({"model": "grok-3", "messages": user("hi"), "stream": True, "guided_grammar": "root ::= x"},
                       token=attacker) for _ in range(4)]
    r = gw.chat({"model": "grok-3", "messages": user("hi")}, token=bystander)
    assert ([a.status_code for a in refused], r.status_code) == ([400] * 4, 200), (refused[-1].text, r.text)
    assert "Invalid guided_grammar: 'root ::= x'" in refused[0].json()["error"]["message"]


def test_a_key_xai_refuses_is_cooled_and_the_request_goes_to_the_next_key(
        gw: AppServer, upstreams: tuple[FakeVLLM, FakeXAI]) -> None:
    """The other side: a key that really is refused (xAI's wrong-key 400, and its key endpoint agrees) is still
    cooled, and the caller never sees a 400 for grokgate's misconfiguration."""
    _, xai = upstreams
    xai.fail_next("bad_key")
    _, bystander = tenants(gw)
    r = gw.chat({"model": "grok-4", "messages": user("hi")}, token=bystander)
    assert r.status_code == 502, r.text
    assert "credentials" in r.json()["error"]["message"]
    r = gw.chat({"model": "grok-4", "messages": user("hi")}, token=bystander)
    assert r.status_code == 503, "the one key rests: a refused key is not asked again at once"
    assert len(posts(xai)) == 1


# -- the backend alone, for the cases a gateway of one key cannot show ---------------------------------------------


def routed(fake: FakeXAI, keys: list[str]) -> RoutedModel:
    backend = XAIBackend(BackendConfig(name="xai", base_url=fake.url, api_keys=keys, cooldown=60))
    return RoutedModel("grok-3", [Candidate(backend, "grok-3")])


def ask(model: RoutedModel, times: int = 1) -> list[str | int]:
    """Each request's outcome: the authorization it was answered on, or its error's status."""
    async def go() -> list[str | int]:
        out: list[str | int] = []
        try:
            for _ in range(times):
                request = ChatCompletionRequest(model="grok-3", messages=user("hi"))
                generation = model.generate(Call(request, "key:test"), "grok-3")
                try:
                    [event async for event in generation]
                    out.append("ok")
                except GatewayError as exc:
                    out.append(exc.status)
                finally:
                    await generation.aclose()
        finally:
            for c in model.candidates:
                await c.backend.close()
        return out

    return asyncio.run(go())


def keys_used(fake: FakeXAI) -> list[str]:
    return [r["headers"]["authorization"].removeprefix("Bearer ") for r in fake.chat_requests]


def test_a_wrong_or_blocked_key_is_cooled_and_left_for_the_good_one(upstreams: tuple[FakeVLLM, FakeXAI]) -> None:
    _, xai = upstreams
    xai.api_keys.append("xai-blocked-key-0000")
    try:
        xai.blocked.add("xai-blocked-key-0000")
        model = routed(xai, ["xai-wrong-key-0000", "xai-blocked-key-0000", XAI_KEY])
        assert ask(model, 4) == ["ok"] * 4
        used = keys_used(xai)
        assert used.count("xai-wrong-key-0000") == 1 and used.count("xai-blocked-key-0000") == 1
        assert used[2:] == [XAI_KEY] * 4
        backend = model.candidates[0].backend
        assert isinstance(backend, XAIBackend)
        assert [k.breaker.state for k in backend.keys] == ["open", "open", "closed"]
    finally:
        xai.api_keys.remove("xai-blocked-key-0000")


def test_a_403_for_what_one_request_asked_cools_no_key(upstreams: tuple[FakeVLLM, FakeXAI]) -> None:
    """xAI's 403 on a key its key endpoint finds clean: this request may not do this with this key. The caller
    gets a 502 (the operator's key, not the caller's rights), and the key serves the next request."""
    _, xai = upstreams
    xai.fail_next("403")
    model = routed(xai, [XAI_KEY])
    assert ask(model, 2) == [502, "ok"]
    backend = model.candidates[0].backend
    assert isinstance(backend, XAIBackend) and backend.keys[0].breaker.state == "closed"


def test_a_key_vllm_refuses_with_401_is_cooled_without_asking(upstreams: tuple[FakeVLLM, FakeXAI]) -> None:
    """vLLM (like OpenAI) answers a wrong key with 401: the status alone cools it, and the next key serves."""
    vllm, _ = upstreams
    backend = OpenAICompatBackend(BackendConfig(name="vllm", base_url=vllm.url, api_keys=["wrong", VLLM_KEY],
                                                cooldown=60))
    model = RoutedModel("grok-3", [Candidate(backend, "served-model")])
    assert ask(model, 3) == ["ok"] * 3
    assert [p["headers"]["authorization"] for p in posts(vllm)] == ["Bearer wrong"] + [f"Bearer {VLLM_KEY}"] * 3
    assert [k.breaker.state for k in backend.keys] == ["open", "closed"]
    assert not [r for r in vllm.requests if r["method"] == "GET"], "no key check: 401 says it all"
