"""What cassettes cost the event loop and the disk: issue 17's reproductions, measured (docs/replay.md).

The real app (`create_app`) served in this process over HTTP, accounts off, a scripted backend in the bench; a
prober thread asks `/healthz` every 5 ms meanwhile, so a stall of the event loop shows as its latency.

1. `--record-missing` against a large cassette (`--mb`, default 293): each request a miss that goes live and is
   appended. Reported: the first request (it indexes the cassette, in a thread), then per request and `/healthz`.
   Before: every append re-read the whole cassette on the event loop (2.5 s per request at 293 MB, /healthz too).
2. A pure-replay miss against `--recordings` recordings (default 2,000) with a request of `--messages` messages
   (default 2,048). Before: the miss compared with every recording on the event loop (1.83 s for every client).
3. Three 7 MiB prompts refused by the backend, recorded: the cassette's size. Before: 44 MB.

    .venv/bin/python bench/cassettes.py [--mb 293] [--recordings 2000] [--messages 2048] [--requests 20]

Numbers are printed, never asserted (tests/test_cassette_store.py holds the behaviour).
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from grokgate.app import create_app
from grokgate.core.errors import GatewayError
from grokgate.core.events import Delta, Event, Finish, Usage, UsageReport
from grokgate.providers.base import BackendStatus, Call, EventsGeneration, ModelTable, Route
from grokgate.schemas.chat import ChatCompletionRequest
from grokgate.settings import DEFAULT_MODELS, Settings

TOKEN = "bench-cassettes-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


class Backend:
    """Answers "fresh answer" at once, or refuses every request (`refuse`) as a too-long prompt."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse

    name = "bench"
    fingerprint = "fp_bench"

    def ready(self) -> bool:
        return True

    def status(self) -> BackendStatus:
        return {"ready": True}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def check(self, request: ChatCompletionRequest) -> None:
        return None

    def prompt_copies(self, request: ChatCompletionRequest) -> int:
        return 1

    def generate(self, call: Call, upstream_model: str) -> EventsGeneration:
        return EventsGeneration(self._events(), self.name, self.fingerprint)

    async def _events(self) -> AsyncGenerator[Event]:
        if self.refuse:
            raise GatewayError(400, "context_length_exceeded", "The prompt is longer than the model's context.",
                               param="messages")
        yield Delta(0, content="fresh answer")
        yield Finish(0, "stop")
        yield UsageReport(Usage(7, 2))


