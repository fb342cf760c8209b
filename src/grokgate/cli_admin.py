"""`grokgate accounts | keys | credits | prices | usage | db`: account administration on the store directly.

The same store methods back the admin HTTP API, so both paths validate and record alike.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from grokgate.core.accounts import format_credits, parse_credits, parse_price
from grokgate.core.budgets import PERIODS
from grokgate.core.errors import GatewayError
from grokgate.core.pricing import Price


def _store() -> Any:
    from grokgate.settings import Settings
    from grokgate.store.engine_options import with_pooler
    from grokgate.store.sql import SqlStore, default_url

    settings = Settings()
    return SqlStore(with_pooler(settings.database_url or default_url(settings.data_dir), settings.database_pooler),
                    owner=settings.instance())


def _run(action: Callable[[Any, argparse.Namespace], Awaitable[int]], args: argparse.Namespace) -> int:
    async def main() -> int:
        store = _store()
        await store.open()
        try:
            return await action(store, args)
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except GatewayError as exc:
        print(f"grokgate: {exc.message}", file=sys.stderr)
        return 1


LAST_SECOND = 253_402_300_799  # 9999-12-31, as the admin API bounds expiries


def _ascii_digits(text: str) -> bool:
    # str.isdigit() and int() also take "²" or "١": only ASCII digits are numbers here, as in the admin API.
    return text.isascii() and text.isdigit()


def _expiry(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        if _ascii_digits(text):
            seconds = int(text) if len(text) <= 20 else LAST_SECOND + 1
            if not 0 < seconds <= LAST_SECOND:
                raise ValueError
            return seconds * 1000
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise GatewayError(400, "bad_request", f"Not a date: {text!r} (use YYYY-MM-DD or unix seconds).") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def _positive(text: str) -> int:
    if not _ascii_digits(text) or len(text) > 10 or not 1 <= int(text) <= 2_147_483_647:
        raise argparse.ArgumentTypeError("must be a positive integer below 2**31")
    return int(text)


_MAX_GRACE_SECONDS = 30 * 86400  # as the admin API's (api/admin.py MAX_GRACE_SECONDS)


def _grace(text: str) -> int:
    """A rotation's grace in seconds: bounded, so that an absurd number is a usage error, not a bigint overflow."""
    if not _ascii_digits(text) or len(text) > 10 or int(text) > _MAX_GRACE_SECONDS:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds from 0 to {_MAX_GRACE_SECONDS} (30 days)")
    return int(text)


def _day(text: str) -> str:
    try:
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
            dt.date.fromisoformat(text)
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError("must be a date, YYYY-MM-DD")


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


async def keys_create(store: Any, args: argparse.Namespace) -> int:
    # Zero is a valid starting balance, as in POST /admin/keys; only top-ups must add something.
    credits = parse_credits(args.credits, "--credits", allow_zero=True) if args.credits is not None else 0
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    account_id = None
    if args.account is not None:
        if credits:
            raise GatewayError(400, "bad_request", "--credits funds a new account; top up an existing one with "
                                                   "'grokgate accounts topup ACCOUNT AMOUNT'.")
        account_id = (await store.require_account(args.account)).id
    limit = parse_credits(args.limit, "--limit", allow_zero=True) if args.limit is not None else None
    if args.period is not None and limit is None:
        raise GatewayError(400, "bad_request", "--period needs --limit (the spending limit it resets).")
    record, secret = await store.create_token(
        args.name, allowed_models=models, expires_at=_expiry(args.expires), rpm=args.rpm, tpm=args.tpm,
        max_concurrency=args.concurrency, account_id=account_id, spend_limit=limit, limit_period=args.period,
    )
    if credits:
        record = await store.add_credits(record.id, credits, note="initial credits")
    print(f"created token {record.id} ({record.name}) of account {record.account_id} ({record.account_name}), "
          f"balance {format_credits(record.balance)} credits{_cap_text(record)}")
    print(f"secret (shown once, store it now): {secret}")
    return 0


def _cap_text(record: Any) -> str:
    if record.spend_limit is None:
        return ""
    period = f" {record.limit_period}" if record.limit_period else " (never resets)"
    return f", spending limit {format_credits(record.spend_limit)} credits{period}"


