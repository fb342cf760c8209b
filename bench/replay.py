"""CPU per request of a replayed request against the same request through the fake xAI upstream, over HTTP.

Three `grokgate serve` processes, accounts off (the settlement costs both the same), one client at a time:
- `live`: routed to the fake xAI upstream (tests/fakes/fake_xai.py, its own process: its CPU is not counted);
- `record`: the same with `--record DIR`, asked each request once, then stopped;
- `replay`: `--replay DIR`, no routing file, nothing to call.

The CPU of a grokgate process (user + system, from /proc/PID/stat) is read around each run of REQUESTS requests,
collected and streamed. Linux only.

    .venv/bin/python bench/replay.py [REQUESTS=2000]

Recorded (1000 requests per row, c=1, the development container, Python 3.11.7):

                           wall ms/req  CPU ms/req
    live, collected              2.355       1.160
    replay, collected            1.040       0.490
    live, streamed               2.633       1.350
    replay, streamed             1.373       0.720

A replay costs about half the CPU of the same request through the upstream (0.42x collected, 0.53x streamed): it
parses no upstream reply and opens no connection, and its lookup is one hash of the canonical request.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-replay-token"
TICK = os.sysconf("SC_CLK_TCK")
BODY = {"model": "grok-3", "messages": [{"role": "user", "content": "What is 2+2? Answer in one sentence."}],
        "max_tokens": 64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url}: not ready in 60 s")


def wait_listening(port: int) -> None:
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def serve(work: Path, name: str, *args: str, env: dict[str, str]) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("GROKGATE_")}, "GROKGATE_API_KEYS": TOKEN,
            "GROKGATE_ACCOUNTS": "false", "GROKGATE_DATA_DIR": str(work / f"data-{name}"),
            "GROKGATE_CACHE_DIR": str(work / "cache"), "GROKGATE_LOG_LEVEL": "WARNING", **env}
    log = (work / f"{name}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "grokgate", "serve", "--port", str(port), *args], env=full,
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(f"{url}/readyz", proc)
    return url, proc


def run(url: str, pid: int, requests: int, stream: bool) -> tuple[float, float]:
    """Wall and CPU (of the grokgate process) milliseconds per request."""
    body = {**BODY, "stream": stream}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(20):  # warm-up
            client.post("/grok/chat/completions", json=body, headers=headers).raise_for_status()
        cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
        for _ in range(requests):
            client.post("/grok/chat/completions", json=body, headers=headers).raise_for_status()
        wall, cpu = time.perf_counter() - wall0, cpu_seconds(pid) - cpu0
    return wall * 1000 / requests, cpu * 1000 / requests


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def main(requests: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="grokgate-bench-replay-"))
    fake_port = free_port()
    fake = subprocess.Popen([sys.executable, "-m", "tests.fakes.fake_xai", "--port", str(fake_port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [fake]
    try:
        wait_listening(fake_port)
        config = work / "routing.yaml"
        config.write_text(f"backends: {{fake: {{kind: xai, base_url: 'http://127.0.0.1:{fake_port}/v1', "
                          f"api_key_env: BENCH_XAI_KEY}}}}\nmodels: {{grok-3: [{{backend: fake}}]}}\n")
        env = {"GROKGATE_CONFIG": str(config), "BENCH_XAI_KEY": "xai-test-key"}
        cassettes = work / "cassettes"
        url, rec = serve(work, "record", "--record", str(cassettes), env=env)
        procs.append(rec)
        for stream in (False, True):  # one recording answers both modes; two make the bench's order explicit
            httpx.post(f"{url}/grok/chat/completions", json={**BODY, "stream": stream},
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).raise_for_status()
        stop(rec)
        live_url, live = serve(work, "live", env=env)
        procs.append(live)
        replay_url, replay = serve(work, "replay", "--replay", str(cassettes), env={})
        procs.append(replay)
        print(f"{requests} requests per row, c=1, {sys.version.split()[0]}")
        print(f"{'':22} {'wall ms/req':>12} {'CPU ms/req':>11}")
        rows: dict[str, tuple[float, float]] = {}
        for stream in (False, True):
            mode = "streamed" if stream else "collected"
            for name, target, proc in (("live", live_url, live), ("replay", replay_url, replay)):
                rows[f"{name}, {mode}"] = run(target, proc.pid, requests, stream)
                wall, cpu = rows[f"{name}, {mode}"]
                print(f"{name + ', ' + mode:22} {wall:12.3f} {cpu:11.3f}", flush=True)
        for mode in ("collected", "streamed"):
            live_cpu, replay_cpu = rows[f"live, {mode}"][1], rows[f"replay, {mode}"][1]
            print(f"{mode}: replay CPU / live CPU = {replay_cpu / live_cpu:.2f}")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                stop(proc)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
