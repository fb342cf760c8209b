"""PostgreSQL away for a while under a replica: new requests refused cleanly, answers in flight billed once after.

A real `grokgate serve` on a real PostgreSQL, reached through a TCP proxy the test cuts (tests/tcp_proxy.py): the
connections reset and the port refusing, or the network silent (a black hole: only timeouts tell). Meanwhile new
requests get 503 `accounts_unavailable` with retry-after within seconds (never a 500, never a hang); requests
already admitted finish and their settlements are kept (store/holds.py); when the database is back each is
committed exactly once, the books are exact and nothing is left reserved.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import Server, create_key, err, start_server, stop_server, user
from tests.fakes.fake_xai import FakeXAI
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.e2e

FAKE_KEY = "xai-outage-key"
CHEAP = {"model": "grok-3", "messages": user("hi"), "max_tokens": 1}
FUNDED = 10_000_000  # micro-credits: 10 credits


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeXAI]:
    with FakeXAI(api_keys=[FAKE_KEY]).start() as upstream:
        yield upstream


def _env(tmp: Path, fake: FakeXAI, database_url: str) -> dict[str, str | None]:
    routing = tmp / "routing.yaml"
    routing.write_text(f"""
backends:
  fake: {{kind: xai, base_url: "{fake.url}", api_key_env: XAI_FAKE}}
models:
  grok-3: [{{backend: fake}}]
""")
    return {"GROKGATE_CONFIG": str(routing), "XAI_FAKE": FAKE_KEY, "GROKGATE_DATABASE_URL": database_url,
            "GROKGATE_LOG_LEVEL": "WARNING"}


def _post(server: Server, token: str) -> httpx.Response:
    with server.client(timeout=30) as c:
        return c.post("/grok/chat/completions", json=CHEAP, headers={"Authorization": f"Bearer {token}"})


async def _books(url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT request_id, cost, amount FROM ledger WHERE kind = 'usage'")
        balance, reserved = await conn.fetchrow("SELECT balance, reserved FROM accounts WHERE name = 'outage'")
        holds = await conn.fetchval("SELECT count(*) FROM reservations")
    finally:
        await conn.close()
    return {"ids": [r["request_id"] for r in rows], "charged": -sum(r["amount"] for r in rows),
            "costs": sum(r["cost"] for r in rows), "balance": balance, "reserved": reserved, "holds": holds}


def _settled(url: str, expected: int, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        books = asyncio.run(_books(url))
        if (len(books["ids"]) >= expected and books["holds"] == 0) or time.monotonic() > deadline:
            return books
        time.sleep(0.2)


@pytest.mark.parametrize("failure", ["refuse", "blackhole"])
def test_database_away_refuses_new_requests_and_bills_the_answers_in_flight_once(
        tmp_path: Path, fake: FakeXAI, pg_url: str, failure: str) -> None:
    with TcpProxy(5432).running() as proxy:
        through_proxy = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        assert through_proxy != pg_url
        server = start_server(tmp_path, env=_env(tmp_path, fake, through_proxy), name=f"outage-{failure}")
        try:
            token, _ = create_key(server, "outage", credits="10")
            first = _post(server, token)
            assert first.status_code == 200, first.text
            fake.fail_next(*[{"fault": "stall", "seconds": 2}] * 4)
            with ThreadPoolExecutor(4) as pool:
                # Admitted (their reservations committed), then held 2 s by the upstream.
                slow = [pool.submit(_post, server, token) for _ in range(4)]
                time.sleep(1.0)
                getattr(proxy, failure)()
                started = time.monotonic()
                refused = _post(server, token)
                waited = time.monotonic() - started
                answers = [f.result() for f in slow]
                answered_after = time.monotonic() - started
            err(refused, 503, "accounts_unavailable")
            assert refused.headers["retry-after"] == "1"
            assert waited < 15, waited  # connect timeout (2 s) + call timeout (10 s) at worst, never the kernel's
            assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
            assert answered_after > 0.5  # they were in flight while the database was away
            proxy.restore()
            books = _settled(pg_url, expected=5)
            answered = [first.headers["x-request-id"]] + [a.headers["x-request-id"] for a in answers]
            assert sorted(books["ids"]) == sorted(answered)  # each answer once; the refused one never
            assert books["holds"] == 0 and books["reserved"] == 0
            assert books["charged"] == books["costs"] > 0
            assert books["balance"] == FUNDED - books["charged"]
            again = _post(server, token)
            assert again.status_code == 200, again.text
            log = server.log()
            assert "accounts database is unreachable" in log and "answers again" in log, log
            assert "Traceback" not in log, log
        finally:
            stop_server(server)
        final = asyncio.run(_books(pg_url))
        assert final["holds"] == 0 and final["balance"] == FUNDED - final["charged"]
        assert len(final["ids"]) == 6