async def keys_limit(store: Any, args: argparse.Namespace) -> int:
    record = await store.require_token(args.ref)
    limit = None if args.limit in (None, "none") else parse_credits(args.limit, "--limit", allow_zero=True)
    record = await store.update_token(record.id, spend_limit=limit, limit_period=args.period)
    print(f"token {record.id} ({record.name}){_cap_text(record) or ': no spending limit'}")
    return 0


async def keys_rotate(store: Any, args: argparse.Namespace) -> int:
    record = await store.require_token(args.ref)
    record, secret = await store.rotate_token(record.id, args.grace * 1000)
    grace = f"the old secret works for {args.grace} more seconds" if args.grace else "the old secret no longer works"
    print(f"token {record.id} ({record.name}) rotated; {grace}")
    print(f"new secret (shown once, store it now): {secret}")
    return 0


async def accounts_create(store: Any, args: argparse.Namespace) -> int:
    credits = parse_credits(args.credits, "--credits", allow_zero=True) if args.credits is not None else 0
    account = await store.create_account(args.name, rpm=args.rpm, tpm=args.tpm, max_concurrency=args.concurrency)
    if credits:
        account = await store.add_account_credits(account.id, credits, note="initial credits")
    print(f"created account {account.id} ({account.name}), balance {format_credits(account.balance)} credits")
    print(f"add keys with: grokgate keys create NAME --account {account.id}")
    return 0


async def accounts_list(store: Any, args: argparse.Namespace) -> int:
    rows = [a.public() for a in await store.list_accounts()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_table(rows, ["id", "name", "disabled", "balance_credits", "keys", "rpm", "tpm", "max_concurrency"]))
    return 0


async def accounts_show(store: Any, args: argparse.Namespace) -> int:
    account = await store.require_account(args.ref)
    keys = [k.public() for k in await store.account_keys(account.id)]
    print(json.dumps({**account.public(), "data": keys}, indent=2))
    return 0


async def accounts_topup(store: Any, args: argparse.Namespace) -> int:
    amount = parse_credits(args.amount)
    account = await store.require_account(args.ref)
    account = await store.add_account_credits(account.id, amount, note=args.note)
    print(f"account {account.id} ({account.name}): balance {format_credits(account.balance)} credits")
    return 0


async def accounts_set_disabled(store: Any, args: argparse.Namespace) -> int:
    account = await store.require_account(args.ref)
    account = await store.update_account(account.id, disabled=args.command == "disable")
    print(f"account {account.id} ({account.name}) {'disabled' if account.disabled else 'enabled'}")
    return 0


async def keys_list(store: Any, args: argparse.Namespace) -> int:
    rows = [r.public() for r in await store.list_tokens()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_table(rows, ["id", "name", "prefix", "disabled", "balance_credits", "rpm", "tpm", "max_concurrency",
                            "allowed_models", "expires_at"]))
    return 0


async def keys_show(store: Any, args: argparse.Namespace) -> int:
    print(json.dumps((await store.require_token(args.ref)).public(), indent=2))
    return 0


async def keys_set_disabled(store: Any, args: argparse.Namespace) -> int:
    record = await store.require_token(args.ref)
    record = await store.update_token(record.id, disabled=args.command == "disable")
    print(f"token {record.id} ({record.name}) {'disabled' if record.disabled else 'enabled'}")
    return 0


async def keys_delete(store: Any, args: argparse.Namespace) -> int:
    record = await store.require_token(args.ref)
    await store.delete_token(record.id)
    print(f"token {record.id} ({record.name}) deleted; its ledger rows stay")
    return 0


async def credits_add(store: Any, args: argparse.Namespace) -> int:
    amount = parse_credits(args.amount)
    record = await store.require_token(args.ref)
    record = await store.add_credits(record.id, amount, note=args.note)
    print(f"token {record.id} ({record.name}): balance {format_credits(record.balance)} credits")
    return 0