@contextmanager
def serve(tmp: Path, backend: Backend | None, **settings: Any) -> Iterator[str]:
    models = ModelTable([Route(name, backend, name) for name in DEFAULT_MODELS]) if backend else None
    app = create_app(Settings(api_keys=[TOKEN], data_dir=tmp / "data", cache_dir=tmp / "cache", tune_gc=False,
                              accounts=False, max_cassette_bytes=1024**4, max_cassette_dir_bytes=1024**5,
                              **settings), models=models)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class Prober:
    """GET /healthz every 5 ms in a thread; the latencies of those sent while `measuring`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.measuring = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self._stop.is_set():
                started = time.perf_counter()
                c.get("/healthz")
                if self.measuring:
                    self.latencies.append(time.perf_counter() - started)
                time.sleep(0.005)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, label: str) -> None:
        values = sorted(self.latencies) or [0.0]
        print(f"  /healthz during {label}: n={len(values)}, p50 {statistics.median(values) * 1000:.1f} ms, "
              f"max {values[-1] * 1000:.1f} ms")
        self.latencies = []


def line(prompt: str, answer: str) -> str:
    request = {"logprobs": False, "messages": [{"content": prompt, "role": "user"}], "model": "grok-3"}
    return json.dumps({"v": 1, "request": request, "backend": "bench", "fingerprint": "fp_bench",
                       "recorded_at": "2026-01-01T00:00:00Z", "error": None, "usage_so_far": None,
                       "events": [{"t": 1.0, "delta": {"index": 0, "content": answer}},
                                  {"t": 1.1, "finish": {"index": 0, "reason": "stop"}},
                                  {"t": 1.2, "usage": {"prompt_tokens": 7, "completion_tokens": 2}}]},
                      separators=(",", ":")) + "\n"


def chat(prompt: str | list[dict[str, str]]) -> dict[str, Any]:
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return {"model": "grok-3", "messages": messages}


def record_missing(tmp: Path, megabytes: int, requests: int) -> None:
    directory = tmp / "big"
    directory.mkdir()
    filler = "x" * 9000
    with (directory / "default.jsonl").open("w") as f:
        written, i = 0, 0
        while written < megabytes * 1024 * 1024:
            written += f.write(line(f"recorded {i} {filler}", "recorded answer"))
            i += 1
    print(f"1. --record-missing, a cassette of {written / 1e6:.0f} MB ({i} recordings), {requests} misses:")
    with serve(tmp / "rm", Backend(), replay_dir=directory, record_missing=True) as url, Prober(url) as probe, \
            httpx.Client(base_url=url, timeout=600, headers=HEADERS) as c:
        probe.measuring = True
        started = time.perf_counter()
        c.post("/v1/chat/completions", json=chat("first")).raise_for_status()
        print(f"  first request (indexes the cassette): {(time.perf_counter() - started) * 1000:.0f} ms")
        time.sleep(0.05)
        probe.report("the first request")
        times = []
        for n in range(requests):
            started = time.perf_counter()
            c.post("/v1/chat/completions", json=chat(f"new {n}")).raise_for_status()
            times.append(time.perf_counter() - started)
        probe.measuring = False
        print(f"  per request (a miss, live, appended): p50 {statistics.median(times) * 1000:.1f} ms, "
              f"max {max(times) * 1000:.1f} ms")
        probe.report("the misses")
    print(f"  peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def replay_miss(tmp: Path, recordings: int, messages: int) -> None:
    directory = tmp / "many"
    directory.mkdir()
    recorded = [{"role": "user", "content": f"turn {k}"} for k in range(messages)]
    with (directory / "default.jsonl").open("w") as f:
        for i in range(recordings):
            request = {"messages": [*recorded[:-1], {"role": "user", "content": f"last {i}"}], "model": "grok-3"}
            data = json.loads(line("", "recorded answer"))
            data["request"] = request
            f.write(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"2. pure replay, {recordings} recordings of {messages} messages, one miss:")
    with serve(tmp / "rp", None, replay_dir=directory) as url, Prober(url) as probe, \
            httpx.Client(base_url=url, timeout=600, headers=HEADERS) as c:
        asked = chat([*recorded[:-1], {"role": "user", "content": "never recorded"}])
        c.post("/v1/chat/completions", json=chat("warm up"))
        time.sleep(0.1)
        probe.measuring = True
        started = time.perf_counter()
        r = c.post("/v1/chat/completions", json=asked)
        took = time.perf_counter() - started
        time.sleep(0.05)
        probe.measuring = False
        print(f"  the miss ({r.status_code} {r.json()['error']['code']}): {took * 1000:.0f} ms")
        probe.report("the miss")


def refused_prompts(tmp: Path) -> None:
    directory = tmp / "refused"
    with serve(tmp / "rf", Backend(refuse=True), record_dir=directory, max_body_bytes=32 * 1024 * 1024) as url, \
            httpx.Client(base_url=url, timeout=600, headers=HEADERS) as c:
        for i in range(3):
            r = c.post("/v1/chat/completions", json=chat(f"{i} " + "a" * (7 * 1024 * 1024)))
            assert r.status_code == 400, r.text
    size = sum(p.stat().st_size for p in directory.glob("*.jsonl"))
    print(f"3. three 7 MiB prompts refused by the backend, recorded: {size} bytes of cassette")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=293)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--recordings", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="grokgate-bench-cassettes-") as name:
        tmp = Path(name)
        record_missing(tmp, args.mb, args.requests)
        replay_miss(tmp, args.recordings, args.messages)
        refused_prompts(tmp)


if __name__ == "__main__":
    main()
