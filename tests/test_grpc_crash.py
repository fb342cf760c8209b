"""SIGKILL under gRPC load (issue 18's done-when): a real `grokgate serve` (accounts on SQLite, grok-3 on the fake
xAI) is driven by concurrent xai-sdk clients mixing `chat.sample()` and `chat.stream()`, killed mid-load and
restarted on its data dir. Every answer a client completed is in the ledger exactly once, with the tokens the
client was told; the requests killed in flight hold nothing after the restart; the balance moved by exactly the
ledger's costs; and the restarted server serves gRPC again.

A client's answer is complete when `sample()` returned, or when a stream's usage chunk (its last: the settlement
commits before it goes out, serving/lifecycle.py) arrived. Its ledger row is found by the request id the server
sends in the RPC's initial metadata (`x-request-id`, as HTTP's header), read through an interceptor on the SDK's
channel: the completion id (`chatcmpl-...`) is not in the ledger.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import xai_sdk
import xai_sdk.sync.chat
from xai_sdk.chat import user

from grokgate.core.accounts import format_credits
from tests.conftest import Server, create_key, free_port, start_server, stop_server
from tests.fakes.fake_xai import FakeXAI
from tests.test_billing import FAKE_KEY, admin_get, check_books, upstream_env

pytestmark = pytest.mark.e2e

CLIENTS = 8
INITIAL = 5_000_000  # micro-credits: 5 credits, far more than the run spends
# The fake holds every request before answering and paces a stream's chunks, so that whenever the server is
# killed several RPCs of both kinds are in flight (each client always has one).
UPSTREAM_PACE = {"x-fake-fault": "stall;seconds=0.1", "x-fake-chunk-delay-ms": "25"}
COMPLETED_SAMPLES = COMPLETED_STREAMS = 6  # at least this many of each before the kill
LOAD_DEADLINE_S = 30
JOIN_S = 30  # how long a client thread may take to end once its channel is closed (it takes milliseconds)


@pytest.fixture
def fake() -> Iterator[FakeXAI]:
    with FakeXAI(api_keys=[FAKE_KEY]).start() as upstream:
        upstream.header_defaults.update(UPSTREAM_PACE)
        yield upstream


class LastCall(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Keeps the call object of the client's latest RPC, whose metadata carries the server's `x-request-id`
    (trailing for a sample, initial for a stream). One per client, and each client is used by one thread."""

    def __init__(self) -> None:
        self.call: Any = None

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.call = continuation(details, request)
        return self.call

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        self.call = continuation(details, request)
        return self.call

    def request_id(self) -> str:
        metadata = {**dict(self.call.initial_metadata() or ()), **dict(self.call.trailing_metadata() or ())}
        request_id: str = metadata["x-request-id"]
        return request_id


def sdk_client(port: int, secret: str) -> tuple[xai_sdk.Client, LastCall]:
    """xai-sdk's sync client as an app makes it (plaintext on `localhost:<port>`), its chat calls seen by a
    `LastCall` on the SDK's own channel (its key, timeout and retry policy stay the SDK's)."""
    client = xai_sdk.Client(api_key=secret, api_host=f"localhost:{port}", timeout=30)
    last = LastCall()
    client.chat = xai_sdk.sync.chat.Client(grpc.intercept_channel(client._api_channel, last))
    return client, last


@dataclass(frozen=True)
class Answer:
    """A completed answer as its client saw it."""

    request_id: str
    kind: str  # "sample" or "stream"
    prompt_tokens: int
    completion_tokens: int


def ask(client: xai_sdk.Client, last: LastCall, i: int, n: int) -> Answer:
    """One request of client `i`, its `n`th: a sample or a stream in turn, with an output cap that varies; the
    answer once it is complete. An RPC error propagates."""
    chat = client.chat.create(model="grok-3", messages=[user(f"Client {i} asks question {n}.")],
                              max_tokens=2 + (i + n) % 4)
    if (i + n) % 2 == 0:
        response = chat.sample()
        return Answer(last.request_id(), "sample", response.usage.prompt_tokens, response.usage.completion_tokens)
    for response, chunk in chat.stream():
        if chunk.proto.HasField("usage"):  # the last chunk: the answer is complete once it has arrived
            return Answer(last.request_id(), "stream", response.usage.prompt_tokens,
                          response.usage.completion_tokens)
    raise AssertionError("a stream ended without its usage chunk")  # a killed one ends with UNAVAILABLE instead


def reserved(server: Server, key_id: int) -> int:
    value: int = admin_get(server, f"/admin/keys/{key_id}")["reserved"]
    return value


