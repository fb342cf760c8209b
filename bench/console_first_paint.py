"""First paint of the console's overview, as the admin, over a large ledger.

Builds a fresh SQLite data dir (migrations through SqlStore.open()), fills it with 100,000 ledger rows over ~90
days and ~20 tokens plus the matching usage_daily aggregates (bulk inserts with SQLAlchemy Core), starts
grokgate on it with a routing file whose only backend is an unreachable OpenAI-compatible one (so no model
loads), then opens /console in headless Chromium with the admin token already in sessionStorage and measures
the time from navigation to the overview painted with its data: the console sets `performance.mark
("console:painted:overview")` (and `main[data-painted=overview]`) two animation frames after its first render
with data. Each run is a fresh browser context: an empty HTTP cache, like a first visit.

    .venv/bin/python bench/console_first_paint.py [--rows 100000] [--days 90] [--tokens 20] [--runs 5]
        [--page overview|accounts]

`--page accounts` opens the page of account 1 instead (#/accounts?id=1): its keys, and the usage charts of the
account (usage_daily by account_id) and of its first key.

The overview reads usage_daily (pre-aggregated) for its charts and top models, and one indexed created_at range
of the ledger for its failed requests; the API timings printed first show what each of those costs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, insert, update

from grokgate.store.schema import accounts, ledger, usage_daily
from grokgate.store.sql import SqlStore

ADMIN = "bench-admin-token"
MODELS = ["grok-4", "grok-4-1-fast", "grok-3", "grok-3-mini", "grok-2-vision"]
# micro-credits per million tokens: (input, output)
PRICES = {"grok-4": (3_000_000, 15_000_000), "grok-4-1-fast": (200_000, 500_000), "grok-3": (3_000_000, 15_000_000),
          "grok-3-mini": (300_000, 500_000), "grok-2-vision": (2_000_000, 10_000_000)}
STATUSES = ["ok"] * 96 + ["error"] * 3 + ["client_disconnected"]
ROUTING = "backends:\n  nowhere:\n    kind: openai\n    base_url: http://127.0.0.1:9/v1\nmodels:\n" + "".join(
    f"  {m}:\n    - {{backend: nowhere}}\n" for m in MODELS)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
FRAGMENTS = {"overview": "", "accounts": "#/accounts?id=1"}
TOKEN_KEY = "grokgate.console.token"  # where the console keeps its token (src/grokgate/web/assets/js/main.js)


# -- the data ------------------------------------------------------------------------------------------------

def populate(data_dir: Path, rows: int, days: int, tokens: int, seed: int = 7) -> None:
    db = data_dir / "grokgate.db"

    async def migrate_and_create_tokens() -> dict[int, int]:
        store = SqlStore(f"sqlite:///{db}")
        await store.open()  # runs the migrations
        # Each key of its own account (as `grokgate keys create NAME` makes them); the first is account 1.
        records = [(await store.create_token(f"team-{i:02d}"))[0] for i in range(tokens)]
        await store.close()
        return {r.id: r.account_id for r in records}

    account_of = asyncio.run(migrate_and_create_tokens())
    token_ids = list(account_of)
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    start = now - days * 86_400_000
    created = sorted(rng.randrange(start, now) for _ in range(rows))
    weights = [1 / (i + 1) for i in range(len(token_ids))]  # a few busy tokens, a long tail
    ledger_rows: list[dict[str, Any]] = []
    daily: dict[tuple[str, int, str], list[int]] = {}
    balances = dict.fromkeys(account_of.values(), 0)
    for i, at in enumerate(created):
        token_id = rng.choices(token_ids, weights)[0] if rng.random() > 0.02 else None  # 2%: the admin token
        if token_id is not None and rng.random() < 0.002:
            amount = rng.choice([5, 10, 50]) * 1_000_000
            balances[account_of[token_id]] += amount
            ledger_rows.append(_row(i, token_id, "topup", None, 0, 0, amount, 0, "ok", at, account_of))
            continue
        model = rng.choice(MODELS)
        prompt, completion = rng.randint(20, 4000), rng.randint(1, 1200)
        status = rng.choice(STATUSES)
        price_in, price_out = PRICES[model]
        cost = -(-prompt * price_in // 1_000_000) - (-completion * price_out // 1_000_000)
        charge = cost if token_id is not None else 0  # the admin token is recorded, not charged
        ledger_rows.append(_row(i, token_id, "usage", model, prompt, completion, -charge, cost, status, at,
                                account_of))
        day = dt.datetime.fromtimestamp(at / 1000, dt.UTC).strftime("%Y-%m-%d")
        sums = daily.setdefault((day, token_id or 0, model), [0, 0, 0, 0])
        sums[0] += 1
        sums[1] += prompt
        sums[2] += completion
        sums[3] += charge
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        for chunk in range(0, len(ledger_rows), 20_000):
            conn.execute(insert(ledger), ledger_rows[chunk:chunk + 20_000])
        conn.execute(insert(usage_daily), [
            {"day": d, "token_id": t, "account_id": account_of.get(t, 0), "model": m, "requests": n,
             "prompt_tokens": p, "cached_tokens": 0,
             "completion_tokens": c, "reasoning_tokens": 0, "cost": cost}
            for (d, t, m), (n, p, c, cost) in daily.items()])
        for account_id, amount in balances.items():
            conn.execute(update(accounts).where(accounts.c.id == account_id).values(balance=amount))
    engine.dispose()
    print(f"data: {len(ledger_rows):,} ledger rows, {len(daily):,} usage_daily rows, {len(token_ids)} tokens, "
          f"{days} days in {db}", flush=True)


def _row(i: int, token_id: int | None, kind: str, model: str | None, prompt: int, completion: int, amount: int,
         cost: int, status: str, at: int, account_of: dict[int, int]) -> dict[str, Any]:
    account_id = account_of[token_id] if token_id is not None else None
    return {"request_id": f"bench-{i}", "token_id": token_id, "account_id": account_id, "kind": kind, "model": model,
            "backend": "nowhere",
            "prompt_tokens": prompt, "cached_tokens": 0, "completion_tokens": completion, "reasoning_tokens": 0,
            "amount": amount, "cost": cost, "price_version": 1 if model else None, "status": status,
            "estimated": False, "duration_ms": 100 + prompt // 10 if model else None, "note": None, "created_at": at}


# -- the server ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    routing = data_dir / "routing.yaml"
    routing.write_text(ROUTING)
    port = free_port()
    env = {**os.environ, "GROKGATE_API_KEYS": ADMIN, "GROKGATE_DATA_DIR": str(data_dir),
           "GROKGATE_CONFIG": str(routing), "GROKGATE_LOG_LEVEL": "WARNING"}
    log = (data_dir / "server.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "grokgate", "serve", "--port", str(port)], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"grokgate exited:\n{(data_dir / 'server.log').read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("grokgate did not become ready")


def api_timings(url: str) -> None:
    """What the overview asks for, one call at a time (median of 5), to show where first paint goes."""
    today = dt.datetime.now(dt.UTC).date()
    since = (today - dt.timedelta(days=29)).isoformat()
    calls: dict[str, tuple[str, dict[str, str | int]]] = {
        "GET /admin/keys": ("/admin/keys", {}),
        "GET /admin/usage?by=day (30 days)": ("/admin/usage", {"by": "day", "since": since}),
        "GET /admin/usage?by=model (30 days)": ("/admin/usage", {"by": "model", "since": since}),
        "GET /admin/ledger/errors (30 days)": ("/admin/ledger/errors", {"since": since, "until": today.isoformat()}),
        "GET /admin/ledger/search?limit=50": ("/admin/ledger/search", {"limit": 50}),
        "GET /readyz": ("/readyz", {}),
        "GET /admin/accounts/1": ("/admin/accounts/1", {}),
        "GET /admin/usage?account=1 (30 days)": ("/admin/usage", {"by": "day", "since": since, "account": "1"}),
    }
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as client:
        for label, (path, params) in calls.items():
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                client.get(path, params=params).raise_for_status()
                times.append((time.perf_counter() - t0) * 1000)
            print(f"  {label:<40} {statistics.median(times):7.1f} ms", flush=True)


# -- the browser ---------------------------------------------------------------------------------------------

def first_paint(url: str, runs: int, page_name: str = "overview") -> list[tuple[float, float]]:
    """`page_name`: overview, or accounts (the page of account 1: its keys, and its and its first key's charts)."""
    from playwright.sync_api import sync_playwright

    results = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for _ in range(runs):
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            # Signed in already, as after pasting the token: the console finds it in sessionStorage at start.
            context.add_init_script(f"sessionStorage.setItem({TOKEN_KEY!r}, {ADMIN!r})")
            page = context.new_page()
            t0 = time.perf_counter()
            page.goto(f"{url}/console{FRAGMENTS[page_name]}", wait_until="commit")
            page.wait_for_selector(f"main[data-painted={page_name}]", timeout=30_000)
            wall = (time.perf_counter() - t0) * 1000
            mark = page.evaluate(f"performance.getEntriesByName('console:painted:{page_name}')[0].startTime")
            bars = page.eval_on_selector_all("g.bar", "gs => gs.filter(g => Number(g.dataset.value) > 0).length")
            if not bars:
                raise SystemExit(f"the {page_name} page painted without data")
            results.append((float(mark), wall))
            context.close()
        browser.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the data dir")
    parser.add_argument("--page", choices=sorted(FRAGMENTS), default="overview",
                        help="overview, or accounts: the page of account 1 (the busiest), its keys and charts")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is absent: install Debian's chromium first", file=sys.stderr)
        return 2
    data_dir = Path(tempfile.mkdtemp(prefix="grokgate-console-bench-"))
    process = None
    try:
        t0 = time.perf_counter()
        populate(data_dir, args.rows, args.days, args.tokens)
        print(f"populated in {time.perf_counter() - t0:.1f} s", flush=True)
        process, url = start(data_dir)
        print("API (median of 5):", flush=True)
        api_timings(url)
        results = first_paint(url, args.runs, args.page)
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    marks = [m for m, _ in results]
    walls = [w for _, w in results]
    print(f"first paint of the {args.page} page with data, {args.runs} cold runs (fresh browser context each):")
    print(f"  in-page (navigation start -> painted mark): median {statistics.median(marks):.0f} ms, "
          f"max {max(marks):.0f} ms  [{', '.join(f'{m:.0f}' for m in marks)}]")
    print(f"  wall (page.goto -> marker seen by Playwright): median {statistics.median(walls):.0f} ms, "
          f"max {max(walls):.0f} ms")
    ok = statistics.median(marks) < 1000
    print(f"target < 1000 ms: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
