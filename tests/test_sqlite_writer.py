"""The SQLite writer process: what happens to a batch when it dies.

If it dies before its answer arrives, nobody knows whether the batch committed. The store then stops the
child (so nothing is still writing) and settles the batch itself with the ledger check: what committed is
skipped, the rest is charged once.

The tests that serve requests run the app in this process (tests/inproc.py) on a real SQLite file: its store
and its writer child are those of `grokgate serve`, the writer a child of this process, and the scripted
provider answers at once (what they show does not depend on the backend).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pickle
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from grokgate.core.accounts import Settlement, TokenRecord
from grokgate.core.budgets import Hold
from grokgate.core.events import Usage
from grokgate.store.batch import sqlite_statements
from grokgate.store.sql import SqlStore
from grokgate.store.sqlite_writer import SqliteWriter, WriterFailed
from tests.conftest import E2E, create_key
from tests.inproc import AppServer, ScriptedProvider, app_server
from tests.test_billing import CHEAP, admin_get, check_books, race


class Gateway(AppServer):
    """The in-process app, with the scripted provider answering every model."""

    @property
    def provider(self) -> ScriptedProvider:
        provider: ScriptedProvider = self.extra["provider"]
        return provider


@contextlib.contextmanager
def serving(tmp: Path, **settings: Any) -> Iterator[Gateway]:
    """The app on a SQLite file under `tmp`, every model answered by a scripted provider."""
    with app_server(tmp, **settings) as served:
        yield Gateway(url=served.url, app=served.app, extra=served.extra)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def warnings_logged() -> Iterator[list[str]]:
    """The warnings grokgate logs meanwhile (what a server's log shows)."""
    handler = _Lines()
    logger = logging.getLogger("grokgate")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


@contextlib.asynccontextmanager
async def _funded_store(tmp_path: Path, credits: int = 1_000_000) -> AsyncIterator[tuple[SqlStore, TokenRecord]]:
    """A serving SQLite store (so with its writer process) and one token holding `credits`."""
    store = SqlStore(f"sqlite:///{tmp_path}/g.db")
    await store.open(serve=True)
    try:
        record, _ = await store.create_token("t")
        if credits:
            await store.add_credits(record.id, credits)
        yield store, record
    finally:
        await store.close()


def _settlement(record: TokenRecord, cost: int) -> Settlement:
    return Settlement(request_id=uuid.uuid4().hex, token_id=record.id, account_id=record.account_id, model="grok-3",
                      backend="test",
                      usage=Usage(prompt_tokens=10, completion_tokens=5), cost=cost, price_version=1,
                      status="ok", estimated=False, duration_ms=1, reserved=0)


def test_batch_committed_but_answer_lost_is_not_charged_twice(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with _funded_store(tmp_path) as (store, record):
            real_call = SqliteWriter._call
            calls = {"n": 0}

            async def commit_then_vanish(self: SqliteWriter, frame: bytes) -> tuple[str, Any]:
                answer = await real_call(self, frame)
                if isinstance(pickle.loads(frame[4:]), tuple):  # a batch (the setup is a dict)
                    calls["n"] += 1
                    if calls["n"] == 1:  # the first batch committed in the child, then the answer was lost
                        raise WriterFailed("simulated: the answer never arrived")
                return answer

            monkeypatch.setattr(SqliteWriter, "_call", commit_then_vanish)
            batch = [_settlement(record, 1000 + i) for i in range(5)]
            await asyncio.gather(*(store.settle(s) for s in batch))
            after = await store.get_token(record.id)
            assert after is not None and after.balance == 1_000_000 - sum(s.cost for s in batch)
            rows = await store.ledger_rows(token_id=record.id, limit=100)
            usage = [r for r in rows if r["kind"] == "usage"]
            assert sorted(r["request_id"] for r in usage) == sorted(s.request_id for s in batch)
            # The next batch goes to a new child.
            more = _settlement(record, 7)
            await store.settle(more)
            again = await store.get_token(record.id)
            assert again is not None and again.balance == after.balance - 7

    asyncio.run(scenario())


@E2E
def test_writer_killed_in_the_middle_of_a_batch(tmp_path: Path) -> None:
    """The child is stopped (SIGSTOP) so that requests wait on its answer, then killed: their batch settles in
    the server instead, and every answer is in the ledger once."""
    with serving(tmp_path) as srv, warnings_logged() as logged:
        token, key = create_key(srv, "m", credits="5")
        pid = writer_pid(srv)
        assert pid is not None
        answers: list[tuple[int, str]] = []

        def one() -> None:
            with srv.client() as c:
                r = c.post("/grok/chat/completions", json=CHEAP, headers={"Authorization": f"Bearer {token}"})
                answers.append((r.status_code, r.headers["x-request-id"]))

        before = srv.provider.closed
        os.kill(pid, signal.SIGSTOP)
        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while srv.provider.closed < before + 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.provider.closed == before + 4, "the four generations ended"
        time.sleep(0.5)  # they now wait for their settlement, in a batch the stopped child holds
        assert not answers, "no answer before its settlement is committed"
        os.kill(pid, signal.SIGKILL)
        for t in threads:
            t.join()
        assert sorted(code for code, _ in answers) == [200] * 4, answers
        rows = admin_get(srv, f"/admin/ledger?token={key['id']}&limit=100")["data"]
        assert sorted(r["request_id"] for r in rows if r["kind"] == "usage") == sorted(rid for _, rid in answers)
        check_books(srv, key["id"], 5_000_000, 4)
        assert "the SQLite writer process failed; settling its batch in this process" in logged
        one()  # the next batch starts a new writer
        assert answers[-1][0] == 200
        new = writer_pid(srv)
        assert new is not None and new != pid, "the next batch started a new writer"


def test_a_stuck_writer_is_replaced_and_its_batch_settled_here(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _funded_store(tmp_path) as (store, record):
            settler = store._settler
            assert settler is not None and settler.pid is not None
            settler.timeout = 1.5
            stuck = settler.pid
            os.kill(stuck, signal.SIGSTOP)
            started = time.monotonic()
            batch = [_settlement(record, 100) for _ in range(3)]
            await asyncio.gather(*(store.settle(s) for s in batch))
            # One timeout, then it is killed: not a second timeout spent waiting for a stopped child to exit.
            assert time.monotonic() - started < 2 * settler.timeout - 0.1
            after = await store.get_token(record.id)
            assert after is not None and after.balance == 1_000_000 - 300
            rows = await store.ledger_rows(token_id=record.id, limit=100)
            assert sorted(r["request_id"] for r in rows if r["kind"] == "usage") == sorted(s.request_id for s in batch)
            with pytest.raises(ProcessLookupError):
                os.kill(stuck, 0)  # killed and reaped

    asyncio.run(scenario())


def test_the_same_settlement_twice_in_one_batch_is_charged_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _funded_store(tmp_path) as (store, record):
            s = _settlement(record, 250)
            await asyncio.gather(store.settle(s), store.settle(s))
            after = await store.get_token(record.id)
            assert after is not None and after.balance == 1_000_000 - 250
            rows = await store.ledger_rows(token_id=record.id, limit=100)
            assert [r["request_id"] for r in rows if r["kind"] == "usage"] == [s.request_id]

    asyncio.run(scenario())


def test_admin_writes_in_a_batch_whose_settlement_fails_run_once(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A top-up committed in the same batch as a settlement that fails must not be applied again."""
    async def scenario() -> None:
        async with _funded_store(tmp_path, credits=0) as (store, record):

            async def refuse(self: SqliteWriter, items: Any) -> dict[int, int]:
                raise RuntimeError("settlement failed in the SQLite writer: simulated")

            def refuse_here(self: SqlStore, settlements: list[Settlement]) -> dict[int, int]:
                raise RuntimeError("simulated: the settlement fails here too")

            monkeypatch.setattr(SqliteWriter, "settle", refuse)
            monkeypatch.setattr(SqlStore, "_settle_checked", refuse_here)  # where it is retried on its own
            s = _settlement(record, 10)
            results = await asyncio.gather(store.add_credits(record.id, 5_000), store.settle(s),
                                           return_exceptions=True)
            assert isinstance(results[1], RuntimeError)
            after = await store.get_token(record.id)
            assert after is not None and after.balance == 5_000
            rows = await store.ledger_rows(token_id=record.id, limit=100)
            assert [r["kind"] for r in rows] == ["topup"]

    asyncio.run(scenario())


def test_no_new_writer_can_start_settles_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child died and no new one can be started (out of pids, say): settlements still commit, here."""
    async def scenario() -> None:
        async with _funded_store(tmp_path) as (store, record):
            settler = store._settler
            assert settler is not None and settler.pid is not None
            os.kill(settler.pid, signal.SIGKILL)
            monkeypatch.setattr("grokgate.store.sqlite_writer.sys.executable", str(tmp_path / "no-python"))
            for _ in range(2):  # the first finds the child dead, the second finds no child at all
                batch = [_settlement(record, 100) for _ in range(3)]
                await asyncio.gather(*(store.settle(s) for s in batch))
            after = await store.get_token(record.id)
            assert after is not None and after.balance == 1_000_000 - 600
            rows = await store.ledger_rows(token_id=record.id, limit=100)
            assert len([r for r in rows if r["kind"] == "usage"]) == 6

    asyncio.run(scenario())


def writer_children(pid: int) -> set[int]:
    """The live SQLite writer processes among `pid`'s children."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                if b"grokgate.store.writer_child" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.add(int(child))
            except FileNotFoundError:
                continue
    return found


def writer_pid(server: Gateway) -> int | None:
    """The SQLite writer child of the app's store, if it has one running: a child of this process."""
    settler = server.app.state.gateway.store._settler
    pid = settler.pid if settler is not None else None
    return pid if pid in writer_children(os.getpid()) else None


@E2E
def test_writer_process_killed_under_load_loses_and_doubles_nothing(tmp_path: Path) -> None:
    """Settlements commit in a child process. Killed mid-batch, it either committed the batch or not; the
    server settles the batch itself, skipping what the ledger already has, and starts a new child."""
    with serving(tmp_path) as srv, warnings_logged() as logged:  # answers in ms: many batches
        token, key = create_key(srv, "w", credits="5")
        first = writer_pid(srv)
        assert first is not None, "the SQLite writer process runs"
        answers: list[tuple[int, str]] = []
        stop = threading.Event()

        def client() -> None:
            with srv.client() as c:
                while not stop.is_set():
                    r = c.post("/grok/chat/completions", json=CHEAP, headers={"Authorization": f"Bearer {token}"})
                    answers.append((r.status_code, r.headers["x-request-id"]))

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        killed = []
        for _ in range(2):
            deadline = time.monotonic() + 30
            pid = writer_pid(srv)
            while (pid is None or pid in killed) and time.monotonic() < deadline:
                time.sleep(0.05)
                pid = writer_pid(srv)
            assert pid is not None and pid not in killed, "a new writer process replaces a dead one"
            seen = len(answers)
            while len(answers) < seen + 10 and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()

        assert answers and {code for code, _ in answers} == {200}, answers
        rows = admin_get(srv, f"/admin/ledger?token={key['id']}&limit=10000")["data"]
        usage_ids = [r["request_id"] for r in rows if r["kind"] == "usage"]
        assert sorted(usage_ids) == sorted(rid for _, rid in answers), "each answer in the ledger exactly once"
        check_books(srv, key["id"], 5_000_000, len(answers))
        assert any("SQLite writer process" in line for line in logged)  # its end was logged, one way or the other


@E2E
def test_settlements_in_a_writer_thread_cannot_overdraw(tmp_path: Path) -> None:
    """GROKGATE_SQLITE_WRITER=thread: the same race, with settlements committed by a thread of the server."""
    with serving(tmp_path, sqlite_writer="thread") as srv:
        assert srv.app.state.gateway.store._settler is None and writer_pid(srv) is None
        race([srv])


async def _usage_ids(store: SqlStore, token_id: int) -> list[str]:
    rows = await store.ledger_rows(token_id=token_id, limit=1000)
    return sorted(r["request_id"] for r in rows if r["kind"] == "usage")


def test_lost_answer_then_a_failed_fallback_still_charges_once_and_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child committed, its answer was lost, and settling here failed too ("database is locked"): the
    settlements are retried one by one through the ledger check, so each succeeds and is charged once
    (retried in the child they would hit the ledger's unique request id and report a billed request as
    failed)."""
    async def scenario() -> None:
        async with _funded_store(tmp_path) as (store, record):
            real_call, real_checked = SqliteWriter._call, SqlStore._settle_checked
            failures = {"call": 1, "checked": 1}

            async def commit_then_vanish(self: SqliteWriter, frame: bytes) -> tuple[str, Any]:
                answer = await real_call(self, frame)
                if isinstance(pickle.loads(frame[4:]), tuple) and failures["call"]:  # a batch, not the setup
                    failures["call"] -= 1
                    raise WriterFailed("simulated: the answer never arrived")
                return answer

            def locked_once(self: SqlStore, settlements: list[Settlement]) -> dict[int, int]:
                if failures["checked"]:
                    failures["checked"] -= 1
                    raise sqlite3.OperationalError("database is locked")
                return real_checked(self, settlements)

            monkeypatch.setattr(SqliteWriter, "_call", commit_then_vanish)
            monkeypatch.setattr(SqlStore, "_settle_checked", locked_once)
            batch = [_settlement(record, 1000 + i) for i in range(3)]
            await asyncio.gather(*(store.settle(s) for s in batch))  # none raises
            assert failures == {"call": 0, "checked": 0}, "both failures happened"
            after = await store.get_token(record.id)
            assert after is not None and after.balance == 1_000_000 - sum(s.cost for s in batch)
            assert await _usage_ids(store, record.id) == sorted(s.request_id for s in batch)

    asyncio.run(scenario())


def test_an_answer_that_is_not_one_is_a_writer_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A garbled answer (here: one that does not unpickle) means the child's state is unknown, like a dead
    child: it is stopped and the batch settled here with the ledger check, not reported as failed."""
    async def scenario() -> None:
        async with _funded_store(tmp_path) as (store, record):
            settler = store._settler
            assert settler is not None and settler.pid is not None
            first = settler.pid
            real_loads = pickle.loads
            garbled = {"n": 1}

            def loads(data: bytes) -> Any:
                if garbled["n"]:
                    garbled["n"] -= 1
                    raise pickle.UnpicklingError("simulated: a garbled answer")
                return real_loads(data)

            monkeypatch.setattr("grokgate.store.sqlite_writer.pickle.loads", loads)
            batch = [_settlement(record, 100) for _ in range(3)]
            await asyncio.gather(*(store.settle(s) for s in batch))
            after = await store.get_token(record.id)
            assert after is not None and after.balance == 1_000_000 - 300
            assert await _usage_ids(store, record.id) == sorted(s.request_id for s in batch)
            with pytest.raises(ProcessLookupError):
                os.kill(first, 0)  # that child was stopped and reaped

    asyncio.run(scenario())


def test_sqlite_url_with_a_query_string(tmp_path: Path) -> None:
    """`?timeout=20` belongs to the URL, not the file name: the writer process and the lock use g.db."""
    async def scenario() -> None:
        store = SqlStore(f"sqlite:///{tmp_path}/g.db?timeout=20")
        await store.open(serve=True)
        try:
            assert store._settler is not None, "the writer process started on the right file"
            record, _ = await store.create_token("q")
            await store.add_credits(record.id, 1_000)
            s = _settlement(record, 10)
            await store.settle(s)
            after = await store.get_token(record.id)
            assert after is not None and after.balance == 990
            assert await _usage_ids(store, record.id) == [s.request_id]
        finally:
            await store.close()

    asyncio.run(scenario())
    assert sorted(p.name for p in tmp_path.iterdir() if "?" in p.name) == []
    assert (tmp_path / "g.db.lock").exists()


def test_a_writer_pointed_at_another_file_fails_to_start(tmp_path: Path) -> None:
    async def scenario() -> None:
        writer = SqliteWriter(str(tmp_path / "empty.db"), sqlite_statements(), timeout=30)
        with pytest.raises(WriterFailed, match="no such table"):
            await writer.start()
        assert writer.pid is None

    asyncio.run(scenario())


def test_settlements_that_arrive_while_the_store_closes_are_committed(tmp_path: Path) -> None:
    """At shutdown the server cancels requests it gave up on and closes the store at once; their settlements
    come from their `finally` a moment later. close() waits for every granted reservation to settle."""
    async def scenario() -> None:
        async with _funded_store(tmp_path) as (store, record):
            late = [dataclasses.replace(_settlement(record, 100), reserved=500) for _ in range(3)]
            for s in late:
                assert (await store.reserve(Hold(record.account_id, record.id, s.request_id, s.reserved))).granted

            async def settle_late(s: Settlement, delay: float) -> None:
                await asyncio.sleep(delay)
                await store.settle(s)

            tasks = [asyncio.create_task(settle_late(s, 0.1 * (i + 1))) for i, s in enumerate(late)]
            await store.close()
            await asyncio.gather(*tasks)
            with pytest.raises(RuntimeError, match="the store is closed"):
                await store.settle(_settlement(record, 1))
        reopened = SqlStore(f"sqlite:///{tmp_path}/g.db")
        await reopened.open()
        try:
            after = await reopened.get_token(record.id)
            assert after is not None and after.balance == 1_000_000 - 300
            assert await _usage_ids(reopened, record.id) == sorted(s.request_id for s in late)
        finally:
            await reopened.close()

    asyncio.run(scenario())
