"""The ceilings of the shared stores, for the capacity model in docs/operations.md.

    PYTHONPATH=src .venv/bin/python bench/capacity.py [--pg URL] [--redis URL] [--seconds 5]

1. PostgreSQL: what one primary commits of grokgate's hot path. Each of C connections (replicas' group-commit
   writers) calls `grokgate_commit` (migration 0007) in a loop, alternating a batch of B reservations and the batch
   settling them, on its own accounts (as tenants spread over replicas), so a request costs two calls / B. Printed:
   requests/s (a reservation and a settlement each), calls/s, and the database's CPU seconds per 1,000 requests
   (PostgreSQL's backends' utime+stime from /proc, when it runs on this host).
2. Redis: the rate limiter's acquire script (store/limits_redis.py ACQUIRE_LUA, the one call per request and
   bucket) under redis-benchmark from Debian's redis-tools: 50 clients, pipelines of 16, random buckets, so what
   one Redis core answers, not what a Python client sends.

A fresh database is made and dropped (needs CREATE DATABASE on the admin URL); Redis keys go under a prefix of
their own and are deleted after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import asyncpg
import orjson

from grokgate.core.accounts import Settlement
from grokgate.core.budgets import Hold
from grokgate.core.events import Usage
from grokgate.store.limits_redis import ACQUIRE_LUA
from grokgate.store.pg_commit import hold_item, settlement_item
from grokgate.store.sql import SqlStore

CALL = "SELECT grokgate_commit($1::jsonb, $2::jsonb, $3, $4, $5, $6)"


def _ticks(pid: str) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _pg_ticks() -> int:
    """CPU ticks of every postgres process on this host (0 when it is elsewhere)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if "(postgres)" in stat:
            fields = stat.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


async def _writer(conn: asyncpg.Connection, account: int, token: int, batch: int, stop: float) -> tuple[int, int]:
    done = calls = 0
    while time.monotonic() < stop:
        ids = [uuid.uuid4().hex for _ in range(batch)]
        holds = orjson.dumps([hold_item(Hold(account, token, rid, 2_000)) for rid in ids]).decode()
        await conn.fetchval(CALL, "[]", holds, "capacity", int(time.time() * 1000), "2026-12-08", False)
        settles = orjson.dumps([settlement_item(Settlement(rid, token, "grok-3", "fake", Usage(12, 40), 1_000,
                                                           1, "ok", False, 5, 2_000, account_id=account))
                                for rid in ids]).decode()
        await conn.fetchval(CALL, settles, "[]", "capacity", int(time.time() * 1000), "2026-12-08", False)
        done += batch
        calls += 2
    return done, calls


async def postgres(admin_url: str, seconds: float) -> None:
    name = f"grokgate_capacity_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{admin_url.rsplit('/', 1)[0]}/{name}"
    try:
        store = SqlStore(url)
        await store.open()
        keys = []
        for i in range(8):
            record, _ = await store.create_token(f"capacity-{i}")
            await store.add_credits(record.id, 10**14)
            keys.append((record.account_id, record.id))
        await store.close()
        print("PostgreSQL: grokgate_commit, a reservation batch then its settlements, per connection")
        print("| connections | batch | requests/s | calls/s | PostgreSQL CPU s per 1,000 requests "
              "| requests/s per PostgreSQL core |")
        print("|---|---|---|---|---|---|")
        for connections, batch in ((1, 1), (2, 1), (4, 1), (4, 8), (4, 32), (8, 32), (4, 128)):
            conns = [await asyncpg.connect(url) for _ in range(connections)]
            ticks = _pg_ticks()  # the backends live from here to the second reading: all their CPU is counted
            started = time.monotonic()
            results = await asyncio.gather(*(_writer(conns[i], *keys[i % len(keys)], batch, started + seconds)
                                             for i in range(connections)))
            wall = time.monotonic() - started
            used = (_pg_ticks() - ticks) / os.sysconf("SC_CLK_TCK")
            for conn in conns:
                await conn.close()
            requests = sum(r[0] for r in results)
            calls = sum(r[1] for r in results)
            cpu = f"{used * 1000 / requests:.3f}" if used else "n/a (elsewhere)"
            ceiling = f"{requests / used:,.0f}" if used else "n/a"
            print(f"| {connections} | {batch} | {requests / wall:,.0f} | {calls / wall:,.0f} | {cpu} | {ceiling} |")
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def redis(url: str, requests: int) -> None:
    if shutil.which("redis-benchmark") is None:
        print("Redis: redis-benchmark not installed (Debian: redis-tools); skipped")
        return
    host, port = re.match(r"redis://([^:/]+):?(\d+)?", url).groups()  # type: ignore[union-attr]
    port = port or "6379"
    prefix = f"capacity-{uuid.uuid4().hex[:8]}:"
    sha = subprocess.run(["redis-cli", "-h", host, "-p", port, "SCRIPT", "LOAD", ACQUIRE_LUA], check=True,
                         capture_output=True, text=True).stdout.strip()
    print("Redis: the limiter's acquire script (rpm 1,000,000, tpm 10,000,000, concurrency 100,000), random buckets")
    server = subprocess.run(["pgrep", "-x", "redis-server"], capture_output=True, text=True).stdout.split()
    for pipeline in (1, 16):
        ticks = sum(_ticks(pid) for pid in server)
        out = subprocess.run(
            ["redis-benchmark", "-h", host, "-p", port, "-n", str(requests), "-c", "50", "-P", str(pipeline),
             "-r", "100000", "-q", "EVALSHA", sha, "2", f"{prefix}{{__rand_int__}}:b", f"{prefix}{{__rand_int__}}:f",
             "1000000", "10000000", "100000", "64", "req-__rand_int__", "60000"],
            check=True, capture_output=True, text=True).stdout
        used = (sum(_ticks(pid) for pid in server) - ticks) / os.sysconf("SC_CLK_TCK")
        rate = re.findall(r"([\d.]+) requests per second", out)
        per_core = f", {requests / used:,.0f} per Redis core (its CPU {used:.2f} s)" if used else ""
        print(f"  pipeline {pipeline:2}: {float(rate[-1]):,.0f} acquires/s{per_core}" if rate else out)
    subprocess.run(["redis-cli", "-h", host, "-p", port, "--scan", "--pattern", f"{prefix}*"], check=True,
                   capture_output=True)
    subprocess.run(f"redis-cli -h {host} -p {port} --scan --pattern '{prefix}*' | "
                   f"xargs -r -n 500 redis-cli -h {host} -p {port} DEL > /dev/null", shell=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--redis-requests", type=int, default=300_000)
    args = parser.parse_args()
    print(f"host: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    asyncio.run(postgres(args.pg, args.seconds))
    redis(args.redis, args.redis_requests)


if __name__ == "__main__":
    main()
