"""xAI's gRPC chat against HTTP chat completions, through one grokgate on one fake upstream, in one run.

    .venv/bin/python bench/grpc.py [-n REQUESTS] [--stream-requests N] [-c 1,16] [--rounds 2]
                                   [--modes nonstream,stream] [--channels 4] [--check 1.2] [--floor] [--rate R]

Starts the shared fast fake upstream (../shared/bench/fake_upstream.js on :18000, reused if one listens there; env
SHARED_BENCH moves it) and one `grokgate serve` from this checkout (`python -m grokgate` with src/ first on
PYTHONPATH) with accounts on (tokens, credits, ledger: SQLite in a temp dir), `grok-3` routed to the fake as an
OpenAI-compatible backend, the HTTP port and the gRPC port (`--grpc-port`) both open, and benchmarks it with a
funded account token (not the admin token), so admission, reservation, settlement and the ledger are measured for
both front doors alike. Both reach the same upstream with the same prompt (a system and a user message,
max_tokens 64); they differ only in grokgate's own work.

For each mode (non-stream, stream) x concurrency x round, it runs, in alternating order, the same number of
requests through
- HTTP: `POST /v1/chat/completions` (stream: SSE with `include_usage`), keep-alive HTTP/1.1 on the shared harness's
  raw asyncio client (../shared/bench/loadgen.py `Resp`), one connection per concurrent request;
- gRPC: `xai_api.Chat/GetCompletion` and `GetCompletionChunk` on grpc.aio's raw stub (xai_sdk.proto.v6
  chat_pb2_grpc.ChatStub), the concurrent calls spread over `--channels` channels (HTTP/2 connections of their own).
Each load generator is a child process (this file with `--load`): it connects and warms up (a few requests per
connection), says "ready", and runs its requests when told to go; grokgate's CPU time (utime + stime of the server
process and its children, /proc) is read just before the go and just after the last answer. So the load
generator's own CPU and its start are never counted, only what grokgate spent while serving those requests.

Prints a Markdown table: req/s, p50 and p99 latency (whole answer; for a stream the last chunk), time to the first
chunk of a stream, grokgate's CPU ms per request and the cores it kept busy, and per cell the ratio gRPC/HTTP of
CPU per request (issue 18: at most 1.2). `--check 1.2` makes the exit status 1 when a ratio is above it. Then the
ledger's count of usage rows against the requests sent, and grokgate's log lines besides its banner.

`--floor` adds the transports' floor, measured alike in the same rounds: a bare grpc.aio Chat servicer answering
canned messages (the initial metadata, then one message or 12 chunks, as grokgate sends for the fake's answer) and a
bare uvicorn ASGI app (httptools and uvloop, as `grokgate serve`) answering canned JSON or 13 SSE events. Then per
cell: how much of gRPC's extra CPU is grpc.aio's own per-call cost (bare grpc.aio - bare uvicorn) and how much is
grokgate's gRPC path, and the gRPC/HTTP ratio net of that floor.

On a 2-core machine the load generator and grokgate share the cores: req/s and latencies move with that, CPU per
request much less. About 1-2 minutes with the defaults. KEEP_WORKDIR=1 keeps the temp dir (log, data dir).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# `python bench/grpc.py` puts bench/ first on sys.path, where this file would shadow the grpc package itself.
# Last instead, for its sibling bench/harness.py: the grpc package is found first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from typing import Any  # noqa: E402

from harness import cpu_seconds, free_port, listening, stop  # noqa: E402

ROOT = HERE.parent
SHARED = Path(os.environ.get("SHARED_BENCH", ROOT.parent / "shared" / "bench"))
ADMIN = "bench-admin-token"
MODEL = "grok-3"
SYSTEM = "You are a helpful assistant."
PROMPT = "Say hello in one short sentence."
UPSTREAM_PORT = 18000
perf = time.perf_counter


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(values) - 1)
    return values[f] + (values[c] - values[f]) * (k - f)


# ---- the load generators (child processes) -------------------------------------------------------------------

class Lap:
    """One load run's numbers: latency of each answer, time to a stream's first chunk."""

    def __init__(self) -> None:
        self.latency: list[float] = []
        self.first: list[float] = []

    def result(self, wall: float) -> dict[str, Any]:
        ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
        return {"requests": len(self.latency), "wall_s": round(wall, 4),
                "rps": round(len(self.latency) / wall, 1) if wall > 0 else None,
                "p50_ms": ms(pct(self.latency, 50)), "p99_ms": ms(pct(self.latency, 99)),
                "first_p50_ms": ms(pct(self.first, 50))}


async def closed_loop(workers: list[Any], total: int) -> Lap:
    """Each worker (an async callable returning (latency, first)) sends its next request when its last one has
    been answered whole, until `total` requests have been sent."""
    lap = Lap()
    left = total

    async def run(one: Any) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            latency, first = await one()
            lap.latency.append(latency)
            lap.first.append(first)

    await asyncio.gather(*(run(w) for w in workers))
    return lap


async def paced_loop(workers: list[Any], total: int, rate: float) -> Lap:
    """As `closed_loop`, but request i is not sent before `i / rate` seconds from the start: both APIs at the same
    throughput, so per-request costs that depend on it (the SQLite writer's group commits hold fewer requests each
    at a lower rate) weigh alike. A worker still waits for its answer before it sends its next request."""
    lap = Lap()
    sent = 0
    start = perf()

    async def run(one: Any) -> None:
        nonlocal sent
        while sent < total:
            due = start + sent / rate
            sent += 1
            if (wait := due - perf()) > 0:
                await asyncio.sleep(wait)
            latency, first = await one()
            lap.latency.append(latency)
            lap.first.append(first)

    await asyncio.gather(*(run(w) for w in workers))
    return lap


async def http_workers(port: int, token: str, stream: bool, concurrency: int) -> list[Any]:
    sys.path.insert(0, str(SHARED))
    from loadgen import Resp  # the shared harness's raw keep-alive HTTP/1.1 client protocol

    loop = asyncio.get_running_loop()
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 64, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    payload = json.dumps(body).encode()
    request = ("POST /v1/chat/completions HTTP/1.1\r\n"
               f"Host: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Accept: {'text/event-stream' if stream else 'application/json'}\r\n"
               f"Authorization: Bearer {token}\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload

    def worker() -> Any:
        proto: Any = None

        async def one() -> tuple[float, float]:
            nonlocal proto
            if proto is None or proto.lost or proto.close_after:
                if proto is not None:
                    proto.transport.close()
                _, proto = await loop.create_connection(Resp, "127.0.0.1", port)
            done = loop.create_future()
            proto.start(done)
            t0 = perf()
            proto.transport.write(request)
            await asyncio.wait_for(done, 30)
            t1 = perf()
            text = bytes(proto.body)
            if proto.status != 200 or (b"[DONE]" not in text if stream else b'"choices"' not in text):
                raise RuntimeError(f"HTTP {proto.status}: {text[:300]!r}")
            return t1 - t0, (proto.t_first or t1) - t0

        return one

    return [worker() for _ in range(concurrency)]


async def grpc_workers(port: int, token: str, stream: bool, concurrency: int, channels: int) -> list[Any]:
    import grpc
    from xai_sdk.proto.v6 import chat_pb2, chat_pb2_grpc

    # a local subchannel pool: each channel its own HTTP/2 connection (gRPC shares one between equal channels)
    stubs = [chat_pb2_grpc.ChatStub(grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                                              options=[("grpc.use_local_subchannel_pool", 1)]))
             for _ in range(max(1, min(channels, concurrency)))]
    request = chat_pb2.GetCompletionsRequest(model=MODEL, max_tokens=64, messages=[
        chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content=[chat_pb2.Content(text=SYSTEM)]),
        chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.Content(text=PROMPT)])])
    metadata = (("authorization", f"Bearer {token}"),)

    def worker(stub: Any) -> Any:
        async def one() -> tuple[float, float]:
            t0 = perf()
            if stream:
                first, last = None, None
                async for chunk in stub.GetCompletionChunk(request, metadata=metadata, timeout=30):
                    if first is None:
                        first = perf()
                    last = chunk
                t1 = perf()
                if last is None or not last.usage.completion_tokens:
                    raise RuntimeError(f"gRPC stream without usage on its last chunk: {last}")
                return t1 - t0, (first or t1) - t0
            answer = await stub.GetCompletion(request, metadata=metadata, timeout=30)
            t1 = perf()
            if not answer.outputs or not answer.outputs[0].message.content:
                raise RuntimeError(f"gRPC answer without content: {answer}")
            return t1 - t0, t1 - t0

        return one

    return [worker(stubs[i % len(stubs)]) for i in range(concurrency)]


async def load(args: argparse.Namespace) -> None:
    if args.load == "http":
        workers = await http_workers(args.port, args.token, bool(args.stream), args.concurrency)
    else:
        workers = await grpc_workers(args.port, args.token, bool(args.stream), args.concurrency, args.channels)
    await closed_loop(workers, args.warmup * len(workers))  # connections made, caches warm
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    t0 = perf()
    lap = await (paced_loop(workers, args.requests, args.rate) if args.rate else closed_loop(workers, args.requests))
    print(json.dumps(lap.result(perf() - t0)), flush=True)


def load_main(args: argparse.Namespace) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(load(args))
    else:
        uvloop.run(load(args))


# ---- the transport floor (--floor): servers that answer without doing anything -------------------------------

FLOOR_CHUNKS = 12  # what grokgate sends for the fake upstream's stream: 10 content chunks, the finish, the usage


async def bare_grpc(port: int) -> None:
    """A grpc.aio Chat servicer that answers canned messages, with the initial metadata grokgate sends."""
    import grpc
    from xai_sdk.proto.v6 import chat_pb2, chat_pb2_grpc, usage_pb2

    usage = usage_pb2.SamplingUsage(prompt_tokens=20, completion_tokens=10, total_tokens=30)
    answer = chat_pb2.GetChatCompletionResponse(id="bare", model=MODEL, usage=usage, outputs=[chat_pb2.CompletionOutput(
        message=chat_pb2.CompletionMessage(role=chat_pb2.ROLE_ASSISTANT, content="Hello! This is the bare floor."))])
    chunks = [chat_pb2.GetChatCompletionChunk(id="bare", model=MODEL, outputs=[chat_pb2.CompletionOutputChunk(
        delta=chat_pb2.Delta(role=chat_pb2.ROLE_ASSISTANT, content="word "))]).SerializeToString()
        for _ in range(FLOOR_CHUNKS - 1)]
    chunks.append(chat_pb2.GetChatCompletionChunk(id="bare", model=MODEL, usage=usage).SerializeToString())
    metadata = (("x-request-id", "0" * 32), ("x-grokgate-credits-remaining", "1"))

    class Bare(chat_pb2_grpc.ChatServicer):  # type: ignore[misc]
        async def GetCompletion(self, request: Any, context: Any) -> Any:
            await context.send_initial_metadata(metadata)
            return answer

        async def GetCompletionChunk(self, request: Any, context: Any) -> Any:
            await context.send_initial_metadata(metadata)
            for chunk in chunks:
                yield chunk

    server = grpc.aio.server()
    servicer = Bare()
    # the stream's chunks go out as serialized bytes, as grokgate's do (rpc/handlers.py raw_responses)
    handlers = {"GetCompletion": grpc.unary_unary_rpc_method_handler(
                    servicer.GetCompletion, request_deserializer=chat_pb2.GetCompletionsRequest.FromString,
                    response_serializer=chat_pb2.GetChatCompletionResponse.SerializeToString),
                "GetCompletionChunk": grpc.unary_stream_rpc_method_handler(
                    servicer.GetCompletionChunk, request_deserializer=chat_pb2.GetCompletionsRequest.FromString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("xai_api.Chat", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def bare_http(port: int) -> None:
    """uvicorn (httptools, uvloop: as `grokgate serve`) with a raw ASGI app answering canned JSON or SSE."""
    import uvicorn

    answer = json.dumps({
        "id": "bare", "object": "chat.completion", "created": 1, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! This is the bare floor."},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}}).encode()
    event = b'data: {"id":"bare","object":"chat.completion.chunk","created":1,"model":"grok-3","choices":' \
            b'[{"index":0,"delta":{"content":"word "}}]}\n\n'

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if b'"stream": true' not in body:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": answer})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(FLOOR_CHUNKS + 1):  # the role chunk, content, finish, usage: one write each
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop="uvloop", http="httptools")


# ---- the orchestrator ----------------------------------------------------------------------------------------

def measure(api: str, port: int, token: str, stream: bool, concurrency: int, requests: int, gateway: int,
            channels: int, rate: float = 0.0) -> dict[str, Any]:
    """One load run in a child process; grokgate's CPU between the go and the last answer."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--load", api, "--port", str(port), "--token", token,
           "--stream", str(int(stream)), "-c", str(concurrency), "-n", str(requests), "--channels", str(channels),
           "--rate", str(rate)]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{api} load generator failed while warming up (exit {child.wait()})")
        before = cpu_seconds(gateway)
        child.stdin.write("go\n")
        child.stdin.flush()
        line = child.stdout.readline()
        cpu = cpu_seconds(gateway) - before
        if child.wait(30) != 0 or not line:
            raise RuntimeError(f"{api} load generator failed (exit {child.returncode})")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    result: dict[str, Any] = json.loads(line)
    result["cpu_s"] = cpu
    return result


