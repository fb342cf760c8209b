"""`grokgate serve` stopping (src/grokgate/drain.py): a SIGTERM drains (not ready, still serving) for
GROKGATE_DRAIN_SECONDS, then the server stops accepting, finishes what is in flight and exits 0; a second signal
stops it at once; GROKGATE_DRAIN_SECONDS=0 and SIGINT stop without a drain. Behind a load balancer:
tests/test_load_balancer.py.

The servers serve grok-3 from the fake xAI upstream (accounts on SQLite), so none loads the local model.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import E2E, Server, start_server, stop_server, user
from tests.fakes.fake_xai import FakeXAI

pytestmark = E2E

FAKE_KEY = "xai-drain-key"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeXAI]:
    with FakeXAI(api_keys=[FAKE_KEY]).start() as upstream:
        upstream.header_defaults["x-fake-chunk-delay-ms"] = "300"  # a 5-chunk stream lasts about 2 s
        yield upstream


def serve(tmp: Path, fake: FakeXAI, drain: float) -> Server:
    routing = tmp / "routing.yaml"
    routing.write_text(f"""
backends:
  fake: {{kind: xai, base_url: "{fake.url}", api_key_env: XAI_FAKE}}
models:
  grok-3: [{{backend: fake}}]
""")
    return start_server(tmp, env={"GROKGATE_CONFIG": str(routing), "XAI_FAKE": FAKE_KEY,
                                  "GROKGATE_DRAIN_SECONDS": str(drain)}, name="drain")


def refused(server: Server) -> bool:
    try:
        httpx.get(f"{server.url}/healthz", timeout=2)
    except httpx.ConnectError:
        return True
    return False


@E2E
def test_sigterm_drains_then_finishes_streams_and_exits_0(tmp_path: Path, fake: FakeXAI) -> None:
    server = serve(tmp_path, fake, drain=1.0)
    try:
        with server.client(timeout=30) as c:
            body = {"model": "grok-3", "messages": user("hi"), "max_tokens": 5, "stream": True}
            with c.stream("POST", "/grok/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {server.token}"}) as stream:
                assert stream.status_code == 200
                chunks = stream.iter_text()
                first = next(chunks)  # the stream is under way: in flight when the signal comes
                termed = time.monotonic()
                server.process.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 1
                while (ready := httpx.get(f"{server.url}/readyz", timeout=2)).status_code == 200:
                    assert time.monotonic() < deadline, "still ready after a SIGTERM"
                    time.sleep(0.01)
                assert ready.status_code == 503 and ready.json()["status"] == "draining", ready.text
                # Draining: new requests are still served, each on a connection closed after its answer.
                models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {server.token}"})
                assert models.status_code == 200 and models.headers["connection"] == "close"
                rest = "".join(chunks)
                ended = time.monotonic()
            assert (first + rest).endswith("data: [DONE]\n\n"), rest[-300:]
            assert ended - termed > 1.0, "the stream outlived the drain"
        assert server.process.wait(15) == 0
        assert time.monotonic() - termed >= 1.0
        assert refused(server)
        assert "draining for 1 s" in server.log()
    finally:
        stop_server(server)


@E2E
def test_second_signal_stops_at_once(tmp_path: Path, fake: FakeXAI) -> None:
    server = serve(tmp_path, fake, drain=60)
    try:
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)
        assert server.process.poll() is None, "the drain keeps serving"
        assert httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200
        forced = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(20)  # not the 60 s drain
        assert time.monotonic() - forced < 20
        assert code == -signal.SIGTERM, "a forced stop ends by the signal, not as a clean one"
    finally:
        stop_server(server)


@E2E
@pytest.mark.parametrize("sig, drain", [(signal.SIGTERM, 0.0), (signal.SIGINT, 30.0)])
def test_no_drain_stops_accepting_at_once(tmp_path: Path, fake: FakeXAI, sig: signal.Signals,
                                          drain: float) -> None:
    """GROKGATE_DRAIN_SECONDS=0 (today's behaviour before the drain), and SIGINT (Ctrl+C) whatever the setting."""
    server = serve(tmp_path, fake, drain=drain)
    try:
        signalled = time.monotonic()
        server.process.send_signal(sig)
        code = server.process.wait(25)  # a loaded machine may take seconds to close the store: far less than 30
        assert code == 0, server.log()[-2000:]
        assert "draining for" not in server.log(), f"{time.monotonic() - signalled:.1f} s"
        assert refused(server)
    finally:
        stop_server(server)
