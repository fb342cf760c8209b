"""Issue 17 item 12's attack against a real `grokgate serve`: expensive invalid bodies from a token that cannot be
served, while another client checks the server's liveness.

One `grokgate serve` (accounts on, SQLite in a temporary directory, a routing file to an address nothing listens
on: no model is loaded and no body here is valid anyway). The admin creates a token with 0 credits and rpm 5.
Four connections of that token send, for DURATION seconds, 9-14 MB bodies that are refused by validation
(`max_tokens: -1`) and cost the most to parse: `"x": [1] * 7_000_000`, a 1M-key object, `[{}] * 3_000_000`.
Meanwhile another client, from another address (127.0.0.2) and in its own process, asks for `/healthz` every
50 ms. Printed: the statuses the attackers got, and the /healthz latencies (median, p90, p99, max).

With `--funded` the token has credits and no limits instead: every body is parsed (in a worker thread, one at a
time per tenant, where the body is above GROKGATE_PARSE_OFFLOAD_BYTES), which shows what pydantic-core's hold on
the GIL leaves of the event loop.

The server runs the `grokgate` that `PYTHONPATH` finds, so the same script measures another tree:

    .venv/bin/python bench/refused_bodies.py [DURATION=15] [--funded]
    PYTHONPATH=/tmp/base/src .venv/bin/python bench/refused_bodies.py     # e.g. `git archive <rev> src`

Recorded (2 cores shared with other work, Python 3.11; 15 s each; /healthz unloaded: median 2.2 ms, p99 9.2):

    0 credits, rpm 5     attackers                   /healthz   median   p90    p99    max (ms)
      before (780bc72)   24 x 400, 0 x 429                        599     779    937    937
      after              6 x 403, 4,101 x 429                     5.0    16.3   51.0  101.8
    --funded, no limits
      before (780bc72)   25 x 400                                 458     747   1060   1060
      after              19 x 400                                  68     406   1171   1171

Before, every body was parsed on the event loop (about 0.5 s each) and answered 400. After, the first bodies are
refused for credits without being parsed, and counted against the rpm; the rest get 429 before their bodies are
read, and their connections are closed rather than drained (api/body.py). A funded token's bodies are parsed in
a worker thread, but pydantic-core holds the GIL for whole stretches of a parse (a 1M-key object: about 0.4-0.6 s
at once), so the loop still waits that long now and then: what bounds that is the token's rpm, not the thread.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import orjson

ADMIN = "bench-refused-admin"
ATTACKERS = 4
SAMPLE_EVERY = 0.05
ROUTING = ("backends:\n  nowhere:\n    kind: openai\n    base_url: http://127.0.0.1:9/v1\n"
           "models:\n  grok-3:\n    - {backend: nowhere}\n")


def bodies() -> list[bytes]:
    base = {"model": "grok-3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}
    return [orjson.dumps({**base, "x": [1] * 7_000_000}),
            orjson.dumps({**base, "x": {f"k{i}": 1 for i in range(1_000_000)}}),
            orjson.dumps({**base, "x": [{}] * 3_000_000})]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    routing = work / "routing.yaml"
    routing.write_text(ROUTING)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GROKGATE_")}, "GROKGATE_API_KEYS": ADMIN,
           "GROKGATE_DATA_DIR": str(work / "data"), "GROKGATE_CACHE_DIR": str(work / "cache"),
           "GROKGATE_CONFIG": str(routing), "GROKGATE_LOG_LEVEL": "WARNING"}
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "grokgate", "serve", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"grokgate exited:\n{(work / 'server.log').read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("grokgate did not become ready")


def sample(url: str, until: float, out: Connection) -> None:
    """Ask for /healthz every SAMPLE_EVERY seconds from 127.0.0.2 until `until`; send the latencies (ms)."""
    latencies: list[float] = []
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=url, transport=transport, timeout=30) as client:
        while time.time() < until:
            t0 = time.perf_counter()
            client.get("/healthz").raise_for_status()
            latencies.append((time.perf_counter() - t0) * 1000)
            time.sleep(max(0.0, SAMPLE_EVERY - (time.perf_counter() - t0)))
    out.send(latencies)


def unloaded(url: str, seconds: float = 3.0) -> list[float]:
    """/healthz latencies with nobody else asking: the floor, on this machine, of what the attack moves."""
    receive, send = multiprocessing.Pipe(duplex=False)
    sampler = multiprocessing.Process(target=sample, args=(url, time.time() + seconds, send))
    sampler.start()
    latencies: list[float] = receive.recv()
    sampler.join()
    return latencies


def summary(latencies: list[float]) -> str:
    return (f"n={len(latencies)}  median {statistics.median(latencies):.1f} ms  p90 {percentile(latencies, 0.9):.1f}"
            f"  p99 {percentile(latencies, 0.99):.1f}  max {max(latencies):.1f}")


def attack(url: str, token: str, payloads: list[bytes], until: float, statuses: Counter[int], lock: threading.Lock,
           offset: int) -> None:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    i = offset
    with httpx.Client(base_url=url, timeout=60) as client:
        while time.time() < until:
            try:
                status = client.post("/v1/chat/completions", content=payloads[i % len(payloads)],
                                     headers=headers).status_code
            except httpx.HTTPError:  # the server may close a connection whose body it did not read
                status = 0
            with lock:
                statuses[status] += 1
            i += 1


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    funded = "--funded" in sys.argv[1:]
    duration = float(args[0]) if args else 15.0
    payloads = bodies()
    who = "a funded token without limits" if funded else "a token with 0 credits and rpm 5"
    print(f"bodies: {', '.join(f'{len(b) / 1e6:.1f} MB' for b in payloads)}; {ATTACKERS} connections of {who}, "
          f"{duration:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="grokgate-refused-") as tmp:
        proc, url = start(Path(tmp))
        try:
            key = {"name": "attacker", "credits": "1000"} if funded else {"name": "attacker", "rpm": 5}
            created = httpx.post(f"{url}/admin/keys", json=key, headers={"Authorization": f"Bearer {ADMIN}"},
                                 timeout=30)
            created.raise_for_status()
            token = created.json()["token"]
            quiet = unloaded(url)
            until = time.time() + duration
            receive, send = multiprocessing.Pipe(duplex=False)
            sampler = multiprocessing.Process(target=sample, args=(url, until, send))
            sampler.start()
            statuses: Counter[int] = Counter()
            lock = threading.Lock()
            threads = [threading.Thread(target=attack, args=(url, token, payloads, until, statuses, lock, k))
                       for k in range(ATTACKERS)]
            for thread in threads:
                thread.start()
            latencies: list[float] = receive.recv()
            sampler.join()
            for thread in threads:
                thread.join()
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("attackers: " + ", ".join(f"{n} x {status or 'connection closed'}" for status, n in sorted(statuses.items())))
    print(f"429s: {statuses[429]}")
    print(f"/healthz from another address, unloaded:     {summary(quiet)}")
    print(f"/healthz from another address, under attack: {summary(latencies)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
