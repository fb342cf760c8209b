"""The fake xAI server (tests/fakes/fake_xai.py) behaves as documented: fast, no model, no grokgate."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TLS
from tests.fakes.fake_xai import CITATIONS, REASONING_TEXT, TOOL_ARGUMENTS, FakeXAI

KEY = "xai-test-key"
HELLO = "Hello from fake xAI"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeXAI]:
    with FakeXAI().start() as fake:
        yield fake


@pytest.fixture(scope="module")
def lax() -> Iterator[FakeXAI]:
    with FakeXAI(strict=False).start() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeXAI) -> FakeXAI:
    server.reset()
    return server


def body(model: str = "grok-3", text: str = "hi there", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def post(fake: FakeXAI, payload: Any, headers: dict[str, str] | None = None, key: str | None = KEY,
         timeout: float = 10) -> httpx.Response:
    h = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(f"{fake.url}/chat/completions", json=payload, headers={**h, **(headers or {})}, timeout=timeout,
                      verify=TLS)


def events(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    frames = r.text.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames)
    assert frames[-1] == "data: [DONE]"
    return [json.loads(f[len("data: "):]) for f in frames[:-1]]


def stream(fake: FakeXAI, payload: dict[str, Any], headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    return events(post(fake, {**payload, "stream": True}, headers))


def flat(r: httpx.Response, status: int, code: str | None = None) -> str:
    assert r.status_code == status, r.text
    data = r.json()
    assert set(data) == {"code", "error"} and isinstance(data["error"], str)
    if code is not None:
        assert data["code"] == code
    return str(data["error"])


# ----- auth, protocol errors ---------------------------------------------------------------------------------------
def test_auth_quirks(fake: FakeXAI) -> None:
    flat(post(fake, body(), key=None), 401, "Unauthenticated")
    flat(post(fake, body(), headers={"Authorization": "Basic abc"}, key=None), 401, "Unauthenticated")
    msg = flat(post(fake, body(), key="xai-wrong-key"), 400, "Client specified an invalid argument")
    assert msg == "Incorrect API key provided: xa***ey. You can obtain an API key from https://console.x.ai."
    flat(httpx.get(f"{fake.url}/models"), 401)
    assert post(fake, body()).status_code == 200


def test_protocol_errors(fake: FakeXAI) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{fake.url}/chat/completions"
    flat(httpx.post(url, headers=auth), 415)
    flat(httpx.post(url, headers={**auth, "content-type": "text/plain"}, content=json.dumps(body())), 415)
    flat(httpx.post(url, headers={**auth, "content-type": "application/json"}, content=b"{nope"), 400)
    flat(post(fake, {"model": "grok-3"}), 422)
    assert "does not exist" in flat(post(fake, body("grok-9")), 404)
    flat(httpx.get(url, headers=auth), 405)
    flat(httpx.get(f"{fake.url}/nothing", headers=auth), 404)


@pytest.mark.parametrize(("model", "extra"), [
    ("grok-3", {"stop": "END"}),
    ("grok-3", {"stop": ["a", "b", "c", "d", "e"]}),
    ("grok-4-0709", {"stop": ["END"]}),
    ("grok-4", {"presence_penalty": 0.5}),
    ("grok-4-1-fast", {"frequency_penalty": 0.5}),
    ("grok-4-1-fast-reasoning", {"stop": ["x"]}),
    ("grok-3-mini", {"presence_penalty": 0.1}),
    ("grok-3", {"presence_penalty": 0.1}),
    ("grok-3", {"reasoning_effort": "low"}),
    ("grok-4", {"reasoning_effort": "high"}),
    ("grok-3-mini", {"reasoning_effort": "medium"}),
    ("grok-3", {"logit_bias": {"1": 5}}),
    ("grok-3", {"logprobs": True, "top_logprobs": 9}),
    ("grok-3", {"top_logprobs": 2}),
    ("grok-3", {"messages": [{"role": "developer", "content": "be nice"}]}),
    *[("grok-3", {field: value}) for field, value in [("service_tier", "auto"), ("store", False), ("metadata", {}),
                                                      ("modalities", ["text"]), ("audio", {"voice": "alloy"}),
                                                      ("prediction", {"type": "content", "content": "x"})]],
    ("grok-3", {"max_tokens": 5, "max_completion_tokens": 5}),
])
def test_strict_rejections(fake: FakeXAI, lax: FakeXAI, model: str, extra: dict[str, Any]) -> None:
    flat(post(fake, body(model, **extra)), 400, "Client specified an invalid argument")
    assert post(lax, body(model, **extra)).status_code == 200


@pytest.mark.parametrize(("model", "extra"), [
    ("grok-3", {"stop": ["END"], "frequency_penalty": 0.2}),
    ("grok-4-1-fast-non-reasoning", {"stop": ["END"], "presence_penalty": 0.2}),
    ("grok-3-mini", {"reasoning_effort": "low"}),
    ("grok-3", {"logprobs": True, "top_logprobs": 8, "max_tokens": 50}),
    ("grok-2-vision-1212", {"stop": None, "logit_bias": None}),
    ("grok-code-fast-1", {"max_completion_tokens": 50}),
])
def test_strict_accepts(fake: FakeXAI, model: str, extra: dict[str, Any]) -> None:
    assert post(fake, body(model, **extra)).status_code == 200


# ----- non-stream --------------------------------------------------------------------------------------------------
def test_non_stream_shape_and_usage(fake: FakeXAI) -> None:
    r = post(fake, {"model": "grok-3", "messages": [{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": [{"type": "text", "text": "a b c"}]}]})
    data = r.json()
    assert r.headers["content-type"] == "application/json"
    assert data["id"].endswith("_us-east-1") and data["object"] == "chat.completion"
    assert isinstance(data["created"], int) and data["model"] == "grok-3" and data["system_fingerprint"] == "fp_fake"
    assert data["choices"] == [{"index": 0, "message": {"role": "assistant", "content": HELLO, "refusal": None},
                                "finish_reason": "stop"}]
    assert "citations" not in data
    assert data["usage"] == {
        "prompt_tokens": 15, "completion_tokens": 4, "total_tokens": 19,
        "prompt_tokens_details": {"text_tokens": 15, "audio_tokens": 0, "image_tokens": 0, "cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
        "num_sources_used": 0, "cost_in_usd_ticks": 15 * 30_000 + 4 * 150_000}


def test_reasoning_usage_arithmetic(fake: FakeXAI) -> None:
    mini = post(fake, body("grok-3-mini"), headers={"x-fake-cached-tokens": "5"}).json()
    assert mini["choices"][0]["message"]["reasoning_content"] == REASONING_TEXT
    u = mini["usage"]
    assert (u["prompt_tokens"], u["completion_tokens"]) == (12, 4)
    assert u["completion_tokens_details"]["reasoning_tokens"] == 7
    assert u["total_tokens"] == 12 + 4 + 7 and u["prompt_tokens_details"]["cached_tokens"] == 5
    grok4 = post(fake, body("grok-4"), headers={"x-fake-cached-tokens": "999"}).json()
    assert "reasoning_content" not in grok4["choices"][0]["message"]
    assert grok4["usage"]["total_tokens"] == 23 and grok4["usage"]["prompt_tokens_details"]["cached_tokens"] == 12


def test_n_choices_length_and_finish_override(fake: FakeXAI) -> None:
    data = post(fake, body(n=3)).json()
    assert [c["message"]["content"] for c in data["choices"]] == [HELLO, f"{HELLO} #1", f"{HELLO} #2"]
    assert [c["index"] for c in data["choices"]] == [0, 1, 2] and data["usage"]["completion_tokens"] == 14
    short = post(fake, body(max_completion_tokens=2)).json()
    assert short["choices"][0]["message"]["content"] == "Hello from"
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 2
    assert post(fake, body(max_tokens=3)).json()["choices"][0]["finish_reason"] == "length"
    end = post(fake, body(), headers={"x-fake-finish-reason": "end_turn"}).json()
    assert end["choices"][0]["finish_reason"] == "end_turn"


def test_tool_calls_and_citations(fake: FakeXAI) -> None:
    data = post(fake, body(tools=TOOLS, tool_choice="auto", search_parameters={"mode": "on"})).json()
    assert data["choices"] == [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "", "refusal": None, "tool_calls": [
            {"id": "call_12345678", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
             "type": "function"}]}}]
    assert data["citations"] == ["https://example.com/a", "https://example.com/b"]
    assert data["usage"]["completion_tokens"] == 2
    named = post(fake, body(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "other"}})).json()
    assert named["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "other"
    none = post(fake, body(tools=TOOLS, tool_choice="none")).json()
    assert none["choices"][0]["message"]["content"] == HELLO and "tool_calls" not in none["choices"][0]["message"]


def test_requests_are_recorded(fake: FakeXAI) -> None:
    post(fake, body(), headers={"X-Custom": "Yes"})
    httpx.get(f"{fake.url}/models", headers={"Authorization": f"Bearer {KEY}"})
    chat, models = fake.requests
    assert chat["path"] == "/v1/chat/completions" and chat["method"] == "POST" and chat["body"] == body()
    assert chat["headers"]["x-custom"] == "Yes" and chat["headers"]["authorization"] == f"Bearer {KEY}"
    assert models["path"] == "/v1/models" and fake.chat_requests == [chat]


def test_models(fake: FakeXAI) -> None:
    data = httpx.get(f"{fake.url}/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert data["object"] == "list"
    assert {"grok-3", "grok-3-mini", "grok-4-0709"} <= {m["id"] for m in data["data"]}
    assert all(set(m) == {"id", "object", "created", "owned_by"} and m["owned_by"] == "xai" for m in data["data"])


# ----- stream ------------------------------------------------------------------------------------------------------
def test_stream_quirks(fake: FakeXAI) -> None:
    chunks = stream(fake, body())
    assert len({(c["id"], c["created"], c["model"], c["object"]) for c in chunks}) == 1
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["id"].endswith("_us-east-1")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("usage" not in c and "citations" not in c for c in chunks)
    *middle, last = chunks
    assert all(set(c["choices"][0]) == {"index", "delta"} for c in middle)  # no null finish_reason / logprobs keys
    assert len(middle) == 5 and "".join(c["choices"][0]["delta"]["content"] for c in middle) == HELLO
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]


def test_stream_reasoning_models(fake: FakeXAI) -> None:
    grok4 = [c["choices"][0]["delta"] for c in stream(fake, body("grok-4"))]
    assert grok4[:4] == [{"role": "assistant"}, {}, {}, {}]
    assert "".join(d.get("content", "") for d in grok4) == HELLO
    mini = [c["choices"][0]["delta"] for c in stream(fake, body("grok-3-mini"))]
    assert mini[0] == {"role": "assistant"}
    assert "".join(d.get("reasoning_content", "") for d in mini) == REASONING_TEXT
    first_content = next(i for i, d in enumerate(mini) if "content" in d)
    assert mini[first_content - 3:first_content] == [{}, {}, {}]


def test_stream_tool_call_is_one_delta(fake: FakeXAI) -> None:
    chunks = stream(fake, body(tools=TOOLS))
    calls = [c for c in chunks if "tool_calls" in c["choices"][0]["delta"]]
    assert len(calls) == 1
    assert calls[0]["choices"][0]["delta"]["tool_calls"] == [
        {"id": "call_12345678", "function": {"name": "get_weather", "arguments": TOOL_ARGUMENTS}, "index": 0,
         "type": "function"}]
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]


def test_stream_usage_chunk_only_when_asked(fake: FakeXAI) -> None:
    assert all("usage" not in c for c in stream(fake, body("grok-4")))
    chunks = stream(fake, body("grok-4", stream_options={"include_usage": True}, search_parameters={}))
    assert chunks[-1]["choices"] == [] and chunks[-1]["citations"] == ["https://example.com/a",
                                                                      "https://example.com/b"]
    assert chunks[-1]["usage"] == post(fake, body("grok-4")).json()["usage"]
    assert all("usage" not in c for c in chunks[:-1])


def test_stream_usage_every_chunk(fake: FakeXAI) -> None:
    chunks = stream(fake, body("grok-3-mini", stream_options={"include_usage": True}),
                    headers={"x-fake-usage-every-chunk": "1"})
    assert all("usage" in c for c in chunks)
    completions = [c["usage"]["completion_tokens"] for c in chunks]
    assert completions == sorted(completions) and completions[0] < completions[-1]
    assert chunks[-2]["usage"] == chunks[-1]["usage"] and chunks[-1]["usage"]["total_tokens"] == 12 + 4 + 7


def test_stream_n_interleaves(fake: FakeXAI) -> None:
    chunks = stream(fake, body(n=2), headers={"x-fake-finish-reason": "end_turn"})
    assert [c["choices"][0]["index"] for c in chunks] == [0, 1] * (len(chunks) // 2)
    for i, text in enumerate([HELLO, f"{HELLO} #1"]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(ch["delta"].get("content", "") for ch in mine) == text
        assert mine[-1]["finish_reason"] == "end_turn"


def test_stream_chunk_delay(fake: FakeXAI) -> None:
    start = time.monotonic()
    chunks = stream(fake, body(), headers={"x-fake-chunk-delay-ms": "40"})
    assert time.monotonic() - start >= 0.04 * len(chunks) - 0.01


# ----- faults ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", ["500", "502", "503"])
def test_server_errors(fake: FakeXAI, status: str) -> None:
    fake.fail_next(status)
    flat(post(fake, body()), int(status))
    assert post(fake, body()).status_code == 200  # one request only
    flat(post(fake, body(stream=True), headers={"x-fake-fault": status}), int(status))


def test_faults_are_fifo_and_recorded(fake: FakeXAI) -> None:
    fake.fail_next("500", {"fault": "429", "retry_after": 2}, "bad_key")
    assert [post(fake, body()).status_code for _ in range(4)] == [500, 429, 400, 200]
    assert len(fake.requests) == 4
    with pytest.raises(ValueError, match="unknown"):
        fake.fail_next("explode")
    flat(post(fake, body(), headers={"x-fake-fault": "explode"}), 400)


def test_rate_limit(fake: FakeXAI) -> None:
    fake.fail_next("429", {"fault": "429", "retry_after": 2})
    first, second = post(fake, body()), post(fake, body())
    flat(first, 429)
    assert first.headers["retry-after"] == "1" and second.headers["retry-after"] == "2"
    assert post(fake, body(), headers={"x-fake-fault": "429;retry_after=3"}).headers["retry-after"] == "3"


def test_bad_key_fault(fake: FakeXAI) -> None:
    fake.fail_next("bad_key")
    assert flat(post(fake, body()), 400).startswith("Incorrect API key provided: xa***ey.")


@pytest.mark.parametrize("streaming", [False, True])
def test_reset_is_a_connection_error(fake: FakeXAI, streaming: bool) -> None:
    fake.fail_next("reset")
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        post(fake, body(stream=streaming))
    assert post(fake, body()).status_code == 200


def test_stall_respected_and_does_not_block_others(fake: FakeXAI) -> None:
    fake.fail_next({"fault": "stall", "seconds": 0.6})
    with ThreadPoolExecutor(2) as pool:
        start = time.monotonic()
        stalled = pool.submit(post, fake, body())
        time.sleep(0.1)
        assert post(fake, body()).status_code == 200
        assert time.monotonic() - start < 0.5
        assert stalled.result().status_code == 200
        assert time.monotonic() - start >= 0.6
    fake.fail_next({"fault": "stall", "seconds": 5})
    with pytest.raises(httpx.ReadTimeout):
        post(fake, body(), timeout=0.3)
    start = time.monotonic()
    assert post(fake, body(), headers={"x-fake-fault": "stall;seconds=0.2"}).status_code == 200
    assert time.monotonic() - start >= 0.2


def test_release_ends_the_stalls_under_way(fake: FakeXAI) -> None:
    fake.fail_next({"fault": "stall", "seconds": 600}, {"fault": "stall", "seconds": 600})
    with ThreadPoolExecutor(2) as pool:
        stalled = [pool.submit(post, fake, body()) for _ in range(2)]
        while len(fake.chat_requests) < 2:
            time.sleep(0.01)
        assert not any(f.done() for f in stalled)
        fake.release_stalls()
        assert [f.result(timeout=60).status_code for f in stalled] == [200, 200]


def test_reset_mid_stream(fake: FakeXAI) -> None:
    fake.fail_next({"fault": "reset_mid_stream", "after": 3}, "reset_mid_stream", "reset_mid_stream")
    for expected in (3, 2):
        lines: list[str] = []
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)), httpx.stream(
                "POST", f"{fake.url}/chat/completions", json=body(stream=True),
                headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            lines.extend(line for line in r.iter_lines() if line)
        assert len(lines) == expected and "[DONE]" not in "".join(lines)
        assert all(json.loads(line[len("data: "):])["object"] == "chat.completion.chunk" for line in lines)
    with pytest.raises(httpx.RemoteProtocolError):  # non-stream: the JSON body is cut halfway
        post(fake, body())


def test_stall_mid_stream(fake: FakeXAI) -> None:
    fake.fail_next({"fault": "stall_mid_stream", "after": 1, "seconds": 0.4})
    arrivals: list[float] = []
    start = time.monotonic()
    with httpx.stream("POST", f"{fake.url}/chat/completions", json=body(stream=True),
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = []
        for line in r.iter_lines():
            if line:
                lines.append(line)
                arrivals.append(time.monotonic() - start)
    assert lines[-1] == "data: [DONE]" and len(lines) == 7
    assert arrivals[0] < 0.3 and arrivals[1] >= 0.4
    fake.fail_next({"fault": "stall_mid_stream", "seconds": 0.3})
    start = time.monotonic()
    assert post(fake, body()).json()["choices"][0]["message"]["content"] == HELLO
    assert time.monotonic() - start >= 0.3


def test_no_usage(fake: FakeXAI) -> None:
    fake.fail_next("no_usage", "no_usage")
    assert all("usage" not in c for c in stream(fake, body(stream_options={"include_usage": True})))
    assert "usage" not in post(fake, body()).json()
    assert "usage" in stream(fake, body(stream_options={"include_usage": True}))[-1]


# ----- script mode -------------------------------------------------------------------------------------------------
def test_runs_as_a_script() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.fake_xai", "--port", str(port), "--key", "k1"],
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k1"})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        assert r.status_code == 200 and r.json()["object"] == "list"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ----- /v1/responses -----------------------------------------------------------------------------------------------
def rpost(fake: FakeXAI, payload: Any, key: str = KEY) -> httpx.Response:
    return httpx.post(f"{fake.url}/responses", json=payload, headers={"Authorization": f"Bearer {key}"}, timeout=10,
                      verify=TLS)


def rframes(r: httpx.Response) -> list[dict[str, Any]]:
    """event: + data: frames, the event name equal to the data's type, sequence numbers 0, 1, 2..."""
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    out = []
    for frame in r.text.split("\n\n")[:-1]:
        name, data = frame.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        out.append(event)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def test_responses_store_retrieve_chain_delete(fake: FakeXAI) -> None:
    first = rpost(fake, {"model": "grok-3", "input": "one two three"}).json()
    assert first["object"] == "response" and first["status"] == "completed" and first["store"] is True
    assert first["output"][0]["content"][0]["text"] == HELLO
    assert first["usage"]["input_tokens"] == 13 and first["usage"]["total_tokens"] == 13 + 4
    assert httpx.get(f"{fake.url}/responses/{first['id']}", headers={"Authorization": f"Bearer {KEY}"}).json() == first
    second = rpost(fake, {"model": "grok-3", "input": "four", "previous_response_id": first["id"]}).json()
    assert second["usage"]["input_tokens"] == 10 + 3 + 4 + 1  # the stored turn is billed again
    assert "instructions" in flat(rpost(fake, {"model": "grok-3", "input": "x", "instructions": "be brief",
                                               "previous_response_id": first["id"]}), 400)
    url = f"{fake.url}/responses/{first['id']}"
    assert httpx.delete(url, headers={"Authorization": f"Bearer {KEY}"}).json()["deleted"] is True
    flat(httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}), 404)
    flat(rpost(fake, {"model": "grok-3", "input": "x", "previous_response_id": first["id"]}), 404)
    unstored = rpost(fake, {"model": "grok-3", "input": "x", "store": False}).json()
    assert unstored["store"] is False and unstored["id"] not in fake.stored
    assert len(fake.responses_requests) == 5 and not fake.chat_requests


