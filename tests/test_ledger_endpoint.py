"""The ledger says which API a charge came from (chat | responses) and how many server-side tool calls it paid for;
server-side tool calls are reserved and charged per call (core/pricing.py, core/billing.py), never above the
reservation for a request within its bounds. In process: the real admission and store (SQLite in both writer
modes; PostgreSQL when present) and the ledger routes (api/ledger.py) over ASGI.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI

from grokgate.api.ledger import router
from grokgate.core.admission import AdmissionRequest
from grokgate.core.billing import AccountAdmission, AccountTicket, BillingPolicy
from grokgate.core.errors import GatewayError
from grokgate.core.events import Usage
from grokgate.core.pricing import Price, cost_of, max_cost
from grokgate.store.limits_memory import MemoryRateLimiter
from grokgate.store.sql import SqlStore
from tests.conftest import TOKEN
from tests.test_response_store import pg_database

MODEL = "grok-3"
PRICE = Price(MODEL, input=3_000_000, cached_input=750_000, output=15_000_000)  # micro-credits per million
TOOL_CALL = 25_000  # micro-credits per server-side tool call
FUNDS = 10_000_000

BACKENDS = ["sqlite-process", "sqlite-thread", pytest.param("postgresql", marks=pytest.mark.e2e)]


@asynccontextmanager
async def opened(kind: str, tmp_path: Path) -> AsyncIterator[SqlStore]:
    if kind == "postgresql":
        async with pg_database() as url:
            store = SqlStore(url)
            await store.open(serve=True)
            try:
                yield store
            finally:
                await store.close()
        return
    store = SqlStore(f"sqlite:///{tmp_path}/g.db", writer_process=kind == "sqlite-process")
    await store.open(serve=True)
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def accounts(kind: str, tmp_path: Path) -> AsyncIterator[tuple[SqlStore, AccountAdmission, str, int]]:
    """A store with grok-3's price, one funded token (its secret and id) and the admission over them."""
    async with opened(kind, tmp_path) as store:
        await store.set_price(PRICE)
        record, secret = await store.create_token("holder")
        await store.add_credits(record.id, FUNDS)
        admission = AccountAdmission(store, MemoryRateLimiter(), [TOKEN],
                                     BillingPolicy(server_tool_call_price=TOOL_CALL))
        yield store, admission, secret, record.id


async def admit(admission: AccountAdmission, secret: str, request_id: str, *, endpoint: str = "chat",
                tools: int = 0, prompt: int = 50, output: int = 100) -> AccountTicket:
    principal = await admission.authenticate(f"Bearer {secret}")
    return await admission.admit(principal, AdmissionRequest(request_id, MODEL, 1, output, prompt, endpoint, tools))


async def balance(store: SqlStore, token_id: int) -> int:
    record = await store.get_token(token_id)
    assert record is not None
    return record.balance


def ledger_client(store: SqlStore, admission: AccountAdmission) -> httpx.AsyncClient:
    """The ledger routes alone, over ASGI: what they need of the gateway is its admission and its store."""
    app = FastAPI()
    app.include_router(router)
    app.state.gateway = SimpleNamespace(admission=admission, store=store)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ledger")


