"""The Responses API's cost against chat completions, through one grokgate, in one run.

    .venv/bin/python bench/responses.py [-d SECONDS] [-c CONCURRENCY] [--rounds N]

Starts the shared fast fake upstream (../shared/bench/fake_upstream.js, chat completions on :18000, reused if one
listens there) and one grokgate with accounts on (SQLite in a temp dir, a funded account token), `grok-3` routed
to the fake as an OpenAI-compatible backend: a Responses request is translated to chat completions and its answer
back, so both APIs reach the same upstream and differ only in grokgate's own work. Then, for each mode (non-stream,
stream) and round (the order of the two APIs alternates), it runs a closed loop of keep-alive requests for each API
and reads grokgate's CPU time (its process and children, /proc) before and after. Prints req/s and CPU ms per
request for each, and the ratio responses/chat (issue: at most 1.3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from harness import cpu_seconds, free_port, listening, stop

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SHARED_BENCH", ROOT.parent / "shared" / "bench"))
ADMIN = "bench-admin-token"


async def load(url: str, token: str, body: dict[str, object], stream: bool, concurrency: int,
               seconds: float) -> int:
    """Closed loop: each worker sends the next request when the last one has been read whole."""
    done = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    payload = json.dumps({**body, "stream": stream}).encode()
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                async with session.post(url, data=payload, headers=headers) as r:
                    text = await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{url}: {r.status} {text[:300]!r}")
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-d", "--duration", type=float, default=6.0)
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="nonstream,stream")
    ap.add_argument("--store", type=int, default=1, help="the Responses requests' `store` (1: kept, the default)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grokgate-responses-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if not listening(18000):
            procs.append(subprocess.Popen(["node", str(SHARED / "fake_upstream.js"), "--port", "18000"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        config = work / "grokgate.yaml"
        config.write_text("backends:\n  up: {kind: openai, base_url: 'http://127.0.0.1:18000/v1'}\n"
                          "models:\n  grok-3: [{backend: up}]\n")
        port = free_port()
        env = {**os.environ, "GROKGATE_CONFIG": str(config), "GROKGATE_API_KEYS": ADMIN,
               "GROKGATE_DATA_DIR": str(work / "data"), "GROKGATE_LOG_LEVEL": "WARNING"}
        with (work / "grokgate.log").open("wb") as log:
            gateway = subprocess.Popen([str(ROOT / ".venv" / "bin" / "grokgate"), "serve", "--port", str(port)],
                                       stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append(gateway)
        base = f"http://127.0.0.1:{port}"
        token = asyncio.run(setup(base))
        bodies = {
            "chat": (f"{base}/v1/chat/completions",
                     {"model": "grok-3", "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
                      "max_tokens": 64}),
            "responses": (f"{base}/v1/responses",
                          {"model": "grok-3", "input": "Say hello in one short sentence.", "max_output_tokens": 64,
                           "store": bool(args.store)}),
        }
        results: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for mode in args.modes.split(","):
            stream = mode == "stream"
            for url, body in bodies.values():  # warm-up
                asyncio.run(load(url, token, body, stream, args.concurrency, 1.0))
            for r in range(args.rounds):
                order = list(bodies) if r % 2 == 0 else list(reversed(bodies))
                for name in order:
                    url, body = bodies[name]
                    before = cpu_seconds(gateway.pid)
                    count = asyncio.run(load(url, token, body, stream, args.concurrency, args.duration))
                    results.setdefault((mode, name), []).append((count, cpu_seconds(gateway.pid) - before))
        print(f"| mode | API | req/s | CPU ms per request | (c={args.concurrency}, {args.duration:g} s x "
              f"{args.rounds} rounds) |\n|---|---|---|---|---|")
        for mode in args.modes.split(","):
            per: dict[str, float] = {}
            for name in bodies:
                runs = results[(mode, name)]
                count = sum(c for c, _ in runs)
                per[name] = sum(s for _, s in runs) / count * 1000
                print(f"| {mode} | {name} | {count / (args.duration * len(runs)):,.0f} | {per[name]:.3f} | |")
            print(f"| {mode} | **responses / chat** | | **{per['responses'] / per['chat']:.2f}x** | |")
    finally:
        stop(procs)
        if os.environ.get("KEEP_WORKDIR") != "1":
            shutil.rmtree(work, ignore_errors=True)


async def setup(base: str) -> str:
    """Wait for the server, then create a funded account token (accounts on: metering is measured too)."""
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 60
        while True:
            try:
                async with session.get(f"{base}/readyz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                sys.exit("grokgate did not start")
            await asyncio.sleep(0.1)
        async with session.post(f"{base}/admin/keys", json={"name": "bench", "credits": "1000000"},
                                headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            created = await r.json()
    return str(created["token"])


if __name__ == "__main__":
    main()