@pytest.mark.parametrize("extra", [
    {"input": "x", "include": ["file_search_call.results"]},
    {"input": "x", "model": "grok-4", "reasoning": {"effort": "low"}},
    {"input": "x", "model": "grok-4", "presence_penalty": 0.5},
    {"input": "x", "max_output_tokens": 0},
    {"input": "x", "temperature": 3},
    {"input": "x", "tools": [{"type": "function", "function": {"name": "f"}}]},
    {"input": "x", "tools": [{"type": "browser"}]},
    {"input": "x", "tools": [{"type": "web_search"}], "max_tool_calls": 0},
    {"input": "x", "text": {"format": {"type": "json_schema", "name": "s"}}},
])
def test_responses_strict_rejections(fake: FakeXAI, lax: FakeXAI, extra: dict[str, Any]) -> None:
    payload = {"model": "grok-3", **extra}
    flat(rpost(fake, payload), 400, "Client specified an invalid argument")
    assert rpost(lax, payload).status_code == 200


def test_responses_protocol_errors(fake: FakeXAI) -> None:
    flat(rpost(fake, {"model": "grok-3"}), 422)
    assert "does not exist" in flat(rpost(fake, {"model": "grok-9", "input": "x"}), 404)
    flat(rpost(fake, {"model": "grok-3", "input": "x"}, key="xai-wrong"), 400)