@pytest.mark.parametrize("kind", BACKENDS)
def test_responses_charge_with_tool_calls_shows_in_the_ledger(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with accounts(kind, tmp_path) as (store, admission, secret, token_id):
            # A Responses request that may run 3 server-side tools reserves them, at the per-call price.
            ticket = await admit(admission, secret, "req-responses", endpoint="responses", tools=3)
            assert ticket.reserved == max_cost(50, 1, 100, PRICE) + 3 * TOOL_CALL
            assert await balance(store, token_id) == FUNDS - ticket.reserved
            usage = Usage(prompt_tokens=40, completion_tokens=60, cached_tokens=10, server_tool_calls=2)
            await ticket.settle(usage, status="ok", backend="xai")
            expected = cost_of(usage, PRICE).total + 2 * TOOL_CALL
            assert ticket.cost == expected and not ticket.overrun
            # A chat request reserves no tool calls and is recorded as chat.
            chat = await admit(admission, secret, "req-chat")
            assert chat.reserved == max_cost(50, 1, 100, PRICE)
            await chat.settle(Usage(prompt_tokens=30, completion_tokens=20), status="ok", backend="local")
            assert await balance(store, token_id) == FUNDS - expected - chat.cost

            async with ledger_client(store, admission) as client:
                own = await client.get("/v1/ledger", headers={"Authorization": f"Bearer {secret}"})
                assert own.status_code == 200, own.text
                rows = {r["request_id"]: r for r in own.json()["data"]}
                responses = rows["req-responses"]
                assert (responses["endpoint"], responses["server_tool_calls"]) == ("responses", 2)
                assert responses["cost"] == expected and responses["amount"] == -expected
                assert (rows["req-chat"]["endpoint"], rows["req-chat"]["server_tool_calls"]) == ("chat", 0)
                [topup] = [r for r in rows.values() if r["kind"] == "topup"]
                assert topup["endpoint"] is None and topup["server_tool_calls"] == 0

                admin = {"Authorization": f"Bearer {TOKEN}"}
                only = await client.get("/admin/ledger/search", params={"endpoint": "responses"}, headers=admin)
                assert [r["request_id"] for r in only.json()["data"]] == ["req-responses"]
                chats = await client.get("/admin/ledger/search", params={"endpoint": "chat"}, headers=admin)
                assert [r["request_id"] for r in chats.json()["data"]] == ["req-chat"]
                bad = await client.get("/admin/ledger/search", params={"endpoint": "completions"}, headers=admin)
                assert bad.status_code in (400, 422)

                exported = await client.get("/v1/ledger", params={"format": "csv"},
                                            headers={"Authorization": f"Bearer {secret}"})
                assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
                table = list(csv.DictReader(io.StringIO(exported.text)))
                assert {"endpoint", "server_tool_calls"} <= set(table[0])
                by_id = {r["request_id"]: r for r in table}
                assert (by_id["req-responses"]["endpoint"], by_id["req-responses"]["server_tool_calls"]) == \
                    ("responses", "2")
                assert by_id["req-chat"]["endpoint"] == "chat"

    asyncio.run(main())


def test_server_tool_calls_are_priced_per_call() -> None:
    usage = Usage(prompt_tokens=1000, cached_tokens=400, completion_tokens=7, server_tool_calls=3)
    tokens_only = cost_of(usage, PRICE)
    with_tools = cost_of(usage, PRICE, tool_call_price=TOOL_CALL)
    assert tokens_only.server_tools == 0, "no price given: the calls cost nothing (the chat path)"
    assert with_tools.server_tools == 3 * TOOL_CALL
    assert with_tools.total == tokens_only.total + 3 * TOOL_CALL
    assert isinstance(with_tools.total, int)
    assert max_cost(10, 2, 5, PRICE, server_tool_calls=4, tool_call_price=TOOL_CALL) == \
        max_cost(10, 2, 5, PRICE) + 4 * TOOL_CALL
    with pytest.raises(ValueError):
        BillingPolicy(server_tool_call_price=-1)


@pytest.mark.parametrize("kind", ["sqlite-process"])
def test_settlement_never_exceeds_the_reservation_within_bounds(kind: str, tmp_path: Path) -> None:
    """Every usage within the request's bounds (prompt, output, tool calls) costs at most what was reserved, the
    worst case exactly that; more tool calls than reserved is an overrun, reported, and still charged."""
    async def main() -> None:
        async with accounts(kind, tmp_path) as (store, admission, secret, token_id):
            spent = 0
            cases = [
                Usage(prompt_tokens=50, completion_tokens=100, server_tool_calls=4),  # the worst case
                Usage(prompt_tokens=50, cached_tokens=50, completion_tokens=100, server_tool_calls=4),
                Usage(prompt_tokens=1, completion_tokens=1, server_tool_calls=0),
                Usage(prompt_tokens=0, completion_tokens=0, server_tool_calls=4),
            ]
            for i, usage in enumerate(cases):
                ticket = await admit(admission, secret, f"req-{i}", endpoint="responses", tools=4)
                await ticket.settle(usage, status="ok", backend="xai")
                assert ticket.cost <= ticket.reserved and not ticket.overrun, usage
                spent += ticket.cost
            worst = await admit(admission, secret, "req-worst", endpoint="responses", tools=4)
            await worst.settle(cases[0], status="ok")
            assert worst.cost == worst.reserved, "the reservation is exactly the worst case: no more is held"
            spent += worst.cost

            over = await admit(admission, secret, "req-over", endpoint="responses", tools=1)
            await over.settle(Usage(prompt_tokens=1, completion_tokens=1, server_tool_calls=5), status="ok")
            assert over.overrun and over.cost > over.reserved  # a bound the upstream did not keep: reported
            spent += over.cost
            # Stopped before any output: billed nothing, tool calls included (the rule for failures, billing.py).
            failed = await admit(admission, secret, "req-failed", endpoint="responses", tools=2)
            await failed.settle(Usage(prompt_tokens=10, server_tool_calls=2), status="error")
            assert failed.cost == 0
            assert await balance(store, token_id) == FUNDS - spent
            rows = {r["request_id"]: r for r in await store.ledger_rows(token_id=token_id)}
            assert rows["req-over"]["server_tool_calls"] == 5 and rows["req-over"]["cost"] == over.cost
            assert rows["req-failed"]["server_tool_calls"] == 2 and rows["req-failed"]["amount"] == 0

    asyncio.run(main())


def test_a_balance_short_of_the_tool_calls_is_refused(tmp_path: Path) -> None:
    """The tool calls are part of the reservation: a balance that covers the tokens but not the calls is refused
    before anything runs."""
    async def main() -> None:
        async with accounts("sqlite-thread", tmp_path) as (store, admission, secret, token_id):
            tokens = max_cost(50, 1, 100, PRICE)
            calls = (FUNDS - tokens) // TOOL_CALL + 1  # one call more than the rest of the balance covers
            with pytest.raises(GatewayError) as refused:
                await admit(admission, secret, "req-many", endpoint="responses", tools=calls)
            assert refused.value.status == 403
            ticket = await admit(admission, secret, "req-fits", endpoint="responses", tools=calls - 1)
            assert ticket.reserved <= FUNDS
            await ticket.settle(Usage(prompt_tokens=1, completion_tokens=1), status="ok")
            assert await balance(store, token_id) == FUNDS - ticket.cost

    asyncio.run(main())
