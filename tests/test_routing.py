"""grokgate in front of xAI (a fake that speaks xAI's wire format and quirks) and of another grokgate.

The gateways are served in this process (tests/inproc.py): routing, translation, retries and breakers are the
app's, whatever the serving process. The tests of the real entry point (`grokgate config check`) and of the real
model (grokgate in front of the shared server) are e2e.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from grokgate.app import create_app
from tests.conftest import E2E, Server, create_key, parse_sse, raw_request, read_until, user
from tests.fakes.fake_xai import FakeXAI
from tests.inproc import AppServer, app_settings, serve_app

KEYS = {"XAI_A": "key-a", "XAI_B": "key-b", "XAI_C": "key-c"}
COOLDOWN = 1.0  # the test config's cool-down; tests that cool keys or backends wait it out at the end
READ_TIMEOUT = 1.2  # the test config's longest silence from an upstream
KEEPALIVE = 0.1  # the gateway's SSE keep-alive interval


def recover() -> None:
    time.sleep(COOLDOWN + 0.2)


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeXAI, FakeXAI]]:
    with FakeXAI(api_keys=["key-a", "key-b"]).start() as primary, FakeXAI(api_keys=["key-c"]).start() as fallback:
        yield primary, fallback


def write_config(tmp: Path, primary: FakeXAI, fallback: FakeXAI, extra: str = "") -> Path:
    path = tmp / "grokgate.yaml"
    path.write_text(f"""
backends:
  primary:
    kind: xai
    base_url: {primary.url}
    api_key_env: [XAI_A, XAI_B]
    read_timeout: {READ_TIMEOUT}
    timeout: 20
    cooldown: {COOLDOWN}
    failure_threshold: 3
  fallback:
    kind: xai
    base_url: {fallback.url}
    api_key_env: XAI_C
    read_timeout: {READ_TIMEOUT}
    cooldown: {COOLDOWN}
  fanout:
    kind: openai
    base_url: {primary.url}
    api_key_env: XAI_A
    fanout_n: true
  nowhere:
    kind: openai
    base_url: http://127.0.0.1:9/v1
models:
  grok-3: [{{backend: primary}}, {{backend: fallback, priority: 1}}]
  grok-4: [{{backend: primary}}]
  grok-3-mini: [{{backend: primary}}]
  grok-4-1-fast: [{{backend: primary}}]
  fanned: [{{backend: fanout, model: grok-3}}]
  refused-then-fallback: [{{backend: nowhere}}, {{backend: fallback, model: grok-3, priority: 1}}]
  only-nowhere: [{{backend: nowhere}}]
{extra}""")
    return path


@pytest.fixture(scope="module")
def keys() -> Iterator[None]:
    """The upstream keys, in the environment the routing files name them from."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in KEYS.items():
            mp.setenv(name, value)
        yield


def serve(tmp: Path, **settings: Any) -> AbstractContextManager[AppServer]:
    """`create_app` as `grokgate serve` builds it (routing from `settings` and the environment), in process."""
    return serve_app(create_app(app_settings(tmp, **settings)))


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, fakes: tuple[FakeXAI, FakeXAI], keys: None) -> Iterator[AppServer]:
    tmp = tmp_path_factory.mktemp("routing")
    with serve(tmp, config=write_config(tmp, *fakes), keepalive_seconds=KEEPALIVE) as srv:
        yield srv


@pytest.fixture
def fake(fakes: tuple[FakeXAI, FakeXAI]) -> FakeXAI:
    for f in fakes:
        f.reset()
    return fakes[0]


def sent(fake: FakeXAI) -> dict[str, Any]:
    body: dict[str, Any] = fake.chat_requests[-1]["body"]
    return body


def stream_sse(srv: AppServer, body: dict[str, Any]) -> tuple[httpx.Response, Any]:
    with srv.client() as c, c.stream("POST", "/grok/chat/completions", json={**body, "stream": True},
                                     headers={"Authorization": f"Bearer {srv.token}"}) as r:
        raw = r.read().decode()
    return r, parse_sse(raw)


