"""Prompt-cache affinity on upstreams: the cached share of prompt tokens and the credits charged, with grokgate's
affinity on and off, in one run.

    .venv/bin/python bench/affinity.py [--conversations 12] [--turns 5] [--api chat|responses] [--servers 8]

Starts the fake xAI (tests/fakes/fake_xai.py) with 3 API keys and per-server prompt caches (`--cache-servers`: as at
xAI, a request reaches the server that holds its prefix only under the same key and the same conversation id), and
two grokgates with accounts on (SQLite in a temp dir), `grok-3` routed to the fake as one xai backend over the 3
keys: one with affinity (serving/affinity.py: a derived conversation id, rendezvous hashing of keys), one without
(key rotation, no id: `GROKGATE_PROMPT_CACHE_AFFINITY=false`). Each gateway gets a funded token; the conversations
run concurrently, each turn appending the answer and a follow-up, every conversation opening with its own case file
(a prefix only its own turns share). Prints, per gateway: requests, prompt tokens, cached tokens, the cached share
and the credits charged (from /v1/usage, the ledger's daily totals).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from harness import free_port, stop

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "bench-admin-token"
XAI_KEYS = {"XAI_A": "xai-bench-a", "XAI_B": "xai-bench-b", "XAI_C": "xai-bench-c"}
WORDS = ("booking refund policy traveller passport visa luggage hotel flight transfer deposit invoice schedule "
         "insurance itinerary museum harbour mountain festival ferry").split()


def case_file(n: int, words: int) -> str:
    rng = random.Random(n)
    return f"Case file {n}: " + " ".join(rng.choice(WORDS) for _ in range(words))


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"{url} did not answer")
        await asyncio.sleep(0.1)


async def conversation(session: aiohttp.ClientSession, base: str, token: str, n: int, turns: int, api: str,
                       context_words: int) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"}
    system = "You are the travel agency's assistant. Answer from the case file. " + case_file(n, context_words)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system},
                                      {"role": "user", "content": "What does the traveller need first?"}]
    usages: list[dict[str, Any]] = []
    previous: str | None = None
    for t in range(turns):
        if api == "chat":
            body: dict[str, Any] = {"model": "grok-3", "messages": messages, "max_tokens": 16}
            url = f"{base}/v1/chat/completions"
        else:
            body = {"model": "grok-3", "instructions": system, "input": messages[-1]["content"],
                    "max_output_tokens": 16}
            if previous is not None:
                body["previous_response_id"] = previous
            url = f"{base}/v1/responses"
        async with session.post(url, json=body, headers=headers) as r:
            answer = await r.json()
            if r.status != 200:
                raise RuntimeError(f"{url}: {r.status} {answer}")
        if api == "chat":
            usage = answer["usage"]
            usages.append({"prompt": usage["prompt_tokens"],
                           "cached": usage["prompt_tokens_details"]["cached_tokens"]})
            messages += [answer["choices"][0]["message"], {"role": "user", "content": f"And after step {t + 1}?"}]
        else:
            usage = answer["usage"]
            usages.append({"prompt": usage["input_tokens"], "cached": usage["input_tokens_details"]["cached_tokens"]})
            previous = answer["id"]
            messages.append({"role": "user", "content": f"And after step {t + 1}?"})
    return usages


async def measure(base: str, args: argparse.Namespace) -> dict[str, float]:
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, f"{base}/readyz")
        async with session.post(f"{base}/admin/keys", json={"name": "bench", "credits": "1000000"},
                                headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            token = str((await r.json())["token"])
        runs = await asyncio.gather(*(conversation(session, base, token, n, args.turns, args.api, args.context)
                                      for n in range(args.conversations)))
        async with session.get(f"{base}/v1/usage", params={"by": "model"},
                               headers={"Authorization": f"Bearer {token}"}) as r:
            rows = (await r.json())["data"]
    answered = [u for run in runs for u in run]
    ledger = {k: sum(int(row[k]) for row in rows) for k in ("requests", "prompt_tokens", "cached_tokens", "cost")}
    return {"requests": len(answered), "prompt": sum(u["prompt"] for u in answered),
            "cached": sum(u["cached"] for u in answered), "ledger_prompt": ledger["prompt_tokens"],
            "ledger_cached": ledger["cached_tokens"], "credits": ledger["cost"] / 1_000_000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=12)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--api", choices=("chat", "responses"), default="chat")
    ap.add_argument("--servers", type=int, default=8, help="prompt-cache servers per key at the fake xAI")
    ap.add_argument("--context", type=int, default=400, help="words of each conversation's case file")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grokgate-affinity-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    python = str(ROOT / ".venv" / "bin" / "python")
    try:
        fake_port = free_port()
        keys = [arg for key in XAI_KEYS.values() for arg in ("--key", key)]
        with (work / "fake.log").open("wb") as log:
            procs.append(subprocess.Popen([python, "-m", "tests.fakes.fake_xai", "--port", str(fake_port), *keys,
                                           "--cache-servers", str(args.servers)], cwd=ROOT, stdout=log,
                                          stderr=subprocess.STDOUT))
        config = work / "grokgate.yaml"
        config.write_text(f"backends:\n  xai: {{kind: xai, base_url: 'http://127.0.0.1:{fake_port}/v1', "
                          f"api_key_env: [{', '.join(XAI_KEYS)}]}}\nmodels:\n  grok-3: [{{backend: xai}}]\n")
        bases = {}
        for mode in ("on", "off"):
            port = free_port()
            env = {**os.environ, **XAI_KEYS, "GROKGATE_CONFIG": str(config), "GROKGATE_API_KEYS": ADMIN,
                   "GROKGATE_DATA_DIR": str(work / f"data-{mode}"), "GROKGATE_CACHE_DIR": str(work / "cache"),
                   "GROKGATE_LOG_LEVEL": "WARNING", "GROKGATE_PROMPT_CACHE_AFFINITY": str(mode == "on").lower()}
            with (work / f"grokgate-{mode}.log").open("wb") as log:
                procs.append(subprocess.Popen([str(ROOT / ".venv" / "bin" / "grokgate"), "serve", "--port",
                                               str(port)], stdout=log, stderr=subprocess.STDOUT, env=env))
            bases[mode] = f"http://127.0.0.1:{port}"
        results = {mode: asyncio.run(measure(base, args)) for mode, base in bases.items()}
        print(f"{args.conversations} conversations x {args.turns} turns ({args.api}), 3 xAI keys, "
              f"{args.servers} cache servers per key\n")
        print("| affinity | requests | prompt tokens | cached tokens | cached share | credits charged |")
        print("|---|---|---|---|---|---|")
        for mode, r in results.items():
            print(f"| {mode} | {r['requests']:.0f} | {r['prompt']:,.0f} | {r['cached']:,.0f} | "
                  f"{r['cached'] / max(r['prompt'], 1):.1%} | {r['credits']:,.6f} |")
            if (r["ledger_prompt"], r["ledger_cached"]) != (r["prompt"], r["cached"]):
                print(f"  (ledger: {r['ledger_prompt']:,.0f} prompt, {r['ledger_cached']:,.0f} cached tokens)")
        on, off = results["on"]["credits"], results["off"]["credits"]
        print(f"\ncredits with affinity: {on / off:.1%} of without" if off else "")
    finally:
        stop(procs)
        if os.environ.get("KEEP_WORKDIR") != "1":
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
