"""Accounts over HTTP: the admin API (accounts, their keys, top-ups, disabling, key limits, rotation), what a key's
holder sees of its account, refusals that say which limit as the openai SDK reads them, and `GET /` for a browser.

The real app in process (tests/inproc.py) on a SQLite file, the scripted provider behind it.
"""

from __future__ import annotations

import csv
import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import TOKEN, call, err, ok, user
from tests.inproc import AppServer, ScriptedProvider, app_server, scripted_models

MODEL = "grok-3"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    with app_server(tmp_path_factory.mktemp("accounts-api"), scripted_models(ScriptedProvider())) as server:
        yield server


def admin(srv: AppServer, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
    return ok(call(srv, method, path, TOKEN, **kwargs), status)


def name() -> str:
    return f"acme-{uuid.uuid4().hex[:8]}"


def chat(srv: AppServer, secret: str, max_tokens: int = 4) -> httpx.Response:
    return srv.chat({"model": MODEL, "messages": user("hi"), "max_tokens": max_tokens}, token=secret)


def sdk(srv: AppServer, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=secret, max_retries=0)


def test_an_account_with_keys_sharing_its_balance(srv: AppServer) -> None:
    account = admin(srv, "POST", "/admin/accounts", 201, json={"name": name(), "credits": "1"})
    assert (account["object"], account["balance"], account["keys"]) == ("account", 1_000_000, 0)
    path = f"/admin/accounts/{account['id']}"
    one = admin(srv, "POST", f"{path}/keys", 201, json={"name": "app", "spend_limit": "0.5", "period": "daily"})
    two = admin(srv, "POST", f"{path}/keys", 201, json={"name": "ci"})
    assert one["key"]["account_id"] == two["key"]["account_id"] == account["id"]
    assert one["key"]["spend"]["limit"] == 500_000 and one["key"]["spend"]["period"] == "daily"
    for secret in (one["token"], two["token"]):
        assert chat(srv, secret).status_code == 200
    shown = admin(srv, "GET", f"/admin/accounts/{account['name']}")
    spent = 1_000_000 - shown["balance"]
    assert shown["keys"] == 2 and spent > 0 and shown["reserved"] == 0
    assert [k["name"] for k in shown["data"]] == ["app", "ci"]
    assert sum(k["spend"]["spent"] for k in shown["data"]) == spent, "each key's period spend adds up"
    assert account["id"] in [a["id"] for a in admin(srv, "GET", "/admin/accounts")["data"]]

    topped = admin(srv, "POST", f"{path}/credits", json={"amount": "2", "note": "invoice 7"})
    assert topped["balance"] == 3_000_000 - spent
    rows = admin(srv, "GET", "/admin/ledger", params={"account": account["id"]})["data"]
    assert {r["account_id"] for r in rows} == {account["id"]} and len(rows) == 4  # 2 top-ups, 2 requests
    report = call(srv, "GET", "/admin/usage", TOKEN, params={"account": account["id"], "format": "csv"})
    lines = list(csv.DictReader(io.StringIO(report.text)))
    assert report.headers["content-type"].startswith("text/csv") and int(lines[0]["requests"]) == 2
    per_key = admin(srv, "GET", "/admin/usage", params={"token": one["key"]["id"]})["data"]
    assert per_key[0]["requests"] == 1

    # The holder of either key sees the account's balance and its own key's limit.
    balance = ok(call(srv, "GET", "/v1/balance", one["token"]))
    assert balance["account"] == {"id": account["id"], "name": account["name"]}
    assert balance["balance"] == topped["balance"]
    assert balance["key"]["limit"] == 500_000 and balance["key"]["resets_at"] > time.time()
    own = ok(call(srv, "GET", "/v1/usage", two["token"]))["data"]
    assert sum(r["requests"] for r in own) == 2, "the account's usage, all keys"
    own_key = ok(call(srv, "GET", "/v1/usage", two["token"], params={"scope": "key"}))["data"]
    assert sum(r["requests"] for r in own_key) == 1
    ledger = ok(call(srv, "GET", "/v1/ledger", two["token"]))["data"]
    assert len(ledger) == 4

    disabled = admin(srv, "POST", f"{path}/disable")
    assert disabled["disabled"] is True
    err(chat(srv, one["token"]), 403, "disabled")
    admin(srv, "PATCH", path, json={"disabled": False})
    assert chat(srv, one["token"]).status_code == 200


def test_credits_with_a_key_of_an_existing_account_go_to_the_account(srv: AppServer) -> None:
    account = admin(srv, "POST", "/admin/accounts", 201, json={"name": name()})
    made = admin(srv, "POST", "/admin/keys", 201, json={"name": "k", "account": str(account["id"]), "credits": "5"})
    assert made["key"]["account_id"] == account["id"] and made["key"]["balance"] == 5_000_000
    rows = admin(srv, "GET", "/admin/ledger", params={"account": account["id"]})["data"]
    assert [(r["kind"], r["token_id"], r["amount"]) for r in rows] == [("topup", made["key"]["id"], 5_000_000)]
    err(call(srv, "POST", "/admin/accounts/nobody-here/keys", TOKEN, json={"name": "k"}), 404, "account_not_found")
    err(call(srv, "POST", "/admin/keys", TOKEN, json={"name": "k", "account": "nobody"}), 404, "account_not_found")
    err(call(srv, "POST", "/admin/keys", TOKEN, json={"name": "k", "period": "hourly"}), 400, "bad_request")
    assert admin(srv, "GET", f"/admin/accounts/{account['id']}")["keys"] == 1


def test_a_key_made_with_credits_is_an_account_of_its_own(srv: AppServer) -> None:
    made = admin(srv, "POST", "/admin/keys", 201, json={"name": "solo", "credits": "3"})
    account = admin(srv, "GET", f"/admin/accounts/{made['key']['account_id']}")
    assert (account["name"], account["balance"], account["keys"]) == ("solo", 3_000_000, 1)


def test_rotation_keeps_the_key_and_the_old_secret_works_for_its_grace(srv: AppServer) -> None:
    made = admin(srv, "POST", "/admin/keys", 201, json={"name": "rotating", "credits": "1"})
    old = made["token"]
    rotated = admin(srv, "POST", f"/admin/keys/{made['key']['id']}/rotate", json={"grace_seconds": 60})
    new = rotated["token"]
    assert new != old and rotated["key"]["id"] == made["key"]["id"]
    assert rotated["key"]["previous_valid_until"] > time.time() + 50
    assert chat(srv, new).status_code == 200 and chat(srv, old).status_code == 200
    again = admin(srv, "POST", f"/admin/keys/{made['key']['id']}/rotate", json={"grace_seconds": 0})
    err(chat(srv, new), 401, "invalid_token")
    err(chat(srv, old), 401, "invalid_token")
    assert chat(srv, again["token"]).status_code == 200
    err(call(srv, "POST", f"/admin/keys/{made['key']['id']}/rotate", TOKEN, json={"grace_seconds": -1}), 400,
        "bad_request")


def test_refusals_say_which_limit_through_the_openai_sdk(srv: AppServer) -> None:
    account = admin(srv, "POST", "/admin/accounts", 201, json={"name": name(), "credits": "0.1", "rpm": 3})
    path = f"/admin/accounts/{account['id']}"
    capped = admin(srv, "POST", f"{path}/keys", 201, json={"name": "capped", "spend_limit": "0.000001",
                                                          "period": "monthly"})
    other = admin(srv, "POST", f"{path}/keys", 201, json={"name": "other"})
    client = sdk(srv, capped["token"])
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    body: Any = denied.value.body
    assert body["code"] == "key_limit_exceeded" and body["limit"]["scope"] == "key"
    assert body["limit"]["available"] == 1 and body["limit"]["resets_at"] > time.time()
    assert denied.value.response.headers["x-grokgate-limit"] == "key.key_limit"

    # The balance cannot hold up to 100000 output tokens: AceData's used_up, and how many it can afford.
    with pytest.raises(openai.PermissionDeniedError) as short:
        sdk(srv, other["token"]).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=100_000)
    body = short.value.body
    assert body["code"] == "used_up" and body["message"].startswith("Your balance is not sufficient")
    assert body["limit"]["type"] == "balance" and body["limit"]["requested_tokens"] == 100_000
    assert 0 < body["limit"]["affordable_tokens"] < 100_000
    assert f"can only afford {body['limit']['affordable_tokens']}" in body["limit"]["message"]

    # The account's rpm (3) spans its keys: both refusals above counted, one more request fits, the next does not.
    completion = sdk(srv, other["token"]).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert completion.choices[0].message.content
    with pytest.raises(openai.RateLimitError) as limited:
        sdk(srv, other["token"]).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    body = limited.value.body
    assert body["code"] == "too_many_requests" and body["limit"] == {
        "type": "rpm", "scope": "account", "retry_after": body["limit"]["retry_after"]}
    assert limited.value.response.headers["x-grokgate-limit"] == "account.rpm"


