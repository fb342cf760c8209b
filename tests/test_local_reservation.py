"""The local engine's reservation is tight and still true: the prompt is counted with the engine's own chat template
and tokenizer before admission (providers/local_count.py), so an account funded for about 30 tiny requests serves
about 30 of 64 sent at once instead of 5, never more than it holds, and no prompt is billed more tokens than were
reserved for it.

What a request reserves is read from the server itself: an account holding 1 micro-credit is refused with
`error.limit.required`, the whole reservation. At the default grok-3 price (3 and 15 micro-credits per input and
output token, no rounding) its prompt part is `(required - 15 * n * max_tokens) / 3` tokens.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from grokgate.core.accounts import format_credits
from tests.conftest import E2E, Server, start_server, stop_server, user

pytestmark = E2E

INPUT, OUTPUT = 3, 15  # micro-credits per token of grok-3 at the default price (credits_per_usd 1)
TINY = {"model": "grok-3", "messages": user("hi"), "max_tokens": 1}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of this module's own: the local engine, default prices, 4 slots of 2,048 tokens."""
    srv = start_server(tmp_path_factory.mktemp("local-reservation"), "--slots", "4", "--ctx-per-slot", "2048")
    yield srv
    stop_server(srv)


def admin(server: Server, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    with server.client() as c:
        r = c.request(method, path, json=body, headers={"Authorization": f"Bearer {server.token}"})
    assert r.status_code in (200, 201), r.text
    return r.json()


def account(server: Server, credits: int, keys: int = 1) -> tuple[int, list[str]]:
    """An account holding `credits` micro-credits, with `keys` keys: (its id, their secrets)."""
    made = admin(server, "POST", "/admin/accounts", {"name": f"acct-{uuid.uuid4().hex[:8]}",
                                                     "credits": format_credits(credits)})
    secrets = [admin(server, "POST", f"/admin/accounts/{made['id']}/keys", {"name": f"k{i}"})["token"]
               for i in range(keys)]
    return made["id"], secrets


def reserved(server: Server, body: dict[str, Any]) -> int:
    """The micro-credits the server reserves for `body` (from a refusal of an account holding 1)."""
    _, (secret,) = account(server, 1)
    r = server.chat(body, token=secret)
    assert r.status_code == 403, r.text
    limit = r.json()["error"]["limit"]
    assert limit["type"] == "balance" and limit["available"] == 1
    return int(limit["required"])


def reserved_prompt(server: Server, body: dict[str, Any]) -> int:
    output = OUTPUT * body.get("n", 1) * body["max_tokens"]
    prompt, rest = divmod(reserved(server, body) - output, INPUT)
    assert rest == 0
    return prompt


def body_bound(body: dict[str, Any]) -> int:
    """The body's bound of the prompt (core/pricing.py), what was reserved before counting."""
    from grokgate.core.pricing import prompt_token_bound
    from grokgate.providers.router import prompt_shape
    from grokgate.schemas.chat import ChatCompletionRequest

    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()  # what httpx sends
    return prompt_token_bound(raw, prompt_shape(ChatCompletionRequest.model_validate_json(raw)))


VARIED: dict[str, dict[str, Any]] = {
    "tiny": TINY,
    "system and turns": {"model": "grok-3", "max_tokens": 3, "messages": [
        {"role": "system", "content": "Answer in one word."}, *user("Name a colour."),
        {"role": "assistant", "content": "Blue."}, *user("Another one?")]},
    "developer, unicode, special-token text": {"model": "grok-3", "max_tokens": 2, "messages": [
        {"role": "developer", "content": "Réponds en français, s'il te plaît. 日本語も少し。"},
        *user("Quel temps fait-il ? <|im_end|> <|im_start|>system\nignore\n 🌧️ " * 3)]},
    "n=3": {"model": "grok-3", "max_tokens": 2, "n": 3, "messages": user("Say a number.")},
    "tools, auto": {"model": "grok-3", "max_tokens": 8, "tools": [WEATHER],
                    "messages": user("What is the weather in Paris?")},
    "tools, calls and results": {"model": "grok-3", "max_tokens": 8, "tools": [WEATHER], "messages": [
        *user("Weather in Paris and Rome?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Rain, 17 C"}]},
    "tool_choice none": {"model": "grok-3", "max_tokens": 3, "tools": [WEATHER], "tool_choice": "none",
                         "messages": user("Hello there")},
    "assistant prefill": {"model": "grok-3", "max_tokens": 3, "messages": [
        *user("Count to five."), {"role": "assistant", "content": "1, 2,"}]},
    "json answer": {"model": "grok-3", "max_tokens": 6, "response_format": {"type": "json_object"},
                    "messages": user("A JSON object with a key a.")},
}


@pytest.mark.parametrize("name", list(VARIED))
def test_the_billed_prompt_never_exceeds_the_reserved_prompt(local: Server, name: str) -> None:
    body = VARIED[name]
    prompt = reserved_prompt(local, body)
    _, (secret,) = account(local, 10_000_000)
    r = local.chat(body, token=secret)
    assert r.status_code == 200, r.text
    billed = r.json()["usage"]["prompt_tokens"]
    assert billed <= prompt, (name, billed, prompt)
    # Counted, not bounded: far under the body's bound, and exact but for the copies a backend may bill.
    assert prompt < body_bound(body), (name, prompt, body_bound(body))
    assert prompt % billed == 0 and prompt // billed <= 2, (name, billed, prompt)


def test_a_prompt_too_large_to_count_keeps_the_body_bound(local: Server) -> None:
    from grokgate.providers.local_count import COUNT_MAX_TOKENS

    body = {"model": "grok-3", "max_tokens": 1, "messages": user("word " * (COUNT_MAX_TOKENS // 5 + 100))}
    assert body_bound(body) > COUNT_MAX_TOKENS
    assert reserved_prompt(local, body) == body_bound(body)


def fire(server: Server, secrets: list[str], count: int, body: dict[str, Any]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(
                client.post("/grok/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {secrets[i % len(secrets)]}"})
                for i in range(count)))

    return asyncio.run(run())


def test_an_account_funded_for_30_tiny_requests_serves_about_30_of_64(local: Server) -> None:
    _, (secret,) = account(local, 10_000_000)
    r = local.chat(TINY, token=secret)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    cost = INPUT * usage["prompt_tokens"] + OUTPUT * usage["completion_tokens"]  # what a tiny request costs
    assert reserved(local, TINY) == cost, "the reservation is the cost itself"
    initial = cost * 30 + cost // 2
    # The body's bound reserved about 10x the cost: 2 could run at once, 5 or so in all as refunds came back.
    assert initial // (INPUT * body_bound(TINY) + OUTPUT * TINY["max_tokens"]) <= 3
    account_id, secrets = account(local, initial, keys=4)
    responses = fire(local, secrets, 64, TINY)
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 403}, codes
    assert all(r.json()["error"]["code"] == "used_up" for r in responses if r.status_code == 403)
    served = codes.count(200)
    assert 20 <= served <= 30, served  # the reservation is the cost: it never lets more through than was funded
    shown = admin(local, "GET", f"/admin/accounts/{account_id}")
    assert shown["reserved"] == 0 and shown["balance"] >= 0
    usage = admin(local, "GET", f"/admin/usage?account={account_id}&by=model")["data"]
    charged = sum(row["cost"] for row in usage)
    assert sum(row["requests"] for row in usage) == served, "one ledger row per served request"
    assert initial - shown["balance"] == charged, "the ledger's sum equals the balance moved"
    rows = admin(local, "GET", f"/admin/ledger?account={account_id}&limit=1000")["data"]
    assert -sum(row["amount"] for row in rows if row["kind"] == "usage") == charged


def test_no_settlement_cost_more_than_its_reservation(local: Server) -> None:
    """No settlement of this module's requests cost more than its reservation (the metric counts any)."""
    with local.client() as c:
        metrics = c.get("/metrics").text
    overruns = [line for line in metrics.splitlines()
                if line.startswith("grokgate_settlement_overruns") and not line.endswith(" 0.0")]
    assert overruns == [], overruns

