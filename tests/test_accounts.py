"""Accounts over HTTP on SQLite and PostgreSQL: admin API, credits, exact charges, used_up, prices, usage.

The app runs in process (tests/inproc.py) on a real SQLite file and a real PostgreSQL database: what these tests
show is the accounts layer's, whatever serves the tokens, so a scripted provider answers (one that reports a prompt
it saw before as partly cached, as the engine's prompt cache does). The one test about the real model's tokens
(the reservation covers a prompt that is mostly chat template) runs on the shared server's local engine.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import re
import time
import uuid
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import httpx
import pytest

from grokgate.core.accounts import format_credits
from grokgate.core.events import Event, UsageReport
from grokgate.providers.base import Call
from tests.conftest import E2E, PG_ADMIN_URL, TOKEN, Server, _pg_execute, call, create_key, err, ok, user
from tests.inproc import AppServer, ScriptedProvider, app_server, scripted_models

FAST = "grok-4-1-fast"
USED_UP = ("Your balance is not sufficient for current request, please buy more in Ace Data Cloud "
           "https://platform.acedata.cloud")
COUNTERS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "cost")
RECORD_FIELDS = {"id", "name", "prefix", "created_at", "expires_at", "disabled", "allowed_models", "rpm", "tpm",
                 "max_concurrency", "balance", "reserved", "balance_credits", "account_id", "account_name", "spend",
                 "rotated_at", "previous_valid_until"}
CACHED = 3  # of the scripted provider's 7 prompt tokens, when it saw the prompt before


class CachingProvider(ScriptedProvider):
    """Says its text word by word (tests/inproc.py) and reports a prompt it saw before as partly cached, so every
    token class of the price is charged."""

    def __init__(self) -> None:
        super().__init__(text="Hello there from the accounts script")
        self.seen: set[str] = set()

    async def say(self, call: Call, upstream_model: str) -> AsyncGenerator[Event]:
        prompt = call.request.model_dump_json(include={"messages"})
        cached = CACHED if prompt in self.seen else 0
        self.seen.add(prompt)
        async for event in super().say(call, upstream_model):
            if isinstance(event, UsageReport):
                event = UsageReport(dataclasses.replace(event.usage, cached_tokens=cached))
            yield event


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=E2E)])
def srv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """One app per database for the whole module, served in this process."""
    settings, db = {}, None
    if request.param == "postgresql":
        db = f"grokgate_test_{uuid.uuid4().hex[:12]}"
        try:
            _pg_execute(f'CREATE DATABASE "{db}"')
        except (OSError, TimeoutError) as exc:
            pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
        settings["database_url"] = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{db}"
    try:
        with app_server(tmp_path_factory.mktemp(f"accounts-{request.param}"), scripted_models(CachingProvider()),
                        **settings) as server:
            yield server
    finally:
        if db:
            _pg_execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


# -- helpers -----------------------------------------------------------------------------------------------

Srv = AppServer | Server  # the module's apps in process; the shared server for the real model's test


def api(srv: Srv, method: str, path: str, token: str | None = TOKEN, **kwargs: Any) -> httpx.Response:
    return call(srv, method, path, token, **kwargs)  # type: ignore[arg-type]


def new_key(srv: Srv, credits: str | None = None, name: str | None = None,
            **fields: Any) -> tuple[str, dict[str, Any]]:
    return create_key(srv, name or f"t-{uuid.uuid4().hex[:10]}", credits, **fields)  # type: ignore[arg-type]


def record(srv: Srv, ref: int | str) -> dict[str, Any]:
    result: dict[str, Any] = ok(api(srv, "GET", f"/admin/keys/{ref}"))
    return result


def chat(srv: Srv, token: str, model: str = FAST, max_tokens: int = 2, text: str = "hi") -> httpx.Response:
    return srv.chat({"model": model, "messages": user(text), "max_tokens": max_tokens}, token=token)


def prices(srv: Srv) -> dict[str, Any]:
    result: dict[str, Any] = ok(api(srv, "GET", "/admin/prices"))
    return result


def price(srv: Srv, model: str) -> dict[str, Any]:
    return next(p for p in prices(srv)["current"] if p["model"] == model)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def cost(usage: dict[str, Any], p: dict[str, Any]) -> int:
    """An independent re-implementation of the documented pricing: rounded up per token class."""
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    fresh = usage["prompt_tokens"] - cached
    return (ceil_div(fresh * p["input"], 10**6) + ceil_div(cached * p["cached_input"], 10**6)
            + ceil_div(usage["completion_tokens"] * p["output"], 10**6))


def reservation(p: dict[str, Any], text: str, max_tokens: int, n: int = 1) -> int:
    """What admission reserves: the prompt's upper bound from the body's bytes (core/pricing.py), priced
    uncached, plus n * max_tokens at the output price, each rounded up."""
    from grokgate.core.pricing import PromptShape, prompt_token_bound

    body = {"model": p["model"], "messages": user(text), "max_tokens": max_tokens}  # what chat() sends
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()  # httpx's encoding
    prompt = prompt_token_bound(raw, PromptShape(messages=1))
    return ceil_div(prompt * p["input"], 10**6) + ceil_div(n * max_tokens * p["output"], 10**6)


def usage_data(srv: Srv, path: str, token: str | None = TOKEN) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = ok(api(srv, "GET", path, token=token))["data"]
    return data


# -- 1. the admin API ----------------------------------------------------------------------------------------

def test_create_list_show_and_the_secret_is_shown_once(srv: Srv) -> None:
    secret, key = new_key(srv, allowed_models=["grok-3"], rpm=50)
    assert re.fullmatch(r"gg-[A-Za-z0-9_-]{40,}", secret)
    assert set(key) == RECORD_FIELDS
    assert (key["prefix"], key["balance"], key["reserved"], key["balance_credits"]) == (secret[:11], 0, 0, "0")
    assert (key["allowed_models"], key["rpm"], key["disabled"], key["expires_at"]) == (["grok-3"], 50, False, None)
    listing = api(srv, "GET", "/admin/keys")
    mine = [k for k in ok(listing)["data"] if k["id"] == key["id"]]
    assert mine == [key]
    for text in (listing.text, api(srv, "GET", f"/admin/keys/{key['id']}").text):
        assert secret not in text and secret[11:] not in text
        assert hashlib.sha256(secret.encode()).hexdigest() not in text
    for ref in (key["id"], key["name"], key["prefix"]):
        assert record(srv, ref) == key
    twin, _ = new_key(srv, name=key["name"])
    ambiguous = err(api(srv, "GET", f"/admin/keys/{key['name']}"), 409, "ambiguous_reference")
    assert "matches 2 tokens" in ambiguous["message"]
    assert record(srv, twin[:11])["id"] != key["id"]


def test_update_applies_at_once_despite_the_token_cache(srv: Srv) -> None:
    secret, key = new_key(srv, "1")
    first = chat(srv, secret)  # the lookup is now cached inside the server
    assert first.status_code == 200, first.text
    assert "x-ratelimit-limit-requests" not in first.headers
    key = record(srv, key["id"])
    new_name = f"renamed-{uuid.uuid4().hex[:8]}"
    changes = {"name": new_name, "rpm": 1, "tpm": 100_000, "max_concurrency": 3, "allowed_models": [FAST, "grok-3"]}
    updated = ok(api(srv, "PATCH", f"/admin/keys/{key['id']}", json=changes))
    assert updated == {**key, **changes}
    assert record(srv, new_name) == updated
    err(api(srv, "GET", f"/admin/keys/{key['name']}"), 404, "token_not_found")
    r = chat(srv, secret)
    assert r.status_code == 200, r.text
    assert (r.headers["x-ratelimit-limit-requests"], r.headers["x-ratelimit-limit-tokens"]) == ("1", "100000")
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    err(chat(srv, secret), 429, "too_many_requests")


def test_disable_enable_delete_take_effect_immediately(srv: Srv) -> None:
    secret, key = new_key(srv, "1")
    assert chat(srv, secret).status_code == 200
    assert ok(api(srv, "PATCH", f"/admin/keys/{key['id']}", json={"disabled": True}))["disabled"] is True
    err(chat(srv, secret), 403, "disabled")
    err(api(srv, "GET", "/v1/balance", token=secret), 403, "disabled")
    assert ok(api(srv, "PATCH", f"/admin/keys/{key['id']}", json={"disabled": False}))["disabled"] is False
    assert chat(srv, secret).status_code == 200
    assert ok(api(srv, "DELETE", f"/admin/keys/{key['id']}")) == {"deleted": True, "id": key["id"]}
    err(chat(srv, secret), 401, "invalid_token")
    err(api(srv, "GET", "/v1/balance", token=secret), 401, "invalid_token")
    err(api(srv, "GET", f"/admin/keys/{key['id']}"), 404, "token_not_found")
    assert key["id"] not in [k["id"] for k in ok(api(srv, "GET", "/admin/keys"))["data"]]


def test_expired_key_is_refused_until_extended(srv: Srv) -> None:
    secret, key = new_key(srv, "1")
    assert chat(srv, secret).status_code == 200
    past = int(time.time()) - 60
    assert ok(api(srv, "PATCH", f"/admin/keys/{key['id']}", json={"expires_at": past}))["expires_at"] == past
    err(chat(srv, secret), 401, "token_expired")
    future = int(time.time()) + 3600
    assert ok(api(srv, "PATCH", f"/admin/keys/{key['id']}", json={"expires_at": future}))["expires_at"] == future
    assert chat(srv, secret).status_code == 200
    assert ok(api(srv, "PATCH", f"/admin/keys/{key['id']}", json={"expires_at": None}))["expires_at"] is None
    born_expired, _ = new_key(srv, "1", expires_at=past)
    err(chat(srv, born_expired), 401, "token_expired")


def test_allowed_models(srv: Srv) -> None:
    secret, key = new_key(srv, "1", allowed_models=["grok-3"])
    error = err(chat(srv, secret, model=FAST), 403, "model_not_allowed")
    assert f"'{FAST}'" in error["message"] and error["param"] == "model"
    assert record(srv, key["id"])["balance"] == 1_000_000
    ok(api(srv, "PATCH", f"/admin/keys/{key['id']}", json={"allowed_models": [FAST]}))
    assert chat(srv, secret, model=FAST).status_code == 200
    ok(api(srv, "PATCH", f"/admin/keys/{key['id']}", json={"allowed_models": []}))
    assert "allowed: none" in err(chat(srv, secret, model=FAST), 403, "model_not_allowed")["message"]


def test_admin_api_needs_the_admin_token(srv: Srv) -> None:
    secret, _ = new_key(srv)
    count = len(ok(api(srv, "GET", "/admin/keys"))["data"])
    free = {"input": "0", "cached_input": "0", "output": "0"}
    calls = [("GET", "/admin/keys", None), ("POST", "/admin/keys", {"name": "intruder"}),
             ("GET", "/admin/prices", None), ("PUT", "/admin/prices/grok-3", free), ("GET", "/admin/usage", None),
             ("GET", "/admin/ledger", None)]
    for method, path, body in calls:
        err(api(srv, method, path, token=secret, json=body), 403, "forbidden")
        err(api(srv, method, path, token=None, json=body), 400, "no_token")
        err(api(srv, method, path, token="gg-not-a-real-token", json=body), 401, "invalid_token")
    assert len(ok(api(srv, "GET", "/admin/keys"))["data"]) == count
    assert price(srv, "grok-3")["input"] > 0


# -- 2. bad admin input changes nothing -------------------------------------------------------------------

def test_unknown_token_refs_are_404(srv: Srv) -> None:
    for ref in ("999999", "no-such-key", "gg-nosuchkey"):
        for method, path, body in [("GET", "", None), ("PATCH", "", {"rpm": 5}), ("DELETE", "", None),
                                   ("POST", "/credits", {"amount": "1"})]:
            err(api(srv, method, f"/admin/keys/{ref}{path}", json=body), 404, "token_not_found")
        err(api(srv, "GET", "/admin/usage", params={"token": ref}), 404, "token_not_found")


@pytest.mark.parametrize("amount", ["-1", "0", 0, -3, "abc", "", "1.0000001", 1e-7, "NaN", "Infinity", "1e400", None])
def test_bad_credit_amounts_change_nothing(srv: Srv, amount: Any) -> None:
    _, key = new_key(srv, "2")
    error = err(api(srv, "POST", f"/admin/keys/{key['id']}/credits", json={"amount": amount}), 400, "bad_request")
    assert error["param"] == "amount"
    assert record(srv, key["id"])["balance"] == 2_000_000


def test_boolean_amount_is_refused(srv: Srv) -> None:
    _, key = new_key(srv, "2")
    err(api(srv, "POST", f"/admin/keys/{key['id']}/credits", json={"amount": True}), 400, "bad_request")
    assert record(srv, key["id"])["balance"] == 2_000_000


def test_bad_key_creation_creates_nothing(srv: Srv) -> None:
    before = ok(api(srv, "GET", "/admin/keys"))["data"]
    bad = [({"name": "x", "secret": "mine"}, "secret"), ({"name": "x", "credits": "-1"}, "credits"),
           ({"name": "x", "credits": "1.0000001"}, "credits"), ({"name": "x", "rpm": 0}, "rpm"),
           ({"name": ""}, "name"), ({}, "name")]
    for body, param in bad:
        assert err(api(srv, "POST", "/admin/keys", json=body), 400, "bad_request")["param"] == param
    assert ok(api(srv, "GET", "/admin/keys"))["data"] == before


@pytest.mark.parametrize("body", [{"disabled": None}, {"name": None}, {"expires_at": 10**17}, {"rpm": 2**40}],
                         ids=["disabled-null", "name-null", "expires_at-1e17", "rpm-2**40"])
def test_unstorable_patch_values_are_400(srv: Srv, body: dict[str, Any]) -> None:
    _, key = new_key(srv)
    err(api(srv, "PATCH", f"/admin/keys/{key['id']}", json=body), 400, "bad_request")
    assert record(srv, key["id"]) == key


def test_malformed_prices_add_no_version(srv: Srv) -> None:
    before = prices(srv)
    good = {"input": "1", "cached_input": "0.5", "output": "2"}
    bad = [({**good, "input": "-1"}, "input"), ({**good, "output": "abc"}, "output"),
           ({**good, "cached_input": "0.0000001"}, "cached_input"), ({"input": "1", "output": "2"}, "cached_input"),
           ({**good, "extra": "1"}, "extra"), ({**good, "input": None}, "input")]
    for body, param in bad:
        assert err(api(srv, "PUT", "/admin/prices/grok-3", json=body), 400, "bad_request")["param"] == param
    assert prices(srv) == before


# -- 3. credits, balance and exact charges ------------------------------------------------------------------

def test_topups_add_exactly_and_show_in_every_view(srv: Srv) -> None:
    secret, key = new_key(srv, "2.25")
    assert key["balance"] == 2_250_000
    path = f"/admin/keys/{key['id']}/credits"
    assert ok(api(srv, "POST", path, json={"amount": "1.5", "note": "top-up"}))["balance"] == 3_750_000
    assert ok(api(srv, "POST", path, json={"amount": 2}))["balance"] == 5_750_000
    after = ok(api(srv, "POST", path, json={"amount": "0.000001"}))
    assert (after["balance"], after["balance_credits"]) == (5_750_001, "5.750001")
    assert record(srv, key["id"]) == after
    expected = {"object": "balance", "token": {"id": key["id"], "name": key["name"], "prefix": key["prefix"]},
                "balance": 5_750_001, "reserved": 0, "balance_credits": "5.750001", "unit": "micro-credits",
                "account": {"id": key["account_id"], "name": key["name"]}, "key": key["spend"]}
    for path in ("/v1/balance", "/grok/balance"):
        r = api(srv, "GET", path, token=secret)
        assert ok(r) == expected and secret not in r.text


def test_requests_are_charged_exactly(srv: Srv) -> None:
    secret, key = new_key(srv, "1")
    balance = key["balance"]
    total = 0
    for repeat in (False, True):  # the same prompt twice: the second reuses cached prompt tokens
        p = price(srv, "grok-3")
        r = chat(srv, secret, model="grok-3", max_tokens=3, text="Say hello")
        usage = ok(r)["usage"]
        assert (usage["prompt_tokens_details"]["cached_tokens"] > 0) is repeat, usage
        charge = cost(usage, p)
        assert charge > 0
        after = record(srv, key["id"])
        assert (balance - after["balance"], after["reserved"]) == (charge, 0)
        balance, total = after["balance"], total + charge
    assert [row["cost"] for row in usage_data(srv, f"/admin/usage?token={key['id']}&by=model")] == [total]


# -- 4. used_up ------------------------------------------------------------------------------------------------

def test_used_up_when_the_balance_is_short_of_the_reservation(srv: Srv) -> None:
    text, max_tokens = "Count to three", 3
    needed = reservation(price(srv, "grok-3"), text, max_tokens)
    secret, key = new_key(srv, f"{needed - 1}e-6")
    r = chat(srv, secret, model="grok-3", max_tokens=max_tokens, text=text)
    assert err(r, 403, "used_up")["message"] == USED_UP
    assert (record(srv, key["id"])["balance"], record(srv, key["id"])["reserved"]) == (needed - 1, 0)
    ok(api(srv, "POST", f"/admin/keys/{key['id']}/credits", json={"amount": "0.000001"}))
    p = price(srv, "grok-3")
    usage = ok(chat(srv, secret, model="grok-3", max_tokens=max_tokens, text=text))["usage"]
    after = record(srv, key["id"])
    assert (after["balance"], after["reserved"]) == (needed - cost(usage, p), 0)


def test_used_up_with_zero_credits(srv: Srv) -> None:
    secret, key = new_key(srv)
    assert err(chat(srv, secret, max_tokens=1), 403, "used_up")["message"] == USED_UP
    assert (record(srv, key["id"])["balance"], record(srv, key["id"])["reserved"]) == (0, 0)
    assert ok(api(srv, "GET", "/v1/balance", token=secret))["balance"] == 0
    assert usage_data(srv, f"/admin/usage?token={key['id']}") == []


@E2E
def test_the_reservation_covers_the_cost(server: Server) -> None:
    """On the real model (the shared server, accounts on SQLite): a short prompt is mostly chat-template tokens;
    input priced high (and cached like input, so slot history does not matter) makes any under-estimate of them
    cost more than was reserved. The price is put back afterwards (the server is shared)."""
    before = price(server, "grok-2-vision")
    ok(api(server, "PUT", "/admin/prices/grok-2-vision", json={"input": "100", "cached_input": "100", "output": "1"}))
    try:
        p, text = price(server, "grok-2-vision"), "hi"
        needed = reservation(p, text, max_tokens=1)
        secret, key = new_key(server, f"{needed}e-6")
        usage = ok(chat(server, secret, model="grok-2-vision", max_tokens=1, text=text))["usage"]
        assert cost(usage, p) <= needed, (usage, needed)
        assert record(server, key["id"])["balance"] == needed - cost(usage, p)
    finally:
        ok(api(server, "PUT", "/admin/prices/grok-2-vision",
               json={k: format_credits(before[k]) for k in ("input", "cached_input", "output")}))


# -- 5. price versions -----------------------------------------------------------------------------------------

def test_a_new_price_version_applies_to_the_next_request(srv: Srv) -> None:
    old = price(srv, "grok-3")
    body = {"input": "7", "cached_input": "1.25", "output": "11.000001"}
    new = ok(api(srv, "PUT", "/admin/prices/grok-3", json=body))
    assert new == {"model": "grok-3", "version": old["version"] + 1, "input": 7_000_000, "cached_input": 1_250_000,
                   "output": 11_000_001, "unit": "micro-credits per million tokens"}
    listed = prices(srv)
    assert price(srv, "grok-3") == new
    assert old in listed["history"] and new in listed["history"]
    secret, key = new_key(srv, "1")
    usage = ok(chat(srv, secret, model="grok-3", max_tokens=3))["usage"]
    assert cost(usage, new) != cost(usage, old)
    assert 1_000_000 - record(srv, key["id"])["balance"] == cost(usage, new)
    assert usage_data(srv, f"/admin/usage?token={key['id']}&by=model")[0]["cost"] == cost(usage, new)


# -- 6. usage reports ------------------------------------------------------------------------------------------

def run_and_expect(srv: Srv, secret: str, model: str, times: int) -> dict[str, Any]:
    """Make requests; return the usage row they should add up to."""
    counts = dict.fromkeys(COUNTERS, 0)
    for _ in range(times):
        p = price(srv, model)
        usage = ok(chat(srv, secret, model=model, max_tokens=2))["usage"]
        for name, value in (("requests", 1), ("prompt_tokens", usage["prompt_tokens"]),
                            ("cached_tokens", usage["prompt_tokens_details"]["cached_tokens"]),
                            ("completion_tokens", usage["completion_tokens"]),
                            ("reasoning_tokens", usage["completion_tokens_details"]["reasoning_tokens"]),
                            ("cost", cost(usage, p))):
            counts[name] += value
    # A scripted backend reports no cost of its own: none of these requests count towards the drift report.
    return {"model": model, **counts, "upstream_requests": 0, "upstream_cost_ticks": 0, "upstream_charged": 0}


def sums(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {c: sum(r[c] for r in rows) for c in COUNTERS}


def test_usage_reports(srv: Srv) -> None:
    a_secret, a = new_key(srv, "1")
    b_secret, b = new_key(srv, "1")
    a_row = run_and_expect(srv, a_secret, "grok-3-mini", 2)
    b_row = run_and_expect(srv, b_secret, "grok-4", 1)
    for secret, row in ((a_secret, a_row), (b_secret, b_row)):
        assert usage_data(srv, "/v1/usage?by=model", token=secret) == [row]
        assert usage_data(srv, "/grok/usage?by=model", token=secret) == [row]
        days = usage_data(srv, "/v1/usage", token=secret)
        assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", d["day"]) for d in days)
        assert sums(days) == sums([row])
    assert usage_data(srv, f"/admin/usage?by=model&token={a['id']}") == [a_row]
    assert usage_data(srv, f"/admin/usage?by=model&token={b['prefix']}") == [b_row]
    by_model = usage_data(srv, "/admin/usage?by=model")
    assert a_row in by_model and b_row in by_model
    assert sums(usage_data(srv, "/admin/usage?by=day")) == sums(by_model)
    a_days = usage_data(srv, f"/admin/usage?token={a['id']}")
    for query, rows in (("by=model", by_model), (f"by=day&token={a['id']}", a_days)):
        r = api(srv, "GET", f"/admin/usage?{query}&format=csv")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        reader = csv.DictReader(io.StringIO(r.text))
        assert reader.fieldnames == list(rows[0])
        assert list(reader) == [{k: str(v) for k, v in row.items()} for row in rows]


# -- 7. the bootstrap admin token -----------------------------------------------------------------------------

def test_bootstrap_admin_token_chats_unbilled_and_has_no_balance(srv: Srv) -> None:
    model = "grok-4-1-fast-non-reasoning"  # used by no other test in this module
    balances = {k["id"]: k["balance"] for k in ok(api(srv, "GET", "/admin/keys"))["data"]}
    r = chat(srv, srv.token, model=model, max_tokens=2)
    usage = ok(r)["usage"]
    assert not any(h.startswith("x-ratelimit") for h in r.headers)
    row = next(row for row in usage_data(srv, "/admin/usage?by=model") if row["model"] == model)
    assert (row["requests"], row["prompt_tokens"], row["cost"]) == (1, usage["prompt_tokens"], 0)
    assert {k["id"]: k["balance"] for k in ok(api(srv, "GET", "/admin/keys"))["data"]} == balances
    for path in ("/v1/balance", "/grok/balance", "/v1/usage"):
        assert "bootstrap admin token" in err(api(srv, "GET", path), 403, "forbidden")["message"]