def test_a_browser_at_the_root_is_led_to_the_console_and_the_docs(srv: AppServer) -> None:
    with srv.client() as c:
        page = c.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'href="/console/"' in page.text and 'href="/docs"' in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        for headers in ({}, {"Accept": "application/json"}, {"Accept": "*/*"}):
            err(c.get("/", headers=headers), 404, "no_api")
        err(c.post("/", headers={"Accept": "text/html"}), 404, "no_api")


def test_the_cli_makes_accounts_and_capped_keys(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {"GROKGATE_DATA_DIR": str(tmp_path), "GROKGATE_CACHE_DIR": str(tmp_path / "cache"),
           "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}

    def grokgate(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "grokgate", *args], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "created account 1 (acme), balance 5 credits" in grokgate("accounts", "create", "acme", "--credits", "5")
    out = grokgate("keys", "create", "app", "--account", "acme", "--limit", "1", "--period", "weekly")
    assert "of account 1 (acme)" in out and "spending limit 1 credits weekly" in out
    assert "of account 2 (solo), balance 2 credits" in grokgate("keys", "create", "solo", "--credits", "2")
    assert "balance 7 credits" in grokgate("accounts", "topup", "acme", "2")
    assert "acme" in grokgate("accounts", "list") and '"keys": 1' in grokgate("accounts", "list", "--json")
    assert '"period": "weekly"' in grokgate("accounts", "show", "acme")
    assert "new secret" in grokgate("keys", "rotate", "app", "--grace", "0")
    for absurd in ("99999999999999999999", "2592001", "-1"):  # past the API's 30 days, or negative: a usage error
        done = subprocess.run([sys.executable, "-m", "grokgate", "keys", "rotate", "app", "--grace", absurd], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "from 0 to 2592000" in done.stderr and "Traceback" not in done.stderr, absurd
    assert "disabled" in grokgate("accounts", "disable", "acme")
