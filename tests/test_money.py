"""Money that must not be given away (issue 9, items 1 and 2) and stalls that must open a breaker (item 10).

grokgate runs with accounts on (SQLite, and PostgreSQL for the reproduction) in front of the fake xAI upstream,
whose knobs make it report a prompt as large as the body it received, omit usage, or stall before its headers.
The app is served in this process (tests/inproc.py): what these tests show is the app's arithmetic and routing,
whatever the serving process; its log is the `grokgate` logger's records during the test, formatted as
`grokgate serve` writes them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from grokgate.app import create_app
from grokgate.observability.logging import JSONFormatter
from tests.conftest import E2E, create_key, parse_sse, raw_request, read_until, user
from tests.fakes.fake_xai import FakeXAI
from tests.inproc import AppServer, app_settings, logged, serve_app

KEYS = {"XAI_A": "key-a", "XAI_B": "key-b"}
OUTPUT_RESERVATION = 1000  # GROKGATE_DEFAULT_OUTPUT_RESERVATION for these servers


def write_config(tmp: Path, main: FakeXAI, stalling: FakeXAI, lax: FakeXAI) -> Path:
    path = tmp / "money.yaml"
    path.write_text(f"""
backends:
  up:
    kind: xai
    base_url: {main.url}
    api_key_env: XAI_A
  fan:
    kind: openai
    base_url: {main.url}
    api_key_env: XAI_A
    fanout_n: true
  slow:
    kind: xai
    base_url: {stalling.url}
    api_key_env: XAI_B
    timeout: 1
    failure_threshold: 2
    cooldown: 600
  spare:
    kind: xai
    base_url: {main.url}
    api_key_env: XAI_A
    timeout: 1
  lax:
    kind: openai
    base_url: {lax.url}
    api_key_env: XAI_A
models:
  grok-3: [{{backend: up}}]
  grok-2-vision: [{{backend: up}}]
  fanned: [{{backend: fan, model: grok-3}}]
  stalling: [{{backend: slow, model: grok-3}}, {{backend: spare, model: grok-3, priority: 1}}]
  lax: [{{backend: lax, model: grok-3}}]
""")
    return path


Fakes = tuple[FakeXAI, FakeXAI, FakeXAI]


@pytest.fixture(scope="module")
def fakes() -> Iterator[Fakes]:
    # The main upstream, one that stalls, and one that does not check parameters as xAI does (strict=False).
    with (FakeXAI(api_keys=["key-a"]).start() as main, FakeXAI(api_keys=["key-b"]).start() as stalling,
          FakeXAI(api_keys=["key-a"], strict=False).start() as lax):
        yield main, stalling, lax


def serve(tmp: Path, fakes: Fakes, **settings: Any) -> AbstractContextManager[AppServer]:
    """The app in this process, routed by the money config (the upstream keys come from the environment:
    `keys`), with accounts on SQLite under `tmp` unless `settings` say otherwise."""
    config = write_config(tmp, *fakes)
    return serve_app(create_app(app_settings(tmp, config=config, default_output_reservation=OUTPUT_RESERVATION,
                                             **settings)))


@pytest.fixture(scope="module")
def keys() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in KEYS.items():
            mp.setenv(name, value)
        yield


@contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """This process's stderr (file descriptor 2) goes to `path` meanwhile: what it starts inherits that."""
    saved = os.dup(2)
    try:
        with path.open("ab") as f:
            os.dup2(f.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, fakes: Fakes, keys: None) -> Iterator[AppServer]:
    """The app on SQLite. Its SQLite writer process (store/sqlite_writer.py) logs to its stderr, which under
    `grokgate serve` is the server's log: here a file, kept in `extra["stderr"]`."""
    tmp = tmp_path_factory.mktemp("money")
    with ExitStack() as stack:
        with stderr_to(tmp / "stderr.log"):  # the app's start spawns the writer
            srv = stack.enter_context(serve(tmp, fakes))
        srv.extra["stderr"] = tmp / "stderr.log"
        yield srv


@pytest.fixture(autouse=True)
def logs() -> Iterator[list[logging.LogRecord]]:
    """The `grokgate` logger's records during the test (INFO and up, as `grokgate serve` logs)."""
    with logged("grokgate") as records:
        yield records