def test_responses_stream_order_and_usage(fake: FakeXAI) -> None:
    events = rframes(rpost(fake, {"model": "grok-3", "input": "hi", "stream": True}))
    kinds = [e["type"] for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == HELLO
    assert events[-1]["response"]["usage"]["output_tokens"] == 4 and events[0]["response"]["usage"] is None


def test_responses_function_call_then_text(fake: FakeXAI) -> None:
    tool = {"type": "function", "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 2},
                                         "unit": {"enum": ["c", "f"]}}}}
    call = rpost(fake, {"model": "grok-3", "input": "weather?", "tools": [tool]}).json()["output"][0]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris", "days": 2, "unit": "c"}
    events = rframes(rpost(fake, {"model": "grok-3", "input": "weather?", "tools": [tool], "stream": True}))
    added = next(e for e in events if e["type"] == "response.output_item.added")
    assert added["item"]["arguments"] == call["arguments"]  # whole in .added, as xAI sends it
    back = rpost(fake, {"model": "grok-3", "tools": [tool], "input": [
        {"role": "user", "content": "weather?"}, call,
        {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}]}).json()
    assert back["output"][0]["type"] == "message"
    assert rpost(fake, {"model": "grok-3", "input": "x", "tools": [tool], "tool_choice": "none"}).json()[
        "output"][0]["type"] == "message"


