"""Decode speed of the embedded engine: through grokgate's HTTP API vs xllamacpp called directly.

Runs, in one process tree and alternating rounds (so a noisy machine affects both alike):
  - direct: xllamacpp.Server in this process, streaming callbacks, same params as grokgate;
  - grokgate: `grokgate serve` in a subprocess, streaming over HTTP (SSE).
For 1 stream it reports decode tokens/s: tokens after the first one over the time from the first token to the
last. For N concurrent streams it reports the aggregate rate while all N were decoding (see `aggregate`).

    .venv/bin/python bench/local_engine.py [--rounds 2] [--concurrency 8] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import httpx

PROMPTS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain in detail how a hash map works, with examples.",
    "Describe the history of the bicycle at length.",
    "Write a long letter to a friend about a trip to the mountains.",
    "Explain, step by step, how to bake bread.",
    "Write a detailed guide to growing tomatoes.",
    "Tell a long fairy tale about a fox and a crow.",
    "Describe a day in the life of a software engineer in detail.",
]


def _timing(events: list[float]) -> tuple[int, float, float]:
    """(tokens, first token time, last token time)."""
    return len(events), events[0], events[-1]


def aggregate(per_stream: list[list[float]]) -> float:
    """Steady-state rate: tokens produced while every stream was decoding, over that window.

    Counting from the first stream's first token to the last stream's last token would mix in the
    staggered starts (prompt evaluation) and the tail where one long answer runs alone, which vary
    with the sampled lengths rather than with the serving path.
    """
    streams = [s for s in per_stream if len(s) > 1]
    start = max(s[0] for s in streams)
    end = min(s[-1] for s in streams)
    if end <= start:
        return 0.0
    tokens = sum(sum(1 for t in s if start < t <= end) for s in streams)
    return tokens / (end - start)


def single(per_stream: list[list[float]]) -> float:
    s = per_stream[0]
    return (len(s) - 1) / (s[-1] - s[0]) if len(s) > 1 and s[-1] > s[0] else 0.0


def run_direct(model_path: str, slots: int, concurrency: int, max_tokens: int, threads: int) -> dict[str, float]:
    import tempfile

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = model_path
    params.n_parallel = slots
    params.n_ctx = slots * 4096
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.verbosity = -1
    params.hostnames = [os.path.join(tempfile.mkdtemp(), "bench.sock")]
    server = xllamacpp.Server(params)

    def one(prompt: str, out: list[float]) -> None:
        def callback(chunk: dict[str, Any]) -> bool:
            for choice in chunk.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    out.append(time.perf_counter())
            return False

        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True,
                "temperature": 0.8}
        server.handle_chat_completions(body, callback)

    results = {}
    for label, n in (("1 stream", 1), (f"{concurrency} streams", concurrency)):
        per_stream: list[list[float]] = [[] for _ in range(n)]
        workers = [threading.Thread(target=one, args=(PROMPTS[i % len(PROMPTS)], per_stream[i])) for i in range(n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        results[label] = single(per_stream) if n == 1 else aggregate(per_stream)
    server = None  # release the engine before the next round loads another
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_grokgate(model_path: str, slots: int, concurrency: int, max_tokens: int, threads: int) -> dict[str, float]:
    port = free_port()
    env = {**os.environ, "GROKGATE_API_KEYS": "bench"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "grokgate", "serve", "--port", str(port), "--model", model_path,
         "--slots", str(slots), "--threads", str(threads), "--log-level", "WARNING"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

        def one(prompt: str, out: list[float]) -> None:
            body = {"model": "grok-3", "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens, "stream": True, "temperature": 0.8}
            with httpx.stream("POST", f"{url}/grok/chat/completions", json=body, timeout=600,
                              headers={"Authorization": "Bearer bench"}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        for choice in chunk["choices"]:
                            if choice["delta"].get("content"):
                                out.append(time.perf_counter())

        results = {}
        for label, n in (("1 stream", 1), (f"{concurrency} streams", concurrency)):
            per_stream: list[list[float]] = [[] for _ in range(n)]
            workers = [threading.Thread(target=one, args=(PROMPTS[i % len(PROMPTS)], per_stream[i]))
                       for i in range(n)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            results[label] = single(per_stream) if n == 1 else aggregate(per_stream)
        return results
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", help="GGUF path (default: the assembled default model)")
    args = parser.parse_args()

    from grokgate.providers.model_files import DEFAULT_MODEL, ensure_model
    from grokgate.settings import Settings

    model = args.model or str(ensure_model(DEFAULT_MODEL, Settings().cache_dir))
    slots = args.concurrency
    samples: dict[str, dict[str, list[float]]] = {"direct": {}, "grokgate": {}}
    for r in range(args.rounds):
        for name, fn in (("direct", run_direct), ("grokgate", run_grokgate)):
            result = fn(model, slots, args.concurrency, args.max_tokens, args.threads)
            for label, value in result.items():
                samples[name].setdefault(label, []).append(value)
            print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in result.items()),
                  file=sys.stderr, flush=True)

    print(f"\nDecode tokens/s (median of {args.rounds} rounds, {args.threads} thread(s), {slots} slots, "
          f"max_tokens {args.max_tokens}, load average {os.getloadavg()[0]:.2f})\n")
    print("| streams | xllamacpp direct | grokgate over HTTP | ratio |")
    print("|---|---|---|---|")
    for label in samples["direct"]:
        direct = statistics.median(samples["direct"][label])
        ours = statistics.median(samples["grokgate"][label])
        print(f"| {label} | {direct:.1f} | {ours:.1f} | {ours / direct:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
