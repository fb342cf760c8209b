"""What the exact response cache adds to a request, at c=1: wall time and CPU per request through the serving layer
(serving/lifecycle.py `Serving.serve`, the same path as HTTP minus parsing and the socket), for

- `no cache`: a model without a cache rule, served by an instant scripted backend (the baseline);
- `hit (memory)` / `hit (redis)`: the same request answered from the cache (store/response_cache_*.py);
- `miss + store (memory)`: a request that misses, is generated and is stored (each round a new prompt).

The added latency of a hit is its time minus the baseline's (the backend here answers instantly, so a hit saves
nothing; against a real model a hit saves the whole generation). Redis is used when reachable at
GROKGATE_BENCH_REDIS (default redis://127.0.0.1:6379/11), else skipped.

    .venv/bin/python bench/response_cache.py [REQUESTS=5000]

Recorded (3000 requests per row, one core of the development container, Python 3.11, Redis on localhost):

                               p50 ms  mean ms  CPU ms/req
    no cache                    0.134    0.190       0.145
    miss + store (memory)       0.184    0.251       0.206
    hit (memory)                0.165    0.246       0.179
    hit (redis)                 0.341    0.458       0.337

A hit adds +0.03 ms (memory) and +0.21 ms (Redis: one GET round trip) at the median: under the 1 ms target.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import AsyncGenerator, Callable

from grokgate.api.chat import CHAT
from grokgate.core.admission import Principal, StaticKeyAdmission
from grokgate.core.events import Delta, Event, Finish, Usage, UsageReport
from grokgate.core.response_cache import CacheRule, ResponseCacheStore
from grokgate.core.tenancy import tenant_of
from grokgate.observability.metrics import Metrics
from grokgate.providers.base import BackendStatus, Call, EventsGeneration, ModelTable, Route
from grokgate.schemas.chat import ChatCompletionRequest
from grokgate.serving import CallOptions, Collected, Serving
from grokgate.serving.chat import chat_call
from grokgate.serving.response_cache import ResponseCache
from grokgate.store.response_cache_memory import MemoryResponseCache
from grokgate.store.response_cache_redis import RedisResponseCache

ANSWER = "The answer is four, as two plus two makes four in ordinary arithmetic.".split()


class Instant:
    """A backend that answers at once: 15 deltas, a finish and the usage."""

    name = "instant"
    fingerprint = "fp_instant"

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
        return EventsGeneration(self._say(), self.name, self.fingerprint)

    async def _say(self) -> AsyncGenerator[Event]:
        for k, word in enumerate(ANSWER):
            yield Delta(0, word if k == 0 else f" {word}")
        yield Finish(0, "stop")
        yield UsageReport(Usage(prompt_tokens=24, completion_tokens=len(ANSWER)))


async def never() -> None:
    await asyncio.Event().wait()


async def measure(serving: Serving, body: Callable[[int], bytes], requests: int) -> tuple[float, float, float]:
    """Median and mean wall ms, and CPU ms, per collected request."""
    principal = Principal(key_id="key-0", admin=True)
    walls = []
    cpu0 = time.process_time()
    for i in range(requests):
        raw = body(i)
        started = time.perf_counter()
        call = chat_call(ChatCompletionRequest.model_validate_json(raw), raw,
                         CallOptions(tenant_of(principal), f"req-{i}", started))
        result = await serving.serve(call, principal, CHAT, never)
        assert isinstance(result, Collected)
        walls.append((time.perf_counter() - started) * 1000)
    cpu = (time.process_time() - cpu0) * 1000 / requests
    return statistics.median(walls), statistics.fmean(walls), cpu


def same(_: int) -> bytes:
    return (b'{"model": "grok-3", "messages": [{"role": "user", "content": "What is 2+2? Answer in one sentence."}],'
            b' "temperature": 0, "max_tokens": 64}')


def fresh(i: int) -> bytes:
    return same(i).replace(b"2+2?", f"2+{i}?".encode())


def uncached(i: int) -> bytes:
    return same(i).replace(b"grok-3", b"grok-4")


async def main(requests: int) -> None:
    redis_url = os.environ.get("GROKGATE_BENCH_REDIS", "redis://127.0.0.1:6379/11")
    stores: list[tuple[str, ResponseCacheStore]] = [("memory", MemoryResponseCache(256 * 1024 * 1024))]
    probe = RedisResponseCache(redis_url, key_prefix=f"bench-{os.getpid()}:cache:")
    try:
        await probe.get("probe")
        stores.append(("redis", probe))
    except Exception as exc:  # any failure: no Redis here
        print(f"redis: skipped ({exc})")
    models = ModelTable([Route(name, Instant(), name) for name in ("grok-3", "grok-4")])
    print(f"{requests} collected requests per row, c=1, {sys.version.split()[0]}")
    print(f"{'':24} {'p50 ms':>8} {'mean ms':>8} {'CPU ms/req':>11}")
    rows: dict[str, tuple[float, float, float]] = {}
    for name, store in stores:
        cache = ResponseCache(store, {"grok-3": CacheRule(ttl=60)}, Metrics())
        serving = Serving(StaticKeyAdmission(["k"]), models, Metrics(), keepalive=10.0, response_cache=cache)
        if name == "memory":
            await measure(serving, uncached, requests // 5)  # warm-up
            rows["no cache"] = await measure(serving, uncached, requests)
            rows[f"miss + store ({name})"] = await measure(serving, fresh, requests)
        await measure(serving, same, 1)  # stores the answer
        rows[f"hit ({name})"] = await measure(serving, same, requests)
        await cache.close()
    for label, (p50, mean, cpu) in rows.items():
        print(f"{label:24} {p50:8.3f} {mean:8.3f} {cpu:11.3f}")
    base = rows["no cache"][0]
    for label in [r for r in rows if r.startswith("hit")]:
        print(f"added latency of a {label}: {rows[label][0] - base:+.3f} ms (p50)")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000))