def test_responses_server_tools_reasoning_and_formats(fake: FakeXAI) -> None:
    body = {"model": "grok-4", "input": "news", "tools": [{"type": "web_search"}, {"type": "x_search"}],
            "include": ["reasoning.encrypted_content"]}
    data = rpost(fake, body).json()
    assert [i["type"] for i in data["output"]] == ["reasoning", "web_search_call", "custom_tool_call", "message"]
    assert data["output"][0]["encrypted_content"] and data["output"][0]["summary"] == []
    assert [a["url"] for a in data["output"][-1]["content"][0]["annotations"]] == CITATIONS
    usage = data["usage"]
    assert usage["num_server_side_tools_used"] == 2 and usage["output_tokens_details"]["reasoning_tokens"] == 7
    assert usage["server_side_tool_usage_details"]["web_search_calls"] == 1
    assert usage["server_side_tool_usage_details"]["x_search_calls"] == 1
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    one = rpost(fake, {**body, "max_tool_calls": 1}).json()
    assert one["usage"]["num_server_side_tools_used"] == 1
    kinds = [e["type"] for e in rframes(rpost(fake, {**body, "stream": True}))]
    assert "response.web_search_call.searching" in kinds and "response.custom_tool_call_input.done" in kinds
    assert "response.output_text.annotation.added" in kinds
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}}}
    fmt = {"format": {"type": "json_schema", "name": "s", "schema": schema}}
    answer = rpost(fake, {"model": "grok-3", "input": "x", "text": fmt}).json()["output"][0]["content"][0]["text"]
    assert json.loads(answer) == {"n": 1, "ok": True}
    cut = rpost(fake, {"model": "grok-3", "input": "x", "max_output_tokens": 2}).json()
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert rframes(rpost(fake, {"model": "grok-3", "input": "x", "max_output_tokens": 2, "stream": True}))[-1][
        "type"] == "response.incomplete"


def test_responses_faults(fake: FakeXAI) -> None:
    fake.fail_next("failed", "no_usage", "429")
    events = rframes(rpost(fake, {"model": "grok-3", "input": "x", "stream": True}))
    assert events[-1]["type"] == "response.failed" and events[-1]["response"]["error"]["message"]
    assert rpost(fake, {"model": "grok-3", "input": "x"}).json()["usage"] is None
    assert rpost(fake, {"model": "grok-3", "input": "x"}).status_code == 429
    assert post(fake, body()).status_code == 200  # chat is unchanged