async def prices_list(store: Any, args: argparse.Namespace) -> int:
    history = await store.price_history(args.model)
    rows = [{"model": p.model, "version": p.version, "input": format_credits(p.input),
             "cached_input": format_credits(p.cached_input), "output": format_credits(p.output)} for p in history]
    print("credits per million tokens")
    print(_table(rows, ["model", "version", "input", "cached_input", "output"]))
    return 0


async def prices_set(store: Any, args: argparse.Namespace) -> int:
    price = Price(args.model, parse_price(args.input, "--input"), parse_price(args.cached_input, "--cached-input"),
                  parse_price(args.output, "--output"))
    saved = await store.set_price(price)
    print(f"{saved.model}: price version {saved.version}")
    return 0


async def usage_report(store: Any, args: argparse.Namespace) -> int:
    token_id = (await store.require_token(args.token)).id if args.token else None
    account_id = (await store.require_account(args.account)).id if args.account else None
    rows = await store.usage(token_id=token_id, since=args.since, by=args.by, account_id=account_id)
    if args.csv:
        text = store.to_csv(rows)
        if args.csv == "-":
            sys.stdout.write(text)
        else:
            await asyncio.to_thread(Path(args.csv).write_text, text, newline="")
            print(f"wrote {len(rows)} rows to {args.csv}")
        return 0
    for row in rows:
        row["cost_credits"] = format_credits(row["cost"])
    columns = [args.by, "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens",
               "cost_credits"]
    if any(row["upstream_requests"] for row in rows):
        from grokgate.settings import Settings

        per_usd = Settings().credits_per_usd
        for row in rows:
            row.update(upstream_drift(row, per_usd))
        columns += ["upstream_requests", "upstream_cost_credits", "charged_credits", "drift"]
    print(_table(rows, columns))
    return 0


TICKS_PER_USD = 10**10  # xAI's cost_in_usd_ticks


def upstream_drift(row: dict[str, Any], credits_per_usd: float) -> dict[str, str]:
    """For the requests whose upstream reported its own cost (xAI's cost_in_usd_ticks): that cost in credits (at
    GROKGATE_CREDITS_PER_USD), what grokgate charged for the same requests, and the difference as a share of the
    upstream's cost (positive: grokgate charged more)."""
    if not row["upstream_requests"]:
        return {"upstream_cost_credits": "-", "charged_credits": "-", "drift": "-"}
    upstream = round(row["upstream_cost_ticks"] * credits_per_usd * 1_000_000 / TICKS_PER_USD)
    charged = row["upstream_charged"]
    drift = f"{(charged - upstream) * 100 / upstream:+.1f}%" if upstream else "-"
    return {"upstream_cost_credits": format_credits(upstream), "charged_credits": format_credits(charged),
            "drift": drift}


async def db_upgrade(store: Any, args: argparse.Namespace) -> int:
    print(f"database at {store.url.split('@')[-1]} is at the latest schema")
    return 0


