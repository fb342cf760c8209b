"""/metrics after known traffic: the counters move by exactly that traffic."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, create_key, start_server, stop_server, user
from tests.fakes.fake_xai import FakeXAI

pytestmark = pytest.mark.e2e  # the real server, model or databases (tests/conftest.py)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, FakeXAI]]:
    tmp = tmp_path_factory.mktemp("metrics")
    with FakeXAI().start() as fake:
        config = tmp / "grokgate.yaml"
        config.write_text(f"""
backends:
  up: {{kind: xai, base_url: {fake.url}, api_key_env: XAI_KEY}}
models:
  grok-3: [{{backend: up}}]
  grok-3-mini: [{{backend: up}}]
""")
        srv = start_server(tmp, env={"GROKGATE_CONFIG": str(config), "XAI_KEY": "xai-test-key"}, name="metrics")
        yield srv, fake
        stop_server(srv)


def scrape(srv: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{srv.url}/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def delta(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_counters_move_by_exactly_the_traffic(gw: tuple[Server, FakeXAI]) -> None:
    srv, _ = gw
    token, key = create_key(srv, "metered", credits="5")
    before = scrape(srv)
    usages = []
    for i in range(3):
        r = srv.chat({"model": "grok-3", "messages": user(f"one two {i}")}, token=token)
        assert r.status_code == 200
        usages.append(r.json()["usage"])
    r = srv.chat({"model": "grok-3-mini", "messages": user("hi"), "stream": True,
                  "stream_options": {"include_usage": True}}, token=token)
    assert r.status_code == 200
    assert srv.chat({"model": "grok-3", "messages": user("x")}, token="nope").status_code == 401
    assert srv.chat({"model": "grok-3", "messages": []}, token=token).status_code == 400
    after = scrape(srv)

    assert delta(before, after, "grokgate_requests_total", model="grok-3", backend="up", status="200",
                 endpoint="chat") == 3
    assert delta(before, after, "grokgate_requests_total", model="grok-3-mini", backend="up", status="200",
                 endpoint="chat") == 1
    assert delta(before, after, "grokgate_tokens_total", model="grok-3", kind="prompt") == sum(
        u["prompt_tokens"] for u in usages)
    assert delta(before, after, "grokgate_tokens_total", model="grok-3", kind="completion") == sum(
        u["completion_tokens"] for u in usages)
    assert delta(before, after, "grokgate_tokens_total", model="grok-3-mini", kind="reasoning") == 7
    with srv.client() as c:
        balance = c.get(f"/admin/keys/{key['id']}", headers={"Authorization": f"Bearer {srv.token}"}).json()["balance"]
    charged = delta(before, after, "grokgate_credits_charged_total", model="grok-3") + delta(
        before, after, "grokgate_credits_charged_total", model="grok-3-mini")
    assert charged == 5_000_000 - balance
    assert delta(before, after, "grokgate_errors_total", code="invalid_token") == 1
    assert delta(before, after, "grokgate_errors_total", code="bad_request") == 1
    assert delta(before, after, "grokgate_request_duration_seconds_count", model="grok-3", stream="false") == 3
    assert delta(before, after, "grokgate_time_to_first_event_seconds_count", model="grok-3") == 3
    assert delta(before, after, "grokgate_overhead_seconds_count") == 4
    assert delta(before, after, "grokgate_store_commit_seconds_count") >= 2
    assert after[("grokgate_requests_in_flight", ())] == 0
    assert after[("grokgate_backend_open", (("backend", "up"),))] == 0


def test_no_unbounded_labels(gw: tuple[Server, FakeXAI]) -> None:
    srv, _ = gw
    text = httpx.get(f"{srv.url}/metrics").text
    assert srv.token not in text
    assert "request_id" not in text and "gg-" not in text


def test_one_structured_log_line_per_request_without_secrets(gw: tuple[Server, FakeXAI]) -> None:
    import json as jsonlib

    srv, _ = gw
    token, key = create_key(srv, "logged", credits="1")
    secret_text = "my secret message body 4242"
    r = srv.chat({"model": "grok-3", "messages": user(secret_text)}, token=token)
    assert r.status_code == 200
    request_id = r.headers["x-request-id"]
    lines = [jsonlib.loads(line) for line in srv.log().splitlines() if line.startswith("{")]
    mine = [e for e in lines if e.get("request_id") == request_id]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["msg"] == "chat completion" and entry["level"] == "info"
    assert entry["token"] == key["prefix"]
    assert entry["status"] == 200 and entry["model"] == "grok-3" and entry["backend"] == "up"
    assert entry["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert entry["cost"] > 0 and entry["latency_ms"] > 0
    # The overhead logged is the one the client was told, and a part of the request's latency.
    assert entry["overhead_ms"] == float(r.headers["x-grokgate-overhead-ms"])
    assert 0 < entry["overhead_ms"] <= entry["latency_ms"]
    log_text = srv.log()
    assert token not in log_text and secret_text not in log_text


def test_server_tool_calls_are_counted_as_calls_not_tokens() -> None:
    """Before: `grokgate_tokens_total{kind="server_tool_calls"}` mixed a call count into the token counter."""
    from grokgate.core.events import Usage
    from grokgate.observability.metrics import Metrics

    metrics = Metrics()
    metrics.request_ended(model="grok-4", backend="xai", status=200, stream=False, seconds=0.1, charged=1,
                          usage=Usage(prompt_tokens=10, completion_tokens=5, server_tool_calls=3), endpoint="responses")
    text = metrics.render().decode()
    assert 'grokgate_server_tool_calls_total{model="grok-4"} 3.0' in text
    assert 'kind="server_tool_calls"' not in text and 'grokgate_tokens_total{kind="prompt",model="grok-4"} 10.0' in text
