"""Record and replay (providers/recording.py, core/cassette.py, docs/replay.md).

In-process tier: a scripted provider recorded at the provider seam, then replayed by an app that has no backend
at all; the cassette format, matching, misses, recorded failures, timing, `--record-missing`, the CLI.
End-to-end tier (`@pytest.mark.e2e`): real `grokgate serve` processes recording through the fake xAI upstream
and the local model, restarted with `--replay` and nothing to call; ledger rows; an openai-SDK test suite
recorded once and replayed offline.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from grokgate.cli import main as cli_main
from grokgate.core import cassette
from grokgate.core.errors import GatewayError
from grokgate.core.events import Delta, Event, Finish, Usage, UsageReport
from grokgate.providers.base import Call
from grokgate.schemas.chat import ChatCompletionRequest
from tests.conftest import (
    E2E,
    TOKEN,
    Server,
    create_key,
    err,
    ok,
    parse_sse,
    start_server,
    start_servers,
    stop_server,
    user,
)
from tests.fakes.fake_xai import FakeXAI
from tests.inproc import ScriptedProvider, app_server, scripted_models


def post(srv: Any, body: dict[str, Any], cassette_header: str | None = None, *, token: str = TOKEN,
         path: str = "/grok/chat/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if cassette_header is not None:
        headers["x-grokgate-cassette"] = cassette_header
    with srv.client() as c:
        return c.post(path, json=body, headers=headers)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def strip(completion: dict[str, Any]) -> dict[str, Any]:
    """A completion without what differs per response (id, created, fingerprint)."""
    return {k: v for k, v in completion.items() if k not in ("id", "created", "system_fingerprint")}


def streamed_text(r: httpx.Response) -> tuple[str, list[str | None], dict[str, Any] | None]:
    chunks = parse_sse(r.text).chunks
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finishes = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]
                and c["choices"][0].get("finish_reason")]
    usage = next((c["usage"] for c in chunks if c.get("usage")), None)
    return text, finishes, usage


# -- the pure part -----------------------------------------------------------------------------------------------


def test_canonical_request_ignores_delivery_not_what_is_forwarded() -> None:
    base = {"model": "grok-3", "messages": user("Hi"), "max_tokens": 5, "temperature": 0.0}
    a = ChatCompletionRequest.model_validate(base)
    b = ChatCompletionRequest.model_validate({**base, "stream": True, "stream_options": {"include_usage": True},
                                              "prompt_cache_key": "c"})
    c = ChatCompletionRequest.model_validate({**{k: v for k, v in base.items() if k != "max_tokens"},
                                              "max_completion_tokens": 5})
    from grokgate.providers.recording import canonical_of

    assert canonical_of(a) == canonical_of(b) == canonical_of(c)
    assert cassette.request_key(canonical_of(a)) == cassette.request_key(canonical_of(b))
    # Every other field is forwarded, so it is part of the question: known or not (vLLM honours guided_choice).
    for changed in ({"temperature": 0.5}, {"user": "u1"}, {"metadata": {"k": "v"}}, {"guided_choice": ["x"]}):
        other = ChatCompletionRequest.model_validate({**base, **changed})
        assert cassette.request_key(canonical_of(other)) != cassette.request_key(canonical_of(a)), changed


def test_the_callers_cap_is_matched_not_the_reserved_one() -> None:
    from grokgate.providers.recording import canonical_of

    request = ChatCompletionRequest.model_validate({"model": "grok-3", "messages": user("Hi")})
    held = Call(request, "key:k").admitted(4096, None, None)  # what serving/lifecycle.py does at admission
    assert held.output_limit == 4096 and request.max_tokens is None  # the request itself is never rewritten
    assert "max_tokens" not in canonical_of(held.request)


def test_responses_request_is_matched_on_its_native_body() -> None:
    native = {"model": "grok-3", "input": [{"role": "user", "content": "Hi"}], "store": False, "stream": True,
              "metadata": {"a": "b"}, "user": "x", "max_output_tokens": 9, "prompt_cache_key": "c"}
    assert cassette.canonical({}, None, native) == {"responses": {
        "model": "grok-3", "input": [{"role": "user", "content": "Hi"}], "metadata": {"a": "b"}, "user": "x",
        "max_output_tokens": 9}}


def test_events_round_trip_as_plain_json() -> None:
    from grokgate.core.events import Extra, Item

    events: list[Event] = [Delta(0, content="Hi", reasoning_content="r", tool_calls=[{"id": "c", "index": 0}]),
                           Finish(0, "tool_calls"), Extra({"citations": ["u"]}), Item(0, {"type": "reasoning"}),
                           UsageReport(Usage(3, 4, cached_tokens=1, reasoning_tokens=2, server_tool_calls=1,
                                             estimated=True))]
    for event in events:
        encoded = cassette.encode_event(event, 12.345)
        assert json.loads(json.dumps(encoded)) == encoded
        t, decoded = cassette.decode_event(encoded)
        assert t == 12.3 and decoded == event


def test_recorded_error_keeps_only_status_code_message_and_retry_after() -> None:
    error = GatewayError(429, "too_many_requests", "slow down", headers={"retry-after": "2", "x-key": "secret"})
    encoded = cassette.encode_error(error)
    assert "secret" not in json.dumps(encoded)
    decoded = cassette.decode_error(encoded)
    assert (decoded.status, decoded.code, decoded.message, decoded.headers) == (
        429, "too_many_requests", "slow down", {"retry-after": "2"})


def test_miss_names_the_nearest_difference() -> None:
    recorded = [{"model": "grok-3", "messages": [{"role": "user", "content": "Hello there"}]},
                {"model": "grok-4", "messages": [{"role": "user", "content": "Other"}], "n": 2}]
    error = cassette.miss("c1", recorded, {"model": "grok-3", "messages": [{"role": "user", "content": "Hello"}]})
    assert error.status == 404 and error.code == "replay_miss" and error.param == "messages"
    assert "'c1'" in error.message and 'messages[0].content: recorded "Hello there", requested "Hello"' in error.message
    assert "no recordings" in cassette.miss("empty", [], recorded[0]).message


@pytest.mark.parametrize("value", ["", "a/b", "../x", "x" * 101, "sp ace", "é"])
def test_cassette_names_are_checked(value: str) -> None:
    with pytest.raises(GatewayError) as caught:
        cassette.cassette_name(value)
    assert caught.value.status == 400 and caught.value.param == "x-grokgate-cassette"


# -- in process: record, replay ----------------------------------------------------------------------------------


def chat_body(text: str = "Say hi", **extra: Any) -> dict[str, Any]:
    return {"model": "grok-3", "messages": user(text), **extra}


@pytest.fixture
def recorded(tmp_path: Path) -> Iterator[tuple[Path, ScriptedProvider, list[dict[str, Any]]]]:
    """A cassette directory with a plain answer (recorded streamed), a two-choice answer and a named cassette."""
    directory = tmp_path / "cassettes"
    provider = ScriptedProvider("scripted", text="one two three four")
    answers: list[dict[str, Any]] = []
    with app_server(tmp_path / "rec", scripted_models(provider), record_dir=directory, accounts=False) as srv:
        r = srv.chat(chat_body(stream=True, stream_options={"include_usage": True}))
        assert r.status_code == 200
        answers.append(ok(srv.chat(chat_body("Two", n=2, max_tokens=3))))
        answers.append(ok(post(srv, chat_body("Named"), "suite-a")))
    yield directory, provider, answers


def test_record_writes_one_line_per_exchange_in_the_named_cassette(
        recorded: tuple[Path, ScriptedProvider, list[dict[str, Any]]]) -> None:
    directory, _, _ = recorded
    default = lines(directory / "default.jsonl")
    assert len(default) == 2 and len(lines(directory / "suite-a.jsonl")) == 1
    first = default[0]
    assert first["request"] == {"model": "grok-3", "messages": [{"role": "user", "content": "Say hi"}],
                                "logprobs": False}
    assert first["backend"] == "scripted" and first["error"] is None
    assert [e["t"] for e in first["events"]] == sorted(e["t"] for e in first["events"])
    assert first["events"][-1]["usage"]["completion_tokens"] == 4
    assert TOKEN not in (directory / "default.jsonl").read_text()


def test_replay_needs_no_backend_and_answers_either_way(
        recorded: tuple[Path, ScriptedProvider, list[dict[str, Any]]], tmp_path: Path) -> None:
    directory, provider, answers = recorded
    calls = len(provider.requests)
    with app_server(tmp_path / "play", None, replay_dir=directory, accounts=False) as srv:
        # Recorded streamed, asked collected, and the reverse.
        body = ok(srv.chat(chat_body()))
        assert body["choices"][0]["message"]["content"] == "one two three four"
        assert body["usage"]["completion_tokens"] == 4
        r = srv.chat(chat_body("Two", n=2, max_tokens=3, stream=True, stream_options={"include_usage": True}))
        chunks = parse_sse(r.text).chunks
        texts = {i: "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                            if c["choices"] and c["choices"][0]["index"] == i) for i in (0, 1)}
        assert texts == {0: "one two three", 1: "one two three"}
        assert strip(ok(srv.chat(chat_body("Two", n=2, max_tokens=3)))) == strip(answers[0])
        # The cassette header picks the recordings; the same request in another cassette is a miss.
        assert strip(ok(post(srv, chat_body("Named"), "suite-a"))) == strip(answers[1])
        err(srv.chat(chat_body("Named")), 404, "replay_miss")
        with srv.client() as c:
            ready = c.get("/readyz").json()
            metrics = c.get("/metrics").text
        assert ready["backends"] == {"replay": {"ready": True, "error": None, "kind": "replay"}}
        assert 'backend="replay:scripted"' in metrics and 'backend="replay",' in metrics
    assert len(provider.requests) == calls


def test_a_changed_request_is_a_miss_naming_the_difference(
        recorded: tuple[Path, ScriptedProvider, list[dict[str, Any]]], tmp_path: Path) -> None:
    directory, _, _ = recorded
    with app_server(tmp_path / "play", None, replay_dir=directory, accounts=False) as srv:
        error = err(srv.chat(chat_body("Say hello")), 404, "replay_miss", "messages")
        assert "'default'" in error["message"] and "messages[0].content" in error["message"]
        assert '"Say hi"' in error["message"] and '"Say hello"' in error["message"]
        error = err(srv.chat(chat_body(temperature=0.2)), 404, "replay_miss", "temperature")
        assert "temperature: recorded absent, requested 0.2" in error["message"]
        err(post(srv, chat_body(), "../etc"), 400, "bad_request",
            "x-grokgate-cassette")
        error = err(post(srv, chat_body(), "nothing-here"), 404, "replay_miss")
        assert "no recordings" in error["message"]


def test_record_missing_goes_live_and_appends(
        recorded: tuple[Path, ScriptedProvider, list[dict[str, Any]]], tmp_path: Path) -> None:
    directory, _, _ = recorded
    def refuse(request: ChatCompletionRequest) -> GatewayError | None:
        said = str(request.messages[-1].content)
        return GatewayError(400, "bad_request", "not for this backend", param="messages") if "No" in said else None

    live = ScriptedProvider("live", text="fresh words", refuse=refuse)
    with app_server(tmp_path / "fill", scripted_models(live), replay_dir=directory, record_missing=True,
                    accounts=False) as srv:
        assert ok(srv.chat(chat_body()))["choices"][0]["message"]["content"] == "one two three four"
        assert not live.requests  # a hit stays a replay
        assert ok(srv.chat(chat_body("New")))["choices"][0]["message"]["content"] == "fresh words"
        assert len(live.requests) == 1
        # A miss the live backend refuses is its 400, not a generation it was never meant to take (before: the
        # replayer checked nothing and handed it over).
        err(srv.chat(chat_body("No way")), 400, "bad_request", "messages")
        assert len(live.requests) == 1
    assert len(lines(directory / "default.jsonl")) == 3
    with app_server(tmp_path / "play", None, replay_dir=directory, accounts=False) as srv:
        assert ok(srv.chat(chat_body("New")))["choices"][0]["message"]["content"] == "fresh words"


def test_identical_requests_replay_in_order_then_wrap(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    provider = ScriptedProvider("scripted", text="first")
    with app_server(tmp_path / "rec", scripted_models(provider), record_dir=directory, accounts=False) as srv:
        ok(srv.chat(chat_body()))
        provider.text = "second"
        ok(srv.chat(chat_body()))
    with app_server(tmp_path / "play", None, replay_dir=directory, accounts=False) as srv:
        said = [ok(srv.chat(chat_body()))["choices"][0]["message"]["content"] for _ in range(3)]
    assert said == ["first", "second", "first"]


async def _fail_with_429(request: ChatCompletionRequest, model: str) -> AsyncGenerator[Event]:
    raise GatewayError(429, "too_many_requests", "Every upstream is rate limiting.", headers={"retry-after": "3"})
    yield Finish(0, "stop")  # pragma: no cover


async def _cut_mid_stream(request: ChatCompletionRequest, model: str) -> AsyncGenerator[Event]:
    yield Delta(0, content="partial")
    await asyncio.sleep(0.2)
    raise GatewayError(502, "api_error", "The upstream closed the stream.")


async def _slow(request: ChatCompletionRequest, model: str) -> AsyncGenerator[Event]:
    await asyncio.sleep(0.3)
    yield Delta(0, content="late")
    yield Finish(0, "stop")
    yield UsageReport(Usage(1, 1))


async def _dribble(request: ChatCompletionRequest, model: str) -> AsyncGenerator[Event]:
    yield Delta(0, content="first")
    await asyncio.sleep(30)
    yield Finish(0, "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_recorded_failures_replay_as_failures(tmp_path: Path, stream: bool) -> None:
    directory = tmp_path / "c"
    limited = ScriptedProvider("upstream", script=_fail_with_429)
    with app_server(tmp_path / "rec", scripted_models(limited), record_dir=directory, accounts=False) as srv:
        live = srv.chat(chat_body(stream=stream))
        limited.script = _cut_mid_stream
        cut = srv.chat(chat_body("Cut", stream=True))
    assert live.status_code == 429 and "partial" in cut.text
    with app_server(tmp_path / "play", None, replay_dir=directory, accounts=False) as srv:
        r = srv.chat(chat_body(stream=stream))
        err(r, 429, "too_many_requests")
        assert r.headers["retry-after"] == "3"
        r = srv.chat(chat_body("Cut", stream=True))
        assert r.status_code == 200
        events = parse_sse(r.text).events
        assert events[1]["choices"][0]["delta"]["content"] == "partial"
        assert events[-1]["error"]["message"] == "The upstream closed the stream." and "[DONE]" not in events
        # Collected, the cut stream is the same failure (after output: an error, not a partial answer).
        err(srv.chat(chat_body("Cut")), 502, "api_error")


def test_replay_timing_instant_or_recorded(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    with app_server(tmp_path / "rec", scripted_models(ScriptedProvider("s", script=_slow)), record_dir=directory,
                    accounts=False) as srv:
        ok(srv.chat(chat_body()))
    assert lines(directory / "default.jsonl")[0]["events"][0]["t"] >= 290
    for timing, low, high in (("instant", 0.0, 0.25), ("recorded", 0.29, 5.0)):
        with app_server(tmp_path / timing, None, replay_dir=directory, replay_timing=timing, accounts=False) as srv:
            started = time.perf_counter()
            assert ok(srv.chat(chat_body()))["choices"][0]["message"]["content"] == "late"
            assert low <= time.perf_counter() - started < high, timing


def test_a_request_the_client_abandons_is_not_recorded(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    provider = ScriptedProvider("s", script=_dribble)
    with app_server(tmp_path / "rec", scripted_models(provider), record_dir=directory, accounts=False) as srv:
        with srv.client() as c, c.stream("POST", "/grok/chat/completions", json=chat_body(stream=True),
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            for text in r.iter_text():  # until the first word, then the client hangs up
                if "first" in text:
                    break
        deadline = time.monotonic() + 5
        while provider.closed == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert provider.closed == 1
    assert not (directory / "default.jsonl").exists()


def test_record_and_replay_settings_exclude_each_other(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from grokgate.settings import Settings

    with pytest.raises(ValidationError, match="exclude each other"):
        Settings(record_dir=tmp_path, replay_dir=tmp_path)
    with pytest.raises(ValidationError, match="needs GROKGATE_REPLAY_DIR"):
        Settings(record_missing=True)
    with pytest.raises(ValidationError):
        Settings(replay_price_factor=2)


def test_cassettes_cli_lists_shows_and_prunes(
        recorded: tuple[Path, ScriptedProvider, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]) -> None:
    directory, _, _ = recorded
    path = directory / "default.jsonl"
    path.write_text(path.read_text() + path.read_text().splitlines(keepends=True)[0])  # a duplicate recording
    assert cli_main(["cassettes", "list", "--dir", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "default" in out and "suite-a" in out and "grok-3" in out
    assert cli_main(["cassettes", "show", "default", "--dir", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "#3" in out and "'one two three four'" in out and "finish stop" in out and "7+4 tokens" in out
    assert cli_main(["cassettes", "prune", "--dir", str(directory), "--dry-run"]) == 0
    assert "default: 2 kept, 1 would be removed" in capsys.readouterr().out and len(lines(path)) == 3
    assert cli_main(["cassettes", "prune", "default", "--dir", str(directory)]) == 0
    assert len(lines(path)) == 2
    assert cli_main(["cassettes", "show", "../x", "--dir", str(directory)]) == 2
    assert cli_main(["cassettes", "prune", "../x", "--dir", str(directory)]) == 2


def ledger(srv: Any, token: str) -> list[dict[str, Any]]:
    with srv.client() as c:
        body = ok(c.get("/v1/ledger", headers={"Authorization": f"Bearer {token}"}))
    rows: list[dict[str, Any]] = body["data"]
    return rows


@pytest.mark.parametrize("factor", [1, 0])
def test_replays_are_admitted_settled_and_marked_in_the_ledger(
        recorded: tuple[Path, ScriptedProvider, list[dict[str, Any]]], tmp_path: Path, factor: int) -> None:
    directory, _, _ = recorded
    # Recorded with the static key, replayed by an account token: the shared cassettes (docs/replay.md).
    with app_server(tmp_path / "play", None, replay_dir=directory, replay_price_factor=factor,
                    cassette_scope="shared") as srv:
        token, _ = create_key(srv, "replayer", credits="10")  # type: ignore[arg-type]
        body = ok(post(srv, chat_body(), token=token))
        assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11,
                                 "prompt_tokens_details": {"cached_tokens": 0},
                                 "completion_tokens_details": {"reasoning_tokens": 0}}
        err(post(srv, chat_body("Not recorded"), token=token), 404, "replay_miss")
        rows = ledger(srv, token)
    usage_rows = [r for r in rows if r.get("kind", "usage") == "usage" and r.get("model") == "grok-3"]
    assert {r["backend"] for r in usage_rows} == {"replay:scripted", "replay"}
    ok_row = next(r for r in usage_rows if r["status"] == "ok")
    assert ok_row["prompt_tokens"] == 7 and ok_row["completion_tokens"] == 4
    assert (int(ok_row["cost"]) > 0) == (factor == 1)


# -- end to end: real servers, the fake xAI upstream and the local model ----------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]

# A client library's own test style: a small pytest suite using the openai SDK, pointed at grokgate by its
# environment, each test in a cassette of its own. It knows nothing of recording or replaying.
SDK_SUITE = '''
import os

import pytest
from openai import OpenAI


@pytest.fixture
def client(request):
    return OpenAI(base_url=os.environ["GG_URL"] + "/v1", api_key=os.environ["GG_TOKEN"], max_retries=0,
                  default_headers={"x-grokgate-cassette": "sdk-" + request.node.name})


def test_chat(client):
    completion = client.chat.completions.create(
        model="grok-3", messages=[{"role": "user", "content": "Greet me"}], max_tokens=16)
    assert completion.choices[0].message.content
    assert completion.usage.total_tokens > 0


def test_stream(client):
    with client.chat.completions.stream(
            model="grok-4", messages=[{"role": "user", "content": "Count"}], max_tokens=16) as stream:
        text = "".join(e.delta for e in stream if e.type == "content.delta")
    assert text


def test_tool_call(client):
    completion = client.chat.completions.create(
        model="grok-4", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    assert completion.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_responses(client):
    response = client.responses.create(model="grok-3", input="Hello", max_output_tokens=32)
    assert response.output_text
'''


def run_suite(suite: Path, srv: Server, token: str) -> subprocess.CompletedProcess[str]:
    # The suite needs plain pytest alone: none of the plugins this environment installs are loaded for it.
    env = {"GG_URL": srv.url, "GG_TOKEN": token, "PATH": "/usr/bin:/bin", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           str(suite)], cwd=suite.parent, env=env, capture_output=True, text=True, timeout=120)


def xai_config(tmp: Path, url: str, *, local: bool = False) -> Path:
    """Every model through the xAI upstream at `url`; with `local`, also the local model as `grok-local`."""
    local_backend = "\n  local: {kind: local}" if local else ""
    local_model = "\n  grok-local: [{backend: local}]" if local else ""
    path = tmp / "grokgate.yaml"
    path.write_text(f"""