def http_json(url: str, body: dict[str, Any] | None = None, token: str = ADMIN) -> Any:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def wait_ready(base: str, gateway: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if gateway.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"grokgate did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


NAMES = {"http": "HTTP", "grpc": "gRPC", "bare-http": "floor: bare uvicorn", "bare-grpc": "floor: bare grpc.aio"}


def render(results: dict[tuple[str, int, str], list[dict[str, Any]]], modes: list[str], concurrencies: list[int],
           names: list[str], args: argparse.Namespace) -> list[float]:
    """The table; returns grokgate's gRPC/HTTP CPU ratio of each cell."""
    def med(values: list[Any]) -> float | None:
        return pct([v for v in values if v is not None], 50)

    def fmt(v: float | None, nd: int = 2) -> str:
        return "-" if v is None else f"{v:,.{nd}f}"

    print(f"\n## grokgate: gRPC chat vs HTTP chat ({args.rounds} round(s), {args.requests} non-stream / "
          f"{args.stream_requests} stream requests per run, gRPC over {args.channels} channel(s) at most)\n")
    print("| mode | conc | API | requests | req/s | p50 ms | p99 ms | first chunk p50 ms | CPU ms/req | cores "
          "| gRPC/HTTP CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ratios: list[float] = []
    notes: list[str] = []
    for mode in modes:
        for conc in concurrencies:
            per: dict[str, float] = {}
            for name in names:
                runs = results[(mode, conc, name)]
                count = sum(r["requests"] for r in runs)
                wall = sum(r["wall_s"] for r in runs)
                cpu = sum(r["cpu_s"] for r in runs)
                per[name] = cpu / count * 1000
                ratio = ""
                if name.endswith("grpc"):
                    ratio = f"{per[name] / per[name[:-4] + 'http']:.2f}x"
                    if name == "grpc":
                        ratios.append(per["grpc"] / per["http"])
                        ratio = f"**{ratio}**"
                print(f"| {mode} | {conc} | {NAMES[name]} | {count} | {fmt(count / wall, 0)} | "
                      f"{fmt(med([r['p50_ms'] for r in runs]))} | {fmt(med([r['p99_ms'] for r in runs]))} | "
                      f"{fmt(med([r['first_p50_ms'] for r in runs])) if mode == 'stream' else '-'} | "
                      f"{per[name]:.3f} | {cpu / wall:.2f} | {ratio} |")
            if "bare-grpc" in per:
                floor = per["bare-grpc"] - per["bare-http"]
                own = per["grpc"] - per["http"] - floor
                notes.append(f"- {mode} c={conc}: gRPC costs grokgate {per['grpc'] - per['http']:+.3f} CPU ms/req over "
                             f"HTTP, of which the transports' floors differ by {floor:+.3f} (bare grpc.aio - bare "
                             f"uvicorn) and grokgate's own gRPC path {own:+.3f}; net of the floor gRPC/HTTP is "
                             f"{(per['grpc'] - floor) / per['http']:.2f}x")
    if notes:
        print("\nCPU per request that is not the transport's (floor rows: the same load on servers that answer canned"
              " messages: grpc.aio's own per-call cost against uvicorn's):\n")
        print("\n".join(notes))
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--requests", type=int, default=1500, help="non-stream requests per run (default 1500)")
    ap.add_argument("--stream-requests", type=int, default=800, help="stream requests per run (default 800)")
    ap.add_argument("-c", "--concurrency", default="1,16")
    ap.add_argument("--rounds", type=int, default=2, help="runs per API per cell; the order alternates")
    ap.add_argument("--modes", default="nonstream,stream")
    ap.add_argument("--channels", type=int, default=4, help="gRPC channels the concurrent calls share")
    ap.add_argument("--warmup", type=int, default=5, help="requests per connection before a run")
    ap.add_argument("--check", type=float, default=0.0, help="exit 1 when a gRPC/HTTP CPU ratio is above this")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="requests per second for every run (0: as fast as the concurrency allows); below what "
                         "both APIs reach, the CPU per request compares at the same throughput")
    ap.add_argument("--floor", action="store_true",
                    help="also measure the transport floor: a bare grpc.aio servicer and a bare uvicorn app")
    # the load generator's side (a child process of this script)
    ap.add_argument("--load", choices=("http", "grpc"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--token", help=argparse.SUPPRESS)
    ap.add_argument("--stream", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--bare", choices=("http", "grpc"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare == "http":
        bare_http(args.port)
        return
    if args.bare == "grpc":
        import uvloop

        uvloop.run(bare_grpc(args.port))
        return
    if args.load:
        args.concurrency = int(args.concurrency)
        load_main(args)
        return

    if not (SHARED / "loadgen.py").is_file():
        sys.exit(f"the shared harness is not at {SHARED}: set SHARED_BENCH")
    modes = args.modes.split(",")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="grokgate-grpc-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    ok = False
    try:
        if not listening(UPSTREAM_PORT):
            procs.append(subprocess.Popen(["node", str(SHARED / "fake_upstream.js"), "--port", str(UPSTREAM_PORT)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 10
            while not listening(UPSTREAM_PORT):
                if procs[-1].poll() is not None or time.monotonic() > deadline:
                    sys.exit("the fake upstream did not start")
                time.sleep(0.05)
        config = work / "grokgate.yaml"
        config.write_text(f"backends:\n  up: {{kind: openai, base_url: 'http://127.0.0.1:{UPSTREAM_PORT}/v1'}}\n"
                          f"models:\n  {MODEL}: [{{backend: up}}]\n")
        port, grpc_port = free_port(), free_port()
        env = {**os.environ, "GROKGATE_CONFIG": str(config), "GROKGATE_API_KEYS": ADMIN, "GROKGATE_ACCOUNTS": "true",
               "GROKGATE_DATA_DIR": str(work / "data"), "GROKGATE_LOG_LEVEL": "WARNING",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}
        log = work / "grokgate.log"
        with log.open("wb") as out:
            gateway = subprocess.Popen([sys.executable, "-m", "grokgate", "serve", "--port", str(port),
                                        "--grpc-port", str(grpc_port)],
                                       stdout=out, stderr=subprocess.STDOUT, env=env)
        procs.append(gateway)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, gateway, log)
        token = str(http_json(f"{base}/admin/keys", {"name": "bench", "credits": "100000000"})["token"])
        print(f"# grokgate pid {gateway.pid}: HTTP :{port}, gRPC :{grpc_port}; {os.cpu_count()} cores",
              file=sys.stderr, flush=True)

        # (name, load generator, port, pid whose CPU is read)
        targets = [("http", "http", port, gateway.pid), ("grpc", "grpc", grpc_port, gateway.pid)]
        if args.floor:
            for kind in ("http", "grpc"):
                bare_port, bare_log = free_port(), work / f"bare-{kind}.log"
                with bare_log.open("wb") as out:
                    bare = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--bare", kind,
                                             "--port", str(bare_port)], stdout=out, stderr=subprocess.STDOUT)
                procs.append(bare)
                deadline = time.monotonic() + 30
                while not listening(bare_port):
                    if bare.poll() is not None or time.monotonic() > deadline:
                        sys.exit(f"the bare {kind} server did not start: {bare_log.read_text()[-2000:]}")
                    time.sleep(0.05)
                targets.append((f"bare-{kind}", kind, bare_port, bare.pid))
        results: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
        sent = 0
        for mode in modes:
            stream = mode == "stream"
            requests = args.stream_requests if stream else args.requests
            for conc in concurrencies:
                for r in range(args.rounds):
                    for name, kind, target_port, pid in targets if r % 2 == 0 else reversed(targets):
                        res = measure(kind, target_port, token, stream, conc, requests, pid, args.channels,
                                      args.rate)
                        if pid == gateway.pid:
                            sent += requests + args.warmup * conc
                        results.setdefault((mode, conc, name), []).append(res)
                        print(f"# {mode} c={conc} {name}: {res['rps']} req/s, p50 {res['p50_ms']} ms, "
                              f"{res['cpu_s'] / res['requests'] * 1000:.3f} CPU ms/req", file=sys.stderr, flush=True)
        ratios = render(results, modes, concurrencies, [t[0] for t in targets], args)
        print(f"\n- largest gRPC/HTTP CPU-per-request ratio: {max(ratios):.2f}x"
              + (f" (limit {args.check}x: {'ok' if max(ratios) <= args.check else 'ABOVE'})" if args.check else ""))
        usage = http_json(f"{base}/admin/usage?by=model")["data"]
        print(f"- ledger: {sum(u['requests'] for u in usage)} usage requests recorded for {sent} sent "
              "(runs and warm-ups)")
        lines = [ln for ln in log.read_text().splitlines() if ln and not ln.startswith("grokgate: serving on ")]
        print("- grokgate log: " + ("no warnings or errors" if not lines else f"{len(lines)} line(s) besides the "
                                    "banner; first ones:\n  " + "\n  ".join(ln[:300] for ln in lines[:5])))
        ok = True
        if args.check and max(ratios) > args.check:
            sys.exit(1)
    finally:
        stop(procs)
        if ok and os.environ.get("KEEP_WORKDIR") != "1":
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"- logs and data dir kept in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