def log_text(server: AppServer, records: list[logging.LogRecord]) -> str:
    """The server's log: the records as `grokgate serve` writes them (one JSON object per line, extras such as
    the request id included), and what its child processes wrote to their stderr."""
    formatter = JSONFormatter()
    stderr = server.extra.get("stderr")
    return "\n".join([*(formatter.format(r) for r in records), stderr.read_text() if stderr else ""])


@pytest.fixture
def fake(fakes: Fakes) -> FakeXAI:
    for f in fakes:
        f.reset()
    return fakes[0]


# -- helpers -----------------------------------------------------------------------------------------------------

def admin(server: AppServer, method: str, path: str, **kwargs: Any) -> Any:
    with server.client() as c:
        r = c.request(method, path, headers={"Authorization": f"Bearer {server.token}"}, **kwargs)
    assert r.status_code in (200, 201), r.text
    return r.json()


def price(server: AppServer, model: str) -> dict[str, int]:
    current: dict[str, int] = {p["model"]: p for p in admin(server, "GET", "/admin/prices")["current"]}[model]
    return current


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def reservation(p: dict[str, int], prompt_tokens: int, choices: int, output: int) -> int:
    """The documented reservation: the prompt bound priced uncached, plus every choice at its output bound."""
    return ceil_div(prompt_tokens * p["input"], 10**6) + ceil_div(choices * output * p["output"], 10**6)


def prompt_bound(raw: bytes, messages: int, images: int = 0, image_urls: int = 0, copies: int = 1) -> int:
    """An independent statement of the rule documented in core/pricing.py: every body byte and every JSON
    separator a template may re-render with a space, framing per message and per image, one template overhead."""
    from grokgate.core.pricing import IMAGE_TOKENS, MESSAGE_TOKENS, TEMPLATE_TOKENS

    text = len(raw) - image_urls + raw.count(b",") + raw.count(b":")
    return copies * (text + messages * MESSAGE_TOKENS + images * IMAGE_TOKENS + TEMPLATE_TOKENS)


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def post(server: AppServer, raw: bytes, token: str) -> httpx.Response:
    with server.client() as c:
        return c.post("/grok/chat/completions", content=raw,
                      headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})


def refused(r: httpx.Response) -> None:
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "used_up"


