"""The console's accounts pages in real headless Chromium (Playwright), against a real server with the local model:
accounts listed with their balance, created, topped up, disabled and enabled; an account's keys with their
spending limits and this period's spend, created (the secret shown once), capped and rotated; usage charts per
account and per key. Screenshots at 1280 px and 390 px go to test-artifacts/console/ (tests/test_console.py)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import expect

from tests import test_console
from tests.conftest import E2E, Server, call, err, ok, start_server, stop_server
from tests.test_console import Tab, chat

pytestmark = E2E

# The same browser and tabs (screenshots of failures) as the other console tests.
browser = test_console.browser
tabs = test_console.tabs

# Anything may be in a name: markup must stay text, quotes must not break a selector or an attribute.
NASTY = '<img src=x onerror="window.__pwned=1"> Acme "Ltd" & co'


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("console-accounts"), "--slots", "2", name="console-accounts")
    yield server
    stop_server(server)


def account_named(srv: Server, name: str) -> dict[str, Any]:
    found = [a for a in ok(call(srv, "GET", "/admin/accounts", srv.token))["data"] if a["name"] == name]
    assert len(found) == 1, found
    return found[0]


def key_of(srv: Server, key_id: int) -> dict[str, Any]:
    return dict(ok(call(srv, "GET", f"/admin/keys/{key_id}", srv.token)))


def today_bar(tab: Tab, panel: str) -> int:
    """The value of today's bar in the chart of the panel whose heading starts with `panel`."""
    today = dt.datetime.now(dt.UTC).date().isoformat()
    bar = tab.page.locator(f".panel:has(h2:text-matches('^{panel}')) g.bar[data-day='{today}']")
    return int(bar.get_attribute("data-value") or 0)