# -- translation (the strict fake refuses anything xAI would refuse, so a 200 proves the rule) -------------------

def test_request_translation_for_a_reasoning_model(gw: AppServer, fake: FakeXAI) -> None:
    r = gw.chat({"model": "grok-4", "messages": [{"role": "developer", "content": "Be brief."}, *user("Hi")],
                 "stop": "x", "presence_penalty": 1, "frequency_penalty": 1, "max_tokens": 50, "logit_bias": {"1": 1},
                 "service_tier": "auto", "store": True, "metadata": {"a": "b"}, "reasoning_effort": "high",
                 "logprobs": True, "top_logprobs": 20})
    assert r.status_code == 200, r.text
    body = sent(fake)
    assert body["model"] == "grok-4-0709"
    for dropped in ("stop", "presence_penalty", "frequency_penalty", "max_tokens", "logit_bias", "service_tier",
                    "store", "metadata", "reasoning_effort"):
        assert dropped not in body, dropped
    assert body["max_completion_tokens"] == 50
    assert body["messages"][0]["role"] == "system"
    assert body["top_logprobs"] == 8
    assert fake.chat_requests[-1]["headers"]["authorization"] in ("Bearer key-a", "Bearer key-b")
    assert r.json()["model"] == "grok-4", "the requested name is echoed, not xAI's id"


def test_request_translation_for_grok_3_and_mini(gw: AppServer, fake: FakeXAI) -> None:
    r = gw.chat({"model": "grok-3", "messages": user("Hi"), "stop": "x", "presence_penalty": 1,
                 "frequency_penalty": 0.5})
    assert r.status_code == 200, r.text
    body = sent(fake)
    assert body["stop"] == ["x"]
    assert "presence_penalty" not in body and body["frequency_penalty"] == 0.5
    for effort, expected in (("minimal", "low"), ("low", "low"), ("medium", "high"), ("high", "high")):
        assert gw.chat({"model": "grok-3-mini", "messages": user("Hi"), "reasoning_effort": effort}).status_code == 200
        assert sent(fake)["reasoning_effort"] == expected


def test_stream_always_asks_upstream_for_usage(gw: AppServer, fake: FakeXAI) -> None:
    _, sse = stream_sse(gw, {"model": "grok-3", "messages": user("Hi")})
    assert sent(fake)["stream_options"] == {"include_usage": True}
    assert all(c["choices"] for c in sse.chunks), "the client did not ask for the usage chunk"
    assert sse.events[-1] == "[DONE]"


# -- replies ------------------------------------------------------------------------------------------------------

def test_reasoning_usage_is_normalised_and_reasoning_passes_through(gw: AppServer, fake: FakeXAI) -> None:
    result = gw.chat({"model": "grok-3-mini", "messages": user("one two three")}).json()
    usage = result["usage"]
    # Fake: prompt = 10 + 3 words, content 4 words, reasoning 7; xAI reports completion 4 and total 24.
    assert usage["prompt_tokens"] == 13
    assert usage["completion_tokens"] == 4 + 7, "completion includes reasoning (OpenAI semantics)"
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 7
    assert usage["total_tokens"] == 24
    assert result["choices"][0]["message"]["reasoning_content"]


def test_stream_usage_repeated_in_chunks_is_kept_not_summed(gw: AppServer, fake: FakeXAI) -> None:
    fake.header_defaults["x-fake-usage-every-chunk"] = "1"
    _, sse = stream_sse(gw, {"model": "grok-4", "messages": user("a b"), "stream_options": {"include_usage": True}})
    usage = next(c for c in sse.chunks if c["choices"] == [])["usage"]
    assert usage == {"prompt_tokens": 12, "completion_tokens": 4 + 7, "total_tokens": 23,
                     "prompt_tokens_details": {"cached_tokens": 0},
                     "completion_tokens_details": {"reasoning_tokens": 7}}
    empty_deltas = [c for c in sse.chunks for ch in c["choices"] if ch["delta"] == {}]
    assert len(empty_deltas) == 1, "xAI's empty reasoning deltas are not forwarded; only the finish chunk is empty"


