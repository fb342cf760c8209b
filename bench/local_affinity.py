"""Prompt-cache affinity on the embedded engine: the second turn's time to first token, with and without it.

    .venv/bin/python bench/local_affinity.py [--conversations 4] [--rounds 3]

Starts `grokgate serve` (the default local model, 2 slots, accounts off) four times, one configuration each:
- affinity: a shared prompt cache (GROKGATE_SHARED_PROMPT_CACHE=true, one tenant) with llama.cpp's defaults as
  grokgate sets them (a request goes to the idle slot whose cached prompt shares the most with its own,
  `GROKGATE_SLOT_PROMPT_SIMILARITY=0.1`, and evicted prompts are kept in host memory,
  `GROKGATE_PROMPT_CACHE_RAM_MIB=8192`);
- slots only: shared, similarity on, no host-memory cache;
- none: shared, least recently used slot, no host-memory cache;
- per tenant: the prompt cache kept per tenant (GROKGATE_SHARED_PROMPT_CACHE=false, the default with several
  tenants): grokgate picks the slot (its tenant's, sharing the most leading messages; else least recently used;
  providers/local_slots.py), and prompts evicted from slots are saved for their tenant only, up to
  `GROKGATE_PROMPT_CACHE_RAM_MIB=8192`, and restored into the slot of that tenant's next turn
  (providers/local_cache.py).
Each conversation opens with its own ~700-token case file. The first turns run one after another, then every
conversation's second turn runs in the opposite order, so that least-recently-used picks the wrong slot. Prints
the median time to the first streamed token of the second turns, and of the first turns for reference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-local-affinity"
SHARED = {"GROKGATE_SHARED_PROMPT_CACHE": "true"}
CONFIGS = {
    "affinity": {**SHARED, "GROKGATE_SLOT_PROMPT_SIMILARITY": "0.1", "GROKGATE_PROMPT_CACHE_RAM_MIB": "8192"},
    "slots only": {**SHARED, "GROKGATE_SLOT_PROMPT_SIMILARITY": "0.1", "GROKGATE_PROMPT_CACHE_RAM_MIB": "0"},
    "none": {**SHARED, "GROKGATE_SLOT_PROMPT_SIMILARITY": "0", "GROKGATE_PROMPT_CACHE_RAM_MIB": "0"},
    "per tenant": {"GROKGATE_SHARED_PROMPT_CACHE": "false"},
}
WORDS = ("ledger", "harbour", "copper", "signal", "orchard", "granite", "lantern", "meadow", "falcon", "cobalt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def case_file(i: int) -> str:
    """A long system prompt of its own per conversation: what a second turn can reuse."""
    words = [f"{WORDS[(i * 7 + k) % len(WORDS)]}{i}-{k}" for k in range(120)]
    return f"Case file {i}. Remember these facts: " + " ".join(words)


def first_token(client: httpx.Client, messages: list[dict[str, str]]) -> tuple[float, str]:
    """Seconds to the first content delta of a streamed answer, and the whole answer."""
    started = time.perf_counter()
    ttft: float | None = None
    text = []
    body = {"model": "grok-3", "messages": messages, "max_tokens": 12, "stream": True, "temperature": 0.7}
    with client.stream("POST", "/v1/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            if '"content":"' in line and '"content":""' not in line and ttft is None:
                ttft = time.perf_counter() - started
            text.append(line)
    return (ttft if ttft is not None else time.perf_counter() - started), "".join(text)


def run(config: dict[str, str], conversations: int, rounds: int, work: Path) -> tuple[float, float]:
    port = free_port()
    env = {**os.environ, **config, "GROKGATE_ACCOUNTS": "false", "GROKGATE_API_KEYS": TOKEN,
           "GROKGATE_DATA_DIR": str(work / "data"), "GROKGATE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "grokgate"), "serve", "--port", str(port),
                             "--slots", "2", "--ctx-per-slot", "4096"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("grokgate did not become ready")
                time.sleep(0.2)
            firsts, seconds = [], []
            for r in range(rounds):
                convs = [[{"role": "system", "content": case_file(r * 100 + i)},
                          {"role": "user", "content": "Say one word."}] for i in range(conversations)]
                for messages in convs:
                    ttft, _ = first_token(client, messages)
                    firsts.append(ttft)
                    messages += [{"role": "assistant", "content": "Ready."},
                                 {"role": "user", "content": "Name one fact."}]
                for messages in reversed(convs):
                    ttft, _ = first_token(client, messages)
                    seconds.append(ttft)
        return statistics.median(firsts), statistics.median(seconds)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grokgate-local-affinity-"))
    try:
        print(f"| configuration | first turn TTFT p50 ms | second turn TTFT p50 ms | ({args.conversations} "
              f"conversations x {args.rounds} rounds, 2 slots) |\n|---|---|---|---|")
        for name, config in CONFIGS.items():
            first, second = run(config, args.conversations, args.rounds, work)
            print(f"| {name} | {first * 1000:,.0f} | {second * 1000:,.0f} | |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