def add_commands(sub: Any) -> None:
    def command(parser: argparse.ArgumentParser, action: Callable[[Any, argparse.Namespace], Awaitable[int]]) -> None:
        parser.set_defaults(func=lambda args: _run(action, args))

    keys = sub.add_parser("keys", help="API tokens").add_subparsers(dest="command", required=True)
    create = keys.add_parser("create", help="create a token; its secret is shown once")
    create.add_argument("name")
    create.add_argument("--credits", help="initial credits, e.g. 10 or 0.5")
    create.add_argument("--models", help="allowed models, comma-separated (default: all)")
    create.add_argument("--expires", help="expiry: YYYY-MM-DD[THH:MM] (UTC) or unix seconds")
    create.add_argument("--rpm", type=_positive)
    create.add_argument("--tpm", type=_positive)
    create.add_argument("--concurrency", type=_positive, help="max requests in flight")
    create.add_argument("--account", help="the account (id or name) it spends from; default: a new account of its "
                                          "own, named like the key")
    create.add_argument("--limit", help="the key's spending limit in credits (default: none)")
    create.add_argument("--period", choices=list(PERIODS), help="when --limit resets (UTC); default: never")
    command(create, keys_create)
    listing = keys.add_parser("list", help="list tokens (prefixes only)")
    listing.add_argument("--json", action="store_true")
    command(listing, keys_list)
    for name, action, text in (("show", keys_show, "show one token"),
                               ("disable", keys_set_disabled, "disable a token"),
                               ("enable", keys_set_disabled, "enable a token"),
                               ("delete", keys_delete, "delete a token")):
        p = keys.add_parser(name, help=text)
        p.add_argument("ref", help="id, name or prefix (gg-xxxxxxxx); refused when it could mean two tokens")
        command(p, action)

    limit = keys.add_parser("limit", help="set or clear a key's spending limit")
    limit.add_argument("ref", help="id, name or prefix")
    limit.add_argument("--limit", required=True, help="credits per period; 'none' clears it")
    limit.add_argument("--period", choices=list(PERIODS), help="when it resets (UTC); default: never")
    command(limit, keys_limit)
    rotate = keys.add_parser("rotate", help="a new secret for the same key (shown once)")
    rotate.add_argument("ref", help="id, name or prefix")
    rotate.add_argument("--grace", type=_grace, default=3600,
                        help="seconds the old secret keeps working (default 3600; 0: stops at once)")
    command(rotate, keys_rotate)

    accounts = sub.add_parser("accounts", help="customers: one balance shared by their keys").add_subparsers(
        dest="command", required=True)
    acreate = accounts.add_parser("create", help="create an account")
    acreate.add_argument("name")
    acreate.add_argument("--credits", help="initial credits, e.g. 10 or 0.5")
    acreate.add_argument("--rpm", type=_positive, help="requests per minute, all its keys together")
    acreate.add_argument("--tpm", type=_positive, help="tokens per minute, all its keys together")
    acreate.add_argument("--concurrency", type=_positive, help="requests in flight, all its keys together")
    command(acreate, accounts_create)
    alist = accounts.add_parser("list", help="list accounts")
    alist.add_argument("--json", action="store_true")
    command(alist, accounts_list)
    ashow = accounts.add_parser("show", help="an account and its keys (their limits and this period's spend)")
    ashow.add_argument("ref", help="id or name")
    command(ashow, accounts_show)
    topup = accounts.add_parser("topup", help="top up an account (recorded in the ledger)")
    topup.add_argument("ref", help="id or name")
    topup.add_argument("amount", help="credits, e.g. 10 or 0.5")
    topup.add_argument("--note")
    command(topup, accounts_topup)
    for name in ("disable", "enable"):
        toggle = accounts.add_parser(name, help=f"{name} an account (all its keys)")
        toggle.add_argument("ref", help="id or name")
        command(toggle, accounts_set_disabled)

    credits = sub.add_parser("credits", help="balances").add_subparsers(dest="command", required=True)
    add = credits.add_parser("add", help="top up a token's account (recorded in the ledger)")
    add.add_argument("ref", help="id, name or prefix")
    add.add_argument("amount", help="credits, e.g. 10 or 0.5")
    add.add_argument("--note")
    command(add, credits_add)

    prices = sub.add_parser("prices", help="per-model prices").add_subparsers(dest="command", required=True)
    plist = prices.add_parser("list", help="every price version")
    plist.add_argument("--model")
    command(plist, prices_list)
    pset = prices.add_parser("set", help="set a model's prices (credits per million tokens): a new version")
    pset.add_argument("model")
    pset.add_argument("--input", required=True)
    pset.add_argument("--cached-input", required=True)
    pset.add_argument("--output", required=True)
    command(pset, prices_set)

    usage = sub.add_parser("usage", help="usage report")
    usage.add_argument("--token", help="id, name or prefix")
    usage.add_argument("--account", help="id or name: all its keys")
    usage.add_argument("--since", type=_day, help="YYYY-MM-DD")
    usage.add_argument("--by", choices=["day", "model"], default="day")
    usage.add_argument("--csv", metavar="FILE", help="write CSV to FILE ('-' for stdout)")
    command(usage, usage_report)

    db = sub.add_parser("db", help="database").add_subparsers(dest="command", required=True)
    command(db.add_parser("upgrade", help="migrate the database to the latest schema"), db_upgrade)