backends:
  xai:
    kind: xai
    base_url: {url}
    api_key_env: REPLAY_XAI_KEY
    cooldown: 0.5
    failure_threshold: 50{local_backend}
models:
  grok-3: [{{backend: xai}}]
  grok-3-mini: [{{backend: xai}}]
  grok-4: [{{backend: xai}}]{local_model}
""")
    return path


def responses_text(body: dict[str, Any]) -> str:
    return "".join(part["text"] for item in body["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")


class Recording:
    """What the record phase saw, to compare the replays against."""

    def __init__(self, directory: Path, fake: FakeXAI, tmp: Path) -> None:
        self.directory = directory
        self.fake = fake
        self.tmp = tmp
        self.live: dict[str, Any] = {}


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recording]:
    """Record through the fake xAI upstream (chat streamed and not, n=2, a tool call, a Responses request, a stream
    cut mid-way, the SDK suite, a 429) and through the local model (one short answer), in one recording server
    that routes to both, then stop it."""
    tmp = tmp_path_factory.mktemp("replay")
    with FakeXAI().start() as fake:
        rec = Recording(tmp / "cassettes", fake, tmp)
        env: dict[str, str | None] = {"GROKGATE_CONFIG": str(xai_config(tmp, fake.url, local=True)),
                                      "REPLAY_XAI_KEY": "xai-test-key", "GROKGATE_CASSETTE_SCOPE": "shared"}
        srv = start_server(tmp, "--record", str(rec.directory), "--slots", "1", "--ctx-per-slot", "1024", env=env,
                           name="rec")
        try:
            live = rec.live
            live["chat"] = ok(post(srv, {"model": "grok-3", "messages": user("Say hi")}, "xai"))
            live["mini"] = streamed_text(post(srv, {"model": "grok-3-mini", "messages": user("Think"), "stream": True,
                                                    "stream_options": {"include_usage": True}}, "xai"))
            live["n2"] = ok(post(srv, {"model": "grok-3", "messages": user("Two"), "n": 2}, "xai"))
            live["tool"] = ok(post(srv, {"model": "grok-4", "messages": user("Weather?"), "tools": TOOLS}, "xai"))
            live["responses"] = ok(post(srv, {"model": "grok-3", "input": "Hello", "max_output_tokens": 32}, "xai",
                                        path="/v1/responses"))
            fake.fail_next({"fault": "reset_mid_stream", "after": 2})
            live["cut"] = post(srv, {"model": "grok-3", "messages": user("Cut"), "stream": True}, "xai")
            suite = tmp / "sdk" / "test_app.py"
            suite.parent.mkdir()
            suite.write_text(SDK_SUITE)
            live["sdk"] = run_suite(suite, srv, srv.token)
            live["local"] = ok(post(srv, {"model": "grok-local", "messages": user("Say hi"), "max_tokens": 8,
                                          "temperature": 0}, "local"))
            # Last: the upstream key rests after its 429, and nothing more goes to it.
            fake.fail_next({"fault": "429", "retry_after": 1})
            live["429"] = post(srv, {"model": "grok-3", "messages": user("Busy?")}, "xai")
            live["fake_requests"] = len(fake.requests)
        finally:
            stop_server(srv)
        yield rec


@pytest.fixture(scope="module")
def filler() -> Iterator[FakeXAI]:
    """The upstream `--record-missing` goes to on a miss."""
    with FakeXAI(content="Filled in").start() as fake:
        yield fake


@pytest.fixture(scope="module")
def replay_servers(recording: Recording, filler: FakeXAI) -> Iterator[tuple[Server, Server]]:
    """Started together on the recorded cassettes: `--replay` with nothing to call (no routing file, no key, a
    model path that does not exist), and `--replay --record-missing` with the `filler` upstream to call."""
    tmp = recording.tmp
    (tmp / "fill").mkdir()
    # Shared cassettes: recorded with the static key, replayed by account tokens too (docs/replay.md's workflow).
    fill_env: dict[str, str | None] = {"GROKGATE_CONFIG": str(xai_config(tmp / "fill", filler.url)),
                                       "REPLAY_XAI_KEY": "xai-test-key", "GROKGATE_CASSETTE_SCOPE": "shared"}
    servers = start_servers(
        tmp,
        ("replay", ("--replay", str(recording.directory)),
         {"GROKGATE_CONFIG": None, "GROKGATE_MODEL_PATH": str(tmp / "absent.gguf"),
          "GROKGATE_CASSETTE_SCOPE": "shared"}),
        ("fill", ("--replay", str(recording.directory), "--record-missing"), fill_env),
        timeout=30)
    yield servers[0], servers[1]
    for srv in servers:
        stop_server(srv)


@pytest.fixture(scope="module")
def replaying(replay_servers: tuple[Server, Server]) -> Server:
    return replay_servers[0]


@E2E
def test_recording_went_through_every_path(recording: Recording) -> None:
    live = recording.live
    assert live["429"].status_code == 429 and live["429"].headers["retry-after"] == "1"
    assert parse_sse(live["cut"].text).chunks[-1].get("error")
    assert live["sdk"].returncode == 0, live["sdk"].stdout + live["sdk"].stderr
    assert live["tool"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert live["local"]["choices"][0]["message"]["content"]
    xai = lines(recording.directory / "xai.jsonl")
    assert len(xai) == 7 and {e["backend"] for e in xai} == {"xai"}
    errors = [(e["error"]["status"], e["error"]["code"], len(e["events"])) for e in xai if e["error"]]
    assert len(errors) == 2 and errors[0][2] > 0 and errors[1] == (429, "too_many_requests", 0)  # cut, then 429
    text = "".join(p.read_text() for p in recording.directory.glob("*.jsonl"))
    assert "xai-test-key" not in text and TOKEN not in text
    assert sorted(p.stem for p in recording.directory.glob("sdk-*.jsonl")) == [
        "sdk-test_chat", "sdk-test_responses", "sdk-test_stream", "sdk-test_tool_call"]


@E2E
def test_replay_answers_what_was_recorded_with_nothing_to_call(recording: Recording, replaying: Server) -> None:
    live = recording.live
    started = time.perf_counter()
    assert strip(ok(post(replaying, {"model": "grok-3", "messages": user("Say hi")}, "xai"))) == strip(live["chat"])
    assert strip(ok(post(replaying, {"model": "grok-3", "messages": user("Two"), "n": 2}, "xai"))) == strip(live["n2"])
    tool = ok(post(replaying, {"model": "grok-4", "messages": user("Weather?"), "tools": TOOLS}, "xai"))
    assert strip(tool) == strip(live["tool"])
    assert tool["choices"][0]["finish_reason"] == "tool_calls"
    # Recorded streamed, replayed streamed and collected.
    mini = {"model": "grok-3-mini", "messages": user("Think")}
    assert streamed_text(post(replaying, {**mini, "stream": True, "stream_options": {"include_usage": True}},
                              "xai")) == live["mini"]
    collected = ok(post(replaying, mini, "xai"))
    text, finishes, usage = live["mini"]
    assert collected["choices"][0]["message"]["content"] == text
    assert collected["choices"][0]["message"]["reasoning_content"]
    assert [collected["choices"][0]["finish_reason"]] == finishes and collected["usage"] == usage
    # Recorded collected, replayed streamed.
    assert streamed_text(post(replaying, {"model": "grok-3", "messages": user("Say hi"), "stream": True,
                                          "stream_options": {"include_usage": True}}, "xai")) == (
        live["chat"]["choices"][0]["message"]["content"], ["stop"], live["chat"]["usage"])
    # The local model's answer, without the local model.
    local = ok(post(replaying, {"model": "grok-local", "messages": user("Say hi"), "max_tokens": 8,
                                "temperature": 0}, "local"))
    assert strip(local) == strip(live["local"])
    assert time.perf_counter() - started < 5
    assert len(recording.fake.requests) == live["fake_requests"]


@E2E
def test_replayed_responses_request_in_either_mode(recording: Recording, replaying: Server) -> None:
    live = recording.live["responses"]
    body = {"model": "grok-3", "input": "Hello", "max_output_tokens": 32}
    again = ok(post(replaying, body, "xai", path="/v1/responses"))
    assert responses_text(again) == responses_text(live) and again["usage"] == live["usage"]
    r = post(replaying, {**body, "stream": True}, "xai", path="/v1/responses")
    assert r.status_code == 200 and "response.completed" in r.text
    deltas = [json.loads(line[6:]).get("delta", "") for line in r.text.splitlines()
              if line.startswith("data: ") and "output_text.delta" in line]
    assert "".join(deltas) == responses_text(live)


@E2E
def test_recorded_failures_replay_over_http(recording: Recording, replaying: Server) -> None:
    r = post(replaying, {"model": "grok-3", "messages": user("Busy?")}, "xai")
    err(r, 429, "too_many_requests")
    assert r.headers["retry-after"] == "1"
    r = post(replaying, {"model": "grok-3", "messages": user("Cut"), "stream": True}, "xai")
    live = parse_sse(recording.live["cut"].text).chunks
    replayed = parse_sse(r.text).chunks
    assert [c["choices"][0]["delta"].get("content") for c in replayed if c.get("choices")] == [
        c["choices"][0]["delta"].get("content") for c in live if c.get("choices")]
    assert replayed[-1]["error"] == live[-1]["error"]


@E2E
def test_a_changed_request_misses_and_the_ledger_marks_replays(recording: Recording, replaying: Server) -> None:
    token, _ = create_key(replaying, "ci", credits="5")
    error = err(post(replaying, {"model": "grok-3", "messages": user("Say hello")}, "xai", token=token), 404,
                "replay_miss", "messages")
    assert "'xai'" in error["message"] and '"Say hi"' in error["message"]
    ok(post(replaying, {"model": "grok-3", "messages": user("Say hi")}, "xai", token=token))
    rows = [r for r in ledger(replaying, token) if r["kind"] == "usage"]
    assert [(r["backend"], r["status"]) for r in rows] == [("replay:xai", "ok"), ("replay", "error")]
    assert rows[0]["prompt_tokens"] == recording.live["chat"]["usage"]["prompt_tokens"] and rows[0]["cost"] > 0


@E2E
def test_the_sdk_suite_replays_offline(recording: Recording, replaying: Server) -> None:
    result = run_suite(recording.tmp / "sdk" / "test_app.py", replaying, replaying.token)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout


@E2E
def test_record_missing_fills_the_gap(recording: Recording, replay_servers: tuple[Server, Server],
                                      filler: FakeXAI) -> None:
    srv = replay_servers[1]
    before = len(lines(recording.directory / "xai.jsonl"))
    assert strip(ok(post(srv, {"model": "grok-3", "messages": user("Say hi")}, "xai"))) == strip(
        recording.live["chat"])
    assert not filler.requests
    new = ok(post(srv, {"model": "grok-3", "messages": user("Something new")}, "xai"))
    assert new["choices"][0]["message"]["content"] == "Filled in" and len(filler.requests) == 1
    assert len(lines(recording.directory / "xai.jsonl")) == before + 1


def test_a_recorded_backend_still_tokenizes_and_describes_its_models(tmp_path: Path) -> None:
    """`grokgate serve --record` (and `--replay --record-missing`) answer xAI's Tokenize and Models as the live backend
    does; pure replay has no tokenizer (the caller estimates). Before: the wrappers hid both capabilities."""
    import asyncio

    from grokgate.providers.base import DescribesModels, ModelFacts, Token
    from grokgate.providers.cassette_store import CassetteStore
    from grokgate.providers.recording import CassetteBounds, Recorder, Replayer

    class Counting(ScriptedProvider):
        async def tokenize(self, text: str, model: str) -> list[Token] | None:
            return [Token(7, text.encode(), text)]

        def describe(self, model: str) -> ModelFacts | None:
            return ModelFacts(context_length=1234)

    store = CassetteStore(tmp_path, CassetteBounds())
    recorder, live, pure = Recorder(Counting(), store), Replayer(store, live=Counting()), Replayer(store)
    for wrapper in (recorder, live):
        assert asyncio.run(wrapper.tokenize("hi", "m")) == [Token(7, b"hi", "hi")]
        assert isinstance(wrapper, DescribesModels) and wrapper.describe("m") == ModelFacts(context_length=1234)
    assert asyncio.run(pure.tokenize("hi", "m")) is None and pure.describe("m") is None
    plain = Recorder(ScriptedProvider(), store)  # a backend without either: the caller estimates
    assert asyncio.run(plain.tokenize("hi", "m")) is None and plain.describe("m") is None