def test_end_turn_becomes_stop_and_citations_pass_through(gw: AppServer, fake: FakeXAI) -> None:
    fake.header_defaults["x-fake-finish-reason"] = "end_turn"
    result = gw.chat({"model": "grok-3", "messages": user("Hi"), "search_parameters": {"mode": "on"}}).json()
    assert result["choices"][0]["finish_reason"] == "stop"
    assert result["citations"]
    _, sse = stream_sse(gw, {"model": "grok-3", "messages": user("Hi"), "search_parameters": {"mode": "on"}})
    finishes = [ch["finish_reason"] for c in sse.chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == ["stop"]
    assert any(c.get("citations") for c in sse.chunks)


def test_openai_sdk_streams_tool_calls_through_grokgate(gw: AppServer, fake: FakeXAI) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/grok", api_key=gw.token, max_retries=0)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    with client.chat.completions.stream(model="grok-4", messages=user("Weather in Paris?"), tools=tools) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id and call.type == "function"
    assert final.choices[0].finish_reason == "tool_calls"
    assert any(e.type == "tool_calls.function.arguments.done" for e in events)
    plain = client.chat.completions.create(model="grok-4", messages=user("Weather?"), tools=tools)
    assert plain.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_fanout_n_merges_single_requests(gw: AppServer, fake: FakeXAI) -> None:
    result = gw.chat({"model": "fanned", "messages": user("Hi"), "n": 3, "seed": 5}).json()
    assert [c["index"] for c in result["choices"]] == [0, 1, 2]
    bodies = [r["body"] for r in fake.chat_requests]
    assert len(bodies) == 3 and all(b["n"] == 1 for b in bodies)
    assert sorted(b["seed"] for b in bodies) == [5, 6, 7]
    assert result["usage"]["prompt_tokens"] == 3 * 11, "each upstream request billed its prompt"


# -- errors and faults ----------------------------------------------------------------------------------------------

def test_upstream_refusing_our_key_is_a_502_not_a_401(gw: AppServer, fakes: tuple[FakeXAI, FakeXAI]) -> None:
    primary, fallback = fakes
    for f in fakes:
        f.reset()
    primary.fail_next("bad_key", "bad_key")
    fallback.fail_next("bad_key")
    r = gw.chat({"model": "grok-3", "messages": user("Hi")})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "api_error"
    assert "credentials" in r.json()["error"]["message"]
    assert len(primary.chat_requests) == 2 and len(fallback.chat_requests) == 1, "both keys, then the fallback"
    recover()


@pytest.mark.parametrize("fault", ["500", "503", "reset", {"fault": "stall", "seconds": 3}])
def test_transient_failures_are_retried_before_the_first_byte(gw: AppServer, fake: FakeXAI,
                                                              fault: str | dict[str, Any]) -> None:
    fake.fail_next(fault)
    r = gw.chat({"model": "grok-4", "messages": user("Hi")})
    assert r.status_code == 200, r.text
    assert len(fake.chat_requests) == 2


def test_429_tries_the_other_key_then_honours_retry_after(gw: AppServer, fake: FakeXAI) -> None:
    # The upstream asks for 1.2 s: a key rests that long, and the client is told 2 (whole seconds, rounded up;
    # not the 1 said when the upstream names no wait, nor the backend's own cool-down).
    fake.fail_next({"fault": "429", "retry_after": 1.2})
    assert gw.chat({"model": "grok-4", "messages": user("Hi")}).status_code == 200
    keys = [r["headers"]["authorization"] for r in fake.chat_requests]
    assert len(keys) == 2 and keys[0] != keys[1]
    fake.reset()
    time.sleep(1.3)  # the first key's cool-down (its retry-after) has passed
    fake.fail_next({"fault": "429", "retry_after": 1.2}, {"fault": "429", "retry_after": 1.2})
    r = gw.chat({"model": "grok-4", "messages": user("Hi")})
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "too_many_requests"
    assert int(r.headers["retry-after"]) == 2
    assert len(fake.chat_requests) == 2, "both keys were asked"
    time.sleep(1.3)


def test_connection_refused_falls_back(gw: AppServer, fakes: tuple[FakeXAI, FakeXAI]) -> None:
    for f in fakes:
        f.reset()
    r = gw.chat({"model": "refused-then-fallback", "messages": user("Hi")})
    assert r.status_code == 200, r.text
    assert len(fakes[1].chat_requests) == 1
    r = gw.chat({"model": "only-nowhere", "messages": user("Hi")})
    assert r.status_code in (502, 503)
    assert r.json()["error"]["code"] in ("api_error", "upstream_unavailable")


def test_reset_mid_stream_is_an_error_event_and_not_retried(gw: AppServer, fake: FakeXAI) -> None:
    fake.fail_next({"fault": "reset_mid_stream", "after": 2})
    r, sse = stream_sse(gw, {"model": "grok-3", "messages": user("Hi")})
    assert r.status_code == 200
    assert "error" in sse.chunks[-1] and "[DONE]" not in sse.events
    assert sse.chunks[-1]["error"]["code"] == "api_error"
    assert len(fake.chat_requests) == 1


def test_silence_mid_stream_sends_keepalives_then_times_out(gw: AppServer, fake: FakeXAI) -> None:
    # A silence of 0.4 s: several keep-alive intervals, under the read timeout.
    fake.fail_next({"fault": "stall_mid_stream", "after": 2, "seconds": 0.4})
    _, sse = stream_sse(gw, {"model": "grok-3", "messages": user("Hi")})
    assert ": keep-alive" in sse.comments and sse.events[-1] == "[DONE]"
    fake.reset()
    fake.fail_next({"fault": "stall_mid_stream", "after": 2, "seconds": 5})
    _, sse = stream_sse(gw, {"model": "grok-3", "messages": user("Hi")})
    assert sse.chunks[-1]["error"]["code"] == "timeout"


def test_breaker_skips_a_failing_backend_then_probes_it(gw: AppServer, fakes: tuple[FakeXAI, FakeXAI]) -> None:
    primary = fakes[0]
    for f in fakes:
        f.reset()
    primary.fail_next(*["500"] * 6)
    for _ in range(3):
        assert gw.chat({"model": "grok-3", "messages": user("Hi")}).status_code == 200
    tried = len(primary.chat_requests)
    assert tried >= 3
    assert gw.chat({"model": "grok-3", "messages": user("Hi")}).status_code == 200
    assert len(primary.chat_requests) == tried, "the open breaker sends traffic straight to the fallback"
    recover()
    primary.reset()
    assert gw.chat({"model": "grok-3", "messages": user("Hi")}).status_code == 200
    assert len(primary.chat_requests) == 1, "after the cool-down one probe goes to the primary, and succeeds"


# -- metering of upstream traffic ----------------------------------------------------------------------------------

def test_upstream_usage_is_billed_once_per_token_class(gw: AppServer, fake: FakeXAI) -> None:
    token, key = create_key(gw, "upstream-payer", credits="10")
    fake.header_defaults["x-fake-cached-tokens"] = "5"
    r = gw.chat({"model": "grok-3-mini", "messages": user("one two three four five")}, token=token)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 5
    with gw.client() as c:
        prices = c.get("/admin/prices", headers={"Authorization": f"Bearer {gw.token}"}).json()["current"]
        price = next(p for p in prices if p["model"] == "grok-3-mini")
        after = c.get(f"/admin/keys/{key['id']}", headers={"Authorization": f"Bearer {gw.token}"}).json()

    def ceil(tokens: int, rate: int) -> int:
        return -(-tokens * rate // 1_000_000)

    expected = (ceil(usage["prompt_tokens"] - 5, price["input"]) + ceil(5, price["cached_input"])
                + ceil(usage["completion_tokens"], price["output"]))
    assert 10_000_000 - after["balance"] == expected
    assert after["reserved"] == 0


def test_failed_upstream_requests_are_not_billed(gw: AppServer, fakes: tuple[FakeXAI, FakeXAI]) -> None:
    token, key = create_key(gw, "unlucky", credits="1")
    for f in fakes:
        f.reset()
    fakes[0].fail_next("500", "500")
    fakes[1].fail_next("500")
    assert gw.chat({"model": "grok-3", "messages": user("Hi")}, token=token).status_code == 502
    with gw.client() as c:
        after = c.get(f"/admin/keys/{key['id']}", headers={"Authorization": f"Bearer {gw.token}"}).json()
    assert (after["balance"], after["reserved"]) == (1_000_000, 0)
    recover()


# -- grokgate in front of grokgate -----------------------------------------------------------------------------------

@E2E
def test_grokgate_in_front_of_grokgate(tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The front gateway in process, the inner one the shared server (the real model)."""
    config = tmp_path / "chain.yaml"
    config.write_text(f"""
backends:
  inner:
    kind: openai
    base_url: {server.url}/v1
    api_key_env: INNER_TOKEN
models:
  grok-3: [{{backend: inner}}]
""")
    monkeypatch.setenv("INNER_TOKEN", server.token)
    with serve(tmp_path, config=config) as front:
        client = openai.OpenAI(base_url=f"{front.url}/grok", api_key=front.token, max_retries=0)
        completion = client.chat.completions.create(model="grok-3", messages=user("Say hi."), max_tokens=4)
        assert completion.choices[0].message.content
        assert completion.usage is not None and completion.usage.completion_tokens >= 1
        assert completion.system_fingerprint == "fp_openai_inner"
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="grok-3", messages=user("Say hi."), max_tokens=4, stream=True) if c.choices)
        assert text
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="grok-3", messages=user("hello " * 3000), max_tokens=4)


# -- more of item 5, the overhead header, the default routing, config check ------------------------------------------

def test_every_route_timing_out_is_504(gw: AppServer, fake: FakeXAI) -> None:
    recover()  # earlier tests may have left a key resting
    fake.fail_next({"fault": "stall", "seconds": 4}, {"fault": "stall", "seconds": 4})
    r = gw.chat({"model": "grok-4", "messages": user("Hi")})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "timeout"
    # The second key is tried unless the backend's breaker opened (timeouts count against the backend).
    assert 1 <= len(fake.chat_requests) <= 2
    recover()


def test_unknown_upstream_model_is_our_misconfiguration(tmp_path_factory: pytest.TempPathFactory,
                                                        fakes: tuple[FakeXAI, FakeXAI], keys: None) -> None:
    tmp = tmp_path_factory.mktemp("badmodel")
    config = tmp / "grokgate.yaml"
    config.write_text(f"""
backends:
  up: {{kind: xai, base_url: {fakes[1].url}, api_key_env: XAI_C}}
models:
  grok-3: [{{backend: up, model: grok-99-nonexistent}}]
""")
    with serve(tmp, config=config) as srv:
        r = srv.chat({"model": "grok-3", "messages": user("Hi")})
        assert r.status_code == 502 and r.json()["error"]["code"] == "api_error"
        assert "does not know the model" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_overhead_header_leaves_out_the_wait_on_the_backend(gw: AppServer, fake: FakeXAI, stream: bool) -> None:
    """The upstream stalls 0.4 s before it answers (under the 1.2 s read timeout): that wait is the backend's,
    so grokgate's overhead is at most what the client waited minus the stall."""
    fake.fail_next({"fault": "stall", "seconds": 0.4})
    started = time.perf_counter()
    if stream:
        r, sse = stream_sse(gw, {"model": "grok-3", "messages": user("Hi")})
        assert sse.events[-1] == "[DONE]"
    else:
        r = gw.chat({"model": "grok-3", "messages": user("Hi")})
    waited_ms = (time.perf_counter() - started) * 1000
    assert r.status_code == 200 and len(fake.chat_requests) == 1, r.text
    overhead_ms = float(r.headers["x-grokgate-overhead-ms"])
    assert 0 < overhead_ms <= waited_ms - 400, (overhead_ms, waited_ms)


def test_xai_key_without_a_routing_file_sends_the_seed_models_to_xai(
        tmp_path_factory: pytest.TempPathFactory, fakes: tuple[FakeXAI, FakeXAI],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The key and the base URL from the environment, as `grokgate serve` reads them (Settings)."""
    tmp = tmp_path_factory.mktemp("xai-default")
    fallback = fakes[1]
    fallback.reset()
    monkeypatch.setenv("XAI_API_KEY", "key-c")
    monkeypatch.setenv("GROKGATE_XAI_BASE_URL", fallback.url)
    with serve(tmp) as srv:
        for public, upstream in (("grok-4", "grok-4-0709"), ("grok-2-vision", "grok-2-vision-1212")):
            r = srv.chat({"model": public, "messages": user("Hi")})
            assert r.status_code == 200, r.text
            assert fallback.chat_requests[-1]["body"]["model"] == upstream
        with srv.client() as c:
            models = c.get("/v1/models", headers={"Authorization": f"Bearer {srv.token}"}).json()["data"]
        assert len(models) == 6
        with srv.client() as c:
            assert "slots" not in json.dumps(c.get("/readyz").json()), "no local engine is loaded"


def test_client_hanging_up_mid_stream_is_billed_an_estimate(gw: AppServer, fake: FakeXAI) -> None:
    token, key = create_key(gw, "hangs-up", credits="1")
    fake.header_defaults["x-fake-chunk-delay-ms"] = "300"
    with raw_request(gw, {"model": "grok-3", "messages": user("one two three"), "stream": True}, token) as sock:
        read_until(sock, b'"content":"', 3)
    deadline = time.monotonic() + 10
    rows: list[dict[str, Any]] = []
    with gw.client() as c:
        while not rows and time.monotonic() < deadline:
            rows = [r for r in c.get(f"/admin/ledger?token={key['id']}",
                                     headers={"Authorization": f"Bearer {gw.token}"}).json()["data"]
                    if r["kind"] == "usage"]
            time.sleep(0.1)
        after = c.get(f"/admin/keys/{key['id']}", headers={"Authorization": f"Bearer {gw.token}"}).json()
    assert rows and rows[0]["status"] == "client_disconnected" and rows[0]["estimated"] is True
    assert rows[0]["completion_tokens"] >= 2 and rows[0]["prompt_tokens"] > 0 and rows[0]["cost"] > 0
    assert after["reserved"] == 0 and after["balance"] == 1_000_000 - rows[0]["cost"]


@E2E
def test_config_check(tmp_path: Path, fakes: tuple[FakeXAI, FakeXAI]) -> None:
    import subprocess
    import sys

    good = write_config(tmp_path, *fakes)
    ok = subprocess.run([sys.executable, "-m", "grokgate", "config", "check", "--config", str(good)],
                        capture_output=True, text=True, env={**__import__("os").environ, **KEYS})
    assert ok.returncode == 0, ok.stderr
    assert "model grok-3: primary:grok-3 (priority 0) -> fallback:grok-3 (priority 1)" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends:\n  x: {kind: xai, api_key_env: MISSING_VAR}\nmodels:\n  a: [{backend: y}]\n")
    failed = subprocess.run([sys.executable, "-m", "grokgate", "config", "check", "--config", str(bad)],
                            capture_output=True, text=True)
    assert failed.returncode == 1
    assert "unknown backend 'y'" in failed.stderr