def test_accounts_pages_in_chromium(srv: Server, browser: Any, tabs: list[Tab]) -> None:
    admin = Tab(browser, srv)
    tabs.append(admin)
    page = admin.page
    admin.sign_in(srv.token)
    assert page.locator("#nav a").all_inner_texts() == ["Overview", "Accounts", "Tokens", "Usage",
                                                        "Models & prices", "Playground"]

    # Create an account: it shows up in the list with its balance, its name as text (no markup ran).
    admin.open("accounts")
    page.click("[data-action=new-account]")
    dialog = page.locator("dialog[open]")
    dialog.locator("input[name=name]").fill(NASTY)
    dialog.locator("input[name=credits]").fill("5")
    dialog.locator("input[name=rpm]").fill("600")
    dialog.locator("button[type=submit]").click()
    admin.toast("created with 5 credits.")
    account = account_named(srv, NASTY)
    assert account["balance"] == 5_000_000 and account["rpm"] == 600 and account["keys"] == 0
    row = page.locator(f"tr[data-id='{account['id']}']")
    expect(row.locator("td[data-label=Balance]")).to_have_text("5")
    expect(row.locator("td[data-label=Name]")).to_have_text(NASTY)
    assert row.get_attribute("data-account") == NASTY
    expect(row.locator("td[data-label='Limits (all keys)']")).to_have_text("600 rpm")
    assert page.locator("main img").count() == 0 and page.evaluate("window.__pwned") is None

    # Top up from the list: the shown balance changes, and so does the account's.
    row.locator("[data-action=topup]").click()
    page.locator("dialog[open] input[name=amount]").fill("2.5")
    page.locator("dialog[open] button[type=submit]").click()
    admin.toast("now has 7.5 credits.")
    expect(row.locator("td[data-label=Balance]")).to_have_text("7.5")
    assert account_named(srv, NASTY)["balance"] == 7_500_000

    # Disable, then enable again.
    row.locator("[data-action=disable]").click()
    row.locator(".pill", has_text="disabled").wait_for()
    assert account_named(srv, NASTY)["disabled"] is True
    row.locator("[data-action=enable]").click()
    row.locator(".pill", has_text="active").wait_for()
    assert account_named(srv, NASTY)["disabled"] is False
    admin.shoot("accounts")

    # The account's page: its balance, no keys yet.
    row.locator("td[data-label=Name] a").click()
    page.wait_for_selector("main[data-page=accounts] .key-list .empty")
    assert page.locator("main h1").inner_text() == NASTY
    expect(page.locator(".card:has(.card-label:text('Balance')) .card-value")).to_have_text("7.5")

    # A key with a daily spending limit: its secret is shown once, then only its prefix.
    page.click("[data-action=new-key]")
    dialog = page.locator("dialog[open]")
    dialog.locator("input[name=name]").fill("app-1")
    dialog.locator("input[name=spend_limit]").fill("1")
    dialog.locator("select[name=period]").select_option("daily")
    dialog.locator("button[type=submit]").click()
    admin.toast("Key app-1 created.")
    secret = page.inner_text("#new-secret")
    assert secret.startswith("gg-")
    key_row = page.locator("tr[data-key=app-1]")
    key = key_of(srv, int(key_row.get_attribute("data-id") or 0))
    assert key["account_id"] == account["id"] and key["spend"]["limit"] == 1_000_000
    assert key["spend"]["period"] == "daily"
    assert secret.startswith(key["prefix"]) and secret != key["prefix"]
    expect(key_row.locator("td[data-label=Prefix]")).to_have_text(key["prefix"])
    expect(key_row.locator("td[data-label='Spending limit']")).to_have_text("1 per day")
    assert ok(call(srv, "GET", "/v1/balance", secret))["balance"] == 7_500_000  # the account's balance
    page.click("[data-action=secret-done]")
    page.locator("#new-secret").wait_for(state="detached")
    assert secret not in page.content()
    admin.open("accounts", f"?id={account['id']}")
    page.locator("tr[data-key=app-1]").wait_for()
    assert secret not in page.content() and key["prefix"] in page.inner_text("main")
    assert page.locator("#new-secret").count() == 0

    # A request on the key: its spend this period, the account's balance and both charts show it.
    assert chat(srv, secret).status_code == 200
    admin.open("accounts", f"?id={account['id']}")
    key = key_of(srv, key["id"])
    spent = key["spend"]["spent"]
    assert spent > 0 and key["spend"]["reserved"] == 0
    key_row = page.locator("tr[data-key=app-1]")
    expect(key_row.locator("td[data-label='Spent this period'] .spent")).to_have_text(key["spend"]["spent_credits"])
    remaining = ok(call(srv, "GET", "/v1/balance", secret))
    assert key["spend"]["remaining"] == 1_000_000 - spent
    expect(key_row.locator("td[data-label=Resets]")).to_have_text(
        dt.datetime.fromtimestamp(key["spend"]["resets_at"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S") + " UTC")
    expect(page.locator(".card:has(.card-label:text('Balance')) .card-value")).to_have_text(
        remaining["balance_credits"])
    assert remaining["balance"] == 7_500_000 - spent
    page.wait_for_selector(f".panel[data-key='{key['id']}'] g.bar", state="attached")
    assert today_bar(admin, "Credits per day · account") == spent
    assert today_bar(admin, "Requests per day · account") == 1
    assert today_bar(admin, "Credits per day · key app-1") == spent
    assert today_bar(admin, "Requests per day · key app-1") == 1

    # Set the limit: weekly now; the row says so, and so does the API.
    key_row.locator("[data-action=set-limit]").click()
    # A limit the API refuses is said in the dialog, which stays open for a correction.
    page.locator("dialog[open] input[name=spend_limit]").fill("-1")
    page.locator("dialog[open] button[type=submit]").click()
    expect(page.locator("dialog[open] .form-error")).to_be_visible()
    assert key_of(srv, key["id"])["spend"]["limit"] == 1_000_000
    page.locator("dialog[open] input[name=spend_limit]").fill("0.5")
    page.locator("dialog[open] select[name=period]").select_option("weekly")
    page.locator("dialog[open] button[type=submit]").click()
    admin.toast("app-1: limit 0.5 per week.")
    expect(key_row.locator("td[data-label='Spending limit']")).to_have_text("0.5 per week")
    capped = key_of(srv, key["id"])["spend"]
    assert capped["limit"] == 500_000 and capped["period"] == "weekly"

    # A second key, without a limit: its own charts are empty; the account's still count the first's request.
    page.click("[data-action=new-key]")
    page.locator("dialog[open] input[name=name]").fill("app-2")
    page.locator("dialog[open] button[type=submit]").click()
    admin.toast("Key app-2 created.")
    second = page.inner_text("#new-secret")
    assert second.startswith("gg-") and second != secret
    expect(page.locator("tr[data-key=app-2] td[data-label='Spending limit']")).to_have_text("none")
    page.locator("tr[data-key=app-2] [data-action=key-usage]").click()
    second_id = page.locator("tr[data-key=app-2]").get_attribute("data-id")
    page.wait_for_selector(f".panel[data-key='{second_id}'] g.bar", state="attached")
    assert today_bar(admin, "Requests per day · key app-2") == 0
    assert today_bar(admin, "Requests per day · account") == 1
    assert page.evaluate("location.hash").endswith(f"&key={second_id}")
    page.evaluate("scrollTo(0, 0)")  # the Usage button scrolled the charts into view
    admin.shoot("account")

    # Rotate the first key with no grace: a new secret shown once, the old one refused at once.
    page.locator("tr[data-key=app-1] [data-action=rotate]").click()
    page.locator("dialog[open] select[name=grace_seconds]").select_option("0")
    page.locator("dialog[open] button[type=submit]").click()
    admin.toast("app-1 rotated.")
    rotated = page.inner_text("#new-secret")
    assert rotated.startswith("gg-") and rotated not in (secret, second)
    err(call(srv, "GET", "/v1/balance", secret), 401, "invalid_token")
    assert ok(call(srv, "GET", "/v1/balance", rotated))["token"]["id"] == key["id"]
    expect(page.locator("tr[data-key=app-1] td[data-label=Prefix]")).to_have_text(key_of(srv, key["id"])["prefix"])
    # The spend of the period stays with the key across the rotation.
    expect(page.locator("tr[data-key=app-1] td[data-label='Spent this period'] .spent")).to_have_text(
        key["spend"]["spent_credits"])

    # The ledger of the account: its top-ups and the request, each row naming the account.
    admin.open("usage", f"?account={account['id']}")
    rows = page.locator("tbody tr")
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.kind)")) == ["topup", "topup", "usage"]
    assert set(page.locator("tbody td[data-label=Account]").all_inner_texts()) == {NASTY}
    assert page.locator("tbody tr[data-kind=usage] td[data-label=Token]").inner_text() == "app-1"

    # The Tokens page names each key's account and leads to it.
    admin.open("tokens")
    link = page.locator("tr[data-token=app-2] td[data-label=Account] a")
    assert link.inner_text() == NASTY
    link.click()
    page.wait_for_selector("main[data-ready=accounts] tr[data-key=app-2]")

    # An account that is not there is said so in words, not a blank page.
    admin.open("accounts", "?id=999999")
    expect(page.locator("main .notice-error")).to_contain_text("No account matches")

    assert not admin.errors, admin.errors
    assert not [u for u in admin.urls if srv.token in u or secret in u or rotated in u]
    admin.page.close()

    # The key's holder sees both, apart: the account's balance (shared) and its own key's spend against its limit.
    holder = Tab(browser, srv)
    tabs.append(holder)
    holder.sign_in(rotated)
    balance = ok(call(srv, "GET", "/v1/balance", rotated))
    cards = holder.page.locator(".cards")
    expect(cards.locator(".card:has(.card-label:text('Account balance')) .card-value")).to_have_text(
        balance["balance_credits"])
    expect(cards.locator(".card:has(.card-label:text('Account balance')) .card-note")).to_contain_text(NASTY)
    expect(cards.locator(".card-key .card-value")).to_have_text(balance["key"]["spent_credits"])
    expect(cards.locator(".card-key .card-note")).to_contain_text("spent of 0.5 per week")
    expect(cards.locator(".card-key .card-note")).to_contain_text(
        dt.datetime.fromtimestamp(balance["key"]["resets_at"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S"))
    holder.open("accounts")
    assert "Only the admin token can manage accounts." in holder.page.inner_text("main")
    holder.open("overview")
    holder.shoot("holder-key-limit")
    assert not holder.errors, holder.errors
    assert secret not in srv.log() and rotated not in srv.log()