def kill_under_grpc_load(server: Server, port: int, secret: str, key_id: int) -> list[Answer]:
    """CLIENTS threads, each with its own xai-sdk client, ask in a loop until their RPC fails (the server is gone).
    Once enough answers of both kinds completed and the key holds a reservation (requests are in flight), the
    server is SIGKILLed, the clients are closed and their threads joined before this returns, so that none of
    them reaches the restarted server. The answers completed."""
    done: list[Answer] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    killed = threading.Event()
    clients = [sdk_client(port, secret) for _ in range(CLIENTS)]

    def run(i: int) -> None:
        client, last = clients[i]
        try:
            for n in range(10_000):
                answer = ask(client, last, i, n)
                with lock:
                    done.append(answer)
        except BaseException as exc:  # reported by the main thread
            if not killed.is_set():  # an error while the server is up: the test's failure
                failures.append(exc)

    def enough() -> bool:
        with lock:
            kinds = [a.kind for a in done]
        return kinds.count("sample") >= COMPLETED_SAMPLES and kinds.count("stream") >= COMPLETED_STREAMS

    threads = [threading.Thread(target=run, args=(i,), name=f"xai-sdk-{i}") for i in range(CLIENTS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + LOAD_DEADLINE_S
    holding = False
    try:
        while time.monotonic() < deadline and not failures:
            if enough():
                holding = reserved(server, key_id) > 0
                if holding:
                    break
            time.sleep(0.02)
    finally:
        killed.set()
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        # Closing a channel ends its RPCs (CANCELLED): grpcio may leave a stream whose connection died while the
        # SDK's retries were under way waiting for messages that never come, past its deadline.
        for client, _ in clients:
            client.close()
        for t in threads:
            t.join(JOIN_S)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"client threads still running {JOIN_S} s after their channels were closed: {stuck}"
    assert not failures, f"a client failed while the server was up: {failures[0]!r}"
    assert enough(), f"not enough answers completed in {LOAD_DEADLINE_S} s: {len(done)}"
    assert holding, "no reservation was held when the server was killed: nothing was in flight"
    return done


def usage_rows(server: Server, key_id: int) -> list[dict[str, Any]]:
    rows = admin_get(server, f"/admin/ledger?token={key_id}&limit=10000")["data"]
    return [r for r in rows if r["kind"] == "usage"]


def reservation_rows(data_dir: Path) -> int:
    """Reservations written to the SQLite file (on SQLite they live in the serving process's memory: none)."""
    with sqlite3.connect(f"file:{data_dir / 'grokgate.db'}?mode=ro", uri=True) as db:
        count: int = db.execute("SELECT count(*) FROM reservations").fetchone()[0]
    return count


def check_answers(rows: list[dict[str, Any]], answers: list[Answer]) -> None:
    """Every completed answer has exactly one ledger row, an ok gRPC one with the client's token counts."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_id.setdefault(row["request_id"], []).append(row)
    assert all(len(found) == 1 for found in by_id.values()), "a request id with more than one ledger row"
    missing = [a for a in answers if a.request_id not in by_id]
    assert not missing, f"{len(missing)} of {len(answers)} completed answers missing from the ledger: {missing[:3]}"
    for answer in answers:
        [row] = by_id[answer.request_id]
        assert (row["endpoint"], row["status"], row["model"]) == ("grpc", "ok", "grok-3"), row
        assert (row["prompt_tokens"], row["completion_tokens"]) == (answer.prompt_tokens,
                                                                    answer.completion_tokens), (row, answer)
        assert row["cost"] > 0 and row["amount"] == -row["cost"], row


def test_sigkill_under_grpc_load_loses_no_completed_answer(tmp_path: Path, fake: FakeXAI) -> None:
    port = free_port()
    env = upstream_env(tmp_path, fake, GROKGATE_INSTANCE_ID="grpc-crash-test", GROKGATE_GRPC_PORT=str(port))
    srv = start_server(tmp_path, "--slots", "4", env=env, name="grpc-crash")
    secret, key = create_key(srv, "grpc-victim", credits=format_credits(INITIAL))
    fake.requests.clear()

    answers = kill_under_grpc_load(srv, port, secret, key["id"])
    assert len({a.request_id for a in answers}) == len(answers), "a request id answered twice"
    assert all(a.completion_tokens > 0 for a in answers), answers
    sent_upstream = len(fake.chat_requests)

    # Restarted on the same data dir and gRPC port, as a supervisor would.
    again = start_server(tmp_path, "--slots", "4", env=env, name="grpc-crash")
    try:
        rows = usage_rows(again, key["id"])
        check_answers(rows, answers)
        # The requests killed in flight reached the upstream and were never settled: no row, and nothing of
        # their reservations is left (reserved 0, the balance moved by exactly the rows' costs).
        assert len(rows) < sent_upstream, (len(rows), sent_upstream)
        check_books(again, key["id"], INITIAL, len(rows))
        assert reservation_rows(tmp_path / "grpc-crash-data") == 0

        # The restarted server serves xai-sdk again, and bills that answer once too.
        client, last = sdk_client(port, secret)
        try:
            answer = ask(client, last, 0, 0)  # a sample
        finally:
            client.close()
        assert answer.kind == "sample"
        assert answer.completion_tokens == 2  # its max_tokens, of the fake's four words
        after = usage_rows(again, key["id"])
        check_answers(after, [*answers, answer])
        assert len(after) == len(rows) + 1
        check_books(again, key["id"], INITIAL, len(after))
    finally:
        stop_server(again)