def usage_rows(server: AppServer, key_id: int, expect: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = [r for r in admin(server, "GET", f"/admin/ledger?token={key_id}&limit=10000")["data"]
                if r["kind"] == "usage"]
        if len(rows) >= expect:
            break
        time.sleep(0.05)
    return rows


def check_books(server: AppServer, key_id: int, initial: int) -> list[dict[str, Any]]:
    """Nothing held, every usage row charged its full cost, and the ledger's sum equals the balance moved."""
    key = admin(server, "GET", f"/admin/keys/{key_id}")
    rows = usage_rows(server, key_id, expect=0)
    assert key["reserved"] == 0
    assert all(r["amount"] == -r["cost"] for r in rows), [(r["amount"], r["cost"], r["note"]) for r in rows]
    assert initial - key["balance"] == sum(r["cost"] for r in rows)
    return rows


def big_tools(size: int) -> list[dict[str, Any]]:
    """About `size` bytes of function definitions in 100 tools (xAI accepts at most 128), shaped as clients send."""
    count = 100
    tool = {"type": "function", "function": {"name": "t", "description": "Looks things up. " * (size // count // 17),
                                             "parameters": {"type": "object", "properties": {
                                                 "q": {"type": "string", "description": "what to look up"}}}}}
    return [{**tool, "function": {**tool["function"], "name": f"tool_{i}"}} for i in range(count)]


# -- pure arithmetic -----------------------------------------------------------------------------------------------

def test_prompt_bound_covers_tools_re_rendered_by_a_template() -> None:
    from grokgate.core.pricing import PromptShape, prompt_token_bound

    tools = big_tools(20_000)
    raw = encode({"model": "grok-3", "messages": user("hi"), "tools": tools})
    # Chat templates render tools with `tojson`, i.e. Python's json.dumps separators (", " and ": "), which is
    # longer than the compact body; a byte-level BPE tokenizer emits at most one token per byte of that.
    rendered = sum(len(json.dumps(t).encode()) for t in tools) + len("hi")
    bound = prompt_token_bound(raw, PromptShape(messages=1))
    assert bound >= rendered > len(raw)


def test_output_estimate_counts_bytes_not_events() -> None:
    from grokgate.core.pricing import estimate_output_tokens

    assert estimate_output_tokens(0) == 0
    assert estimate_output_tokens(10_000) == 3334
    assert estimate_output_tokens(len("é".encode()) * 3) == 2


# -- item 1: the reservation is an upper bound of the cost -----------------------------------------------------------

def fire(server: AppServer, token: str, raw: bytes, count: int) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300, verify=False) as c:
            return await asyncio.gather(*(c.post("/grok/chat/completions", content=raw, headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"}) for _ in range(count)))

    return asyncio.run(run())


def reproduction(server: AppServer, fake: FakeXAI, credits: str, initial: int,
                 logs: list[logging.LogRecord]) -> tuple[list[int], list[dict[str, Any]]]:
    """Issue 9 item 1: 20 concurrent requests with 1 MB of tools, the upstream counting body bytes / 4."""
    fake.header_defaults["x-fake-prompt-from-body"] = "1"
    token, key = create_key(server, f"tools-{credits}", credits=credits)
    raw = encode({"model": "grok-3", "messages": user("hi"), "tools": big_tools(1 << 20), "tool_choice": "none",
                  "max_tokens": 1})
    responses = fire(server, token, raw, 20)
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 403}, [r.text[:200] for r in responses if r.status_code not in (200, 403)]
    assert all(r.json()["error"]["code"] == "used_up" for r in responses if r.status_code == 403)
    rows = check_books(server, key["id"], initial)
    assert len(rows) == codes.count(200)
    for r in responses:
        if r.status_code == 200:  # the client saw what the upstream counted, and was charged that
            assert r.json()["usage"]["prompt_tokens"] >= 250_000
    assert "capped at the balance" not in log_text(server, logs)
    return codes, rows


def test_large_tools_on_a_tiny_balance_are_refused_up_front(gw: AppServer, fake: FakeXAI,
                                                            logs: list[logging.LogRecord]) -> None:
    codes, rows = reproduction(gw, fake, "0.01", 10_000, logs)
    assert codes == [403] * 20 and rows == []


def test_large_tools_are_charged_in_full_when_funded(gw: AppServer, fake: FakeXAI,
                                                     logs: list[logging.LogRecord]) -> None:
    # Enough for a few at a time: those served pay everything the upstream counted; the rest are refused.
    codes, rows = reproduction(gw, fake, "5", 5_000_000, logs)
    assert codes.count(200) >= 1
    p = price(gw, "grok-3")
    assert all(r["cost"] >= ceil_div(r["prompt_tokens"] * p["input"], 10**6) for r in rows)
    assert all(r["prompt_tokens"] >= 250_000 for r in rows)


@E2E
def test_large_tools_on_postgresql(tmp_path_factory: pytest.TempPathFactory, fakes: Fakes, keys: None,
                                   pg_url: str, logs: list[logging.LogRecord]) -> None:
    for f in fakes:
        f.reset()
    with serve(tmp_path_factory.mktemp("money-pg"), fakes, database_url=pg_url) as srv:
        codes, _ = reproduction(srv, fakes[0], "0.01", 10_000, logs)
        assert codes == [403] * 20


def test_reservation_is_the_documented_bound_and_no_more(gw: AppServer, fake: FakeXAI) -> None:
    p = price(gw, "grok-3")
    raw = encode({"model": "grok-3", "messages": [{"role": "system", "content": "Be brief, please: always."},
                                                  *user("hi")], "max_tokens": 7})
    needed = reservation(p, prompt_bound(raw, messages=2), 1, 7)
    token, key = create_key(gw, "exact", credits=f"{needed - 1}e-6")
    refused(post(gw, raw, token))
    admin(gw, "POST", f"/admin/keys/{key['id']}/credits", json={"amount": "0.000001"})
    assert post(gw, raw, token).status_code == 200
    check_books(gw, key["id"], needed)


def test_an_image_reserves_its_bound_whatever_its_url_size(gw: AppServer, fake: FakeXAI) -> None:
    p = price(gw, "grok-2-vision")
    url = "data:image/png;base64," + "A" * 200_000
    raw = encode({"model": "grok-2-vision", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    needed = reservation(p, prompt_bound(raw, messages=1, images=1, image_urls=len(url)), 1, 5)
    token, key = create_key(gw, "image", credits=f"{needed - 1}e-6")
    refused(post(gw, raw, token))
    admin(gw, "POST", f"/admin/keys/{key['id']}/credits", json={"amount": "0.000001"})
    assert post(gw, raw, token).status_code == 200
    check_books(gw, key["id"], needed)


def test_a_fanned_out_request_reserves_one_prompt_per_choice(gw: AppServer, fake: FakeXAI) -> None:
    # A backend that ignores n gets n requests, each billing the prompt: the reservation covers n prompts.
    p = price(gw, "fanned")
    raw = encode({"model": "fanned", "messages": user("one two three"), "n": 3, "max_tokens": 4})
    needed = reservation(p, prompt_bound(raw, messages=1, copies=3), 3, 4)
    token, key = create_key(gw, "fanned", credits=f"{needed - 1}e-6")
    refused(post(gw, raw, token))
    admin(gw, "POST", f"/admin/keys/{key['id']}/credits", json={"amount": "0.000001"})
    r = post(gw, raw, token)
    assert r.status_code == 200, r.text
    assert len(fake.chat_requests) == 3
    check_books(gw, key["id"], needed)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_without_max_tokens_asks_the_upstream_for_the_reserved_output(gw: AppServer, fake: FakeXAI,
                                                                               stream: bool) -> None:
    token, _ = create_key(gw, "no-max", credits="1")
    r = gw.chat({"model": "grok-3", "messages": user("Hi"), "n": 2, "stream": stream}, token=token)
    assert r.status_code == 200, r.text
    assert fake.chat_requests[-1]["body"]["max_completion_tokens"] == OUTPUT_RESERVATION
    assert "max_tokens" not in fake.chat_requests[-1]["body"]


def test_max_tokens_and_max_completion_tokens_agree_upstream(gw: AppServer, fakes: Fakes) -> None:
    # The reservation covers max_completion_tokens (it wins); an OpenAI-compatible upstream that reads only
    # max_tokens (llama.cpp's server, say) must not be told the larger one.
    lax = fakes[2]
    lax.reset()
    r = gw.chat({"model": "lax", "messages": user("Hi"), "max_tokens": 50, "max_completion_tokens": 3})
    assert r.status_code == 200, r.text
    sent = lax.chat_requests[-1]["body"]
    assert sent["max_completion_tokens"] == 3 and sent["max_tokens"] == 3


def test_a_cost_above_the_reservation_is_an_error_and_a_metric(gw: AppServer, fake: FakeXAI,
                                                               logs: list[logging.LogRecord]) -> None:
    # Unreachable with an honest upstream; one that reports far more prompt than it was sent makes it happen.
    fake.header_defaults["x-fake-prompt-tokens"] = "10000000"
    token, key = create_key(gw, "overrun", credits="1")
    r = gw.chat({"model": "grok-3", "messages": user("Hi"), "max_tokens": 5}, token=token)
    assert r.status_code == 200, r.text
    [row] = usage_rows(gw, key["id"])
    assert row["cost"] > 1_000_000 and row["amount"] == -1_000_000, "charged what the balance held"
    log = log_text(gw, logs)
    assert "settlement cost exceeds the reservation" in log and row["request_id"] in log
    assert "settlement capped at the balance" in log
    with gw.client() as c:
        metrics = c.get("/metrics").text
    assert 'grokgate_settlement_overruns_total{model="grok-3"} 1.0' in metrics


# -- item 2: an upstream that omits usage is billed from the text ---------------------------------------------------

ANSWER_CHARS = 10_000
LONG = {"model": "grok-3", "messages": user("Write a lot."), "max_tokens": 5000}  # about 1,850 of the fake's words


def no_usage(fake: FakeXAI) -> None:
    fake.header_defaults["x-fake-fault"] = "no_usage"
    fake.header_defaults["x-fake-content-chars"] = str(ANSWER_CHARS)


def ledger_usage(row: dict[str, Any]) -> tuple[int, int]:
    return row["prompt_tokens"], row["completion_tokens"]


def test_missing_usage_non_stream_is_estimated_from_the_text(gw: AppServer, fake: FakeXAI) -> None:
    no_usage(fake)
    token, key = create_key(gw, "no-usage", credits="1")
    r = gw.chat(LONG, token=token)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert len(r.json()["choices"][0]["message"]["content"]) == ANSWER_CHARS
    assert usage["completion_tokens"] >= math.ceil(ANSWER_CHARS / 3)
    assert usage["prompt_tokens"] > 0
    [row] = usage_rows(gw, key["id"])
    assert row["estimated"] is True
    assert ledger_usage(row) == (usage["prompt_tokens"], usage["completion_tokens"]), "the client sees the charge"
    check_books(gw, key["id"], 1_000_000)


def test_missing_usage_stream_is_estimated_and_shown_in_the_usage_chunk(gw: AppServer, fake: FakeXAI) -> None:
    no_usage(fake)
    token, key = create_key(gw, "no-usage-stream", credits="1")
    body = {**LONG, "stream": True, "stream_options": {"include_usage": True}}
    with gw.client() as c, c.stream("POST", "/grok/chat/completions",
                                                headers={"Authorization": f"Bearer {token}"}, json=body) as r:
        sse = parse_sse(r.read().decode())
    assert sse.events[-1] == "[DONE]"
    usage = sse.chunks[-1]["usage"]
    assert usage["completion_tokens"] >= math.ceil(ANSWER_CHARS / 3)
    [row] = usage_rows(gw, key["id"])
    assert row["estimated"] is True
    assert ledger_usage(row) == (usage["prompt_tokens"], usage["completion_tokens"])
    check_books(gw, key["id"], 1_000_000)


def test_a_stream_cut_short_without_usage_is_billed_from_its_text(gw: AppServer, fake: FakeXAI) -> None:
    no_usage(fake)
    fake.fail_next({"fault": "reset_mid_stream", "after": 3})
    token, key = create_key(gw, "cut", credits="1")
    with gw.client() as c, c.stream("POST", "/grok/chat/completions",
                                                headers={"Authorization": f"Bearer {token}"},
                                                json={**LONG, "stream": True}) as r:
        sse = parse_sse(r.read().decode())
    delivered = sum(len(ch["delta"].get("content") or "") for c in sse.chunks for ch in c.get("choices", ()))
    assert delivered >= ANSWER_CHARS // 5 and "error" in sse.chunks[-1]
    [row] = usage_rows(gw, key["id"])
    assert row["estimated"] is True and row["status"] == "error"
    assert row["completion_tokens"] >= math.ceil(delivered / 3)
    check_books(gw, key["id"], 1_000_000)


def test_client_hanging_up_is_billed_for_the_text_it_was_sent(gw: AppServer, fake: FakeXAI) -> None:
    no_usage(fake)
    fake.header_defaults["x-fake-chunk-delay-ms"] = "300"
    token, key = create_key(gw, "hangs-up", credits="1")
    with raw_request(gw, {**LONG, "stream": True}, token) as sock:
        read_until(sock, b'"content":"', 3)  # the role delta's "" and two pieces of 2,000 characters
    [row] = usage_rows(gw, key["id"])
    assert row["estimated"] is True and row["status"] == "client_disconnected"
    assert row["completion_tokens"] >= math.ceil(2 * ANSWER_CHARS / 5 / 3)
    check_books(gw, key["id"], 1_000_000)


# -- item 10: a stall before the first event counts against the backend ----------------------------------------------

def backend_state(server: AppServer, name: str) -> str:
    with server.client() as c:
        state: str = c.get("/readyz").json()["backends"][name]["state"]
    return state


def test_stalls_before_the_first_event_open_the_breaker(gw: AppServer, fakes: Fakes) -> None:
    main, stalling, _ = fakes
    for f in fakes:
        f.reset()
    # The slow backend answers only after its route's whole deadline (1 s): each such request is a 504.
    stalling.header_defaults["x-fake-fault"] = "stall;seconds=5"
    for _ in range(2):  # the slow backend's failure_threshold
        r = gw.chat({"model": "stalling", "messages": user("Hi")})
        assert r.status_code == 504, r.text
    assert backend_state(gw, "slow") == "open"
    stalled = len(stalling.chat_requests)
    r = gw.chat({"model": "stalling", "messages": user("Hi")})
    assert r.status_code == 200, r.text
    assert len(stalling.chat_requests) == stalled, "the open breaker skips the stalling backend"
    assert len(main.chat_requests) == 1, "the spare served"
