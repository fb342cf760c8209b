"""Which engine slot a job runs in, so that a cached prompt prefix is reused only by the tenant that made it; and
when a prompt too long to be likely to fit runs, so that one tenant's cannot take every worker.

llama.cpp keeps each slot's last prompt (and answer) as KV state and, given `cache_prompt`, reuses the longest
prefix a new prompt shares with it. Left to choose, it picks the idle slot most similar to the new prompt and
restores evicted prefixes from a host-memory cache, whoever sent them: another tenant's `cached_tokens` (and its time
to first token) then tell how much of its guess matches a prompt it never saw. grokgate picks the slot instead and
names it (`id_slot`): llama.cpp then runs the job in that slot, skipping both its similarity choice and the
host-memory cache (tools/server/server-context.cpp: `get_slot_by_id` instead of `get_available_slot`), and the job
reuses the slot's prefix only when the slot holds its own tenant's tokens; otherwise it runs with
`cache_prompt: false`, a fresh evaluation from the first token. What a slot held before another conversation took
it is kept per tenant by providers/local_cache.py, and restored into a slot for that tenant's jobs only.

Whose tokens a slot holds is known only from evidence: a job that reported running counts (`timings`) or usage
had its prompt evaluated, and then the slot holds that job's tokens. A job the engine refused (a 4xx: llama.cpp
checks a request, its length above all, before the prompt reaches the slot's KV cache) left the slot as it was. A
job of another tenant that ended without either (cancelled during its prompt's evaluation, a 5xx) may have left the
previous tokens, its own, or a mix of both: nobody's, never reused.

Each worker thread holds at most one slot while it runs a job and there are as many slots as workers, so a
worker always finds one idle.

Long prompts (`TenantLane`): llama.cpp tokenises a prompt whole, in the worker's call, before it compares its
length with the slot's context. providers/local_bound.py refuses what can never fit, but a prompt under that bound
may still be many times too long (the bound assumes the vocabulary's longest token everywhere), and every worker
tokenising one for a single tenant leaves nothing for the others (the tokenising threads also take the CPU the
others' batch needs). So the jobs of a tenant's long prompts enter the fair queue one at a time: the next when the
last has ended. Other tenants' jobs, and the tenant's own ordinary ones, pass as before.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson


class PromptDigests:
    """A digest per rendered message of one request, computed once (in a worker thread, off the event loop) for
    all its jobs: how a tenant's next turn recognises the slot holding its conversation."""

    __slots__ = ("_digests", "_messages")

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self._messages = messages
        self._digests: tuple[bytes, ...] | None = None

    def get(self) -> tuple[bytes, ...]:
        if self._digests is None:  # two jobs computing it at once compute the same value
            self._digests = tuple(hashlib.blake2b(orjson.dumps(m, option=orjson.OPT_SORT_KEYS),
                                                  digest_size=16).digest() for m in self._messages)
        return self._digests


@dataclass(slots=True)
class Slot:
    id: int
    busy: bool = False
    tenant: str | None = None  # whose tokens the slot holds; None: nobody's that may be reused
    messages: tuple[bytes, ...] = ()  # digests of the messages of the prompt it holds
    used: int = 0  # when it was last released, on the table's clock


def shared_prefix(a: tuple[bytes, ...], b: tuple[bytes, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class SlotTable:
    """The engine's slots as grokgate assigns them (worker threads; one lock)."""

    size: int
    slots: list[Slot] = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _clock: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.slots = [Slot(i) for i in range(self.size)]

    def take(self, tenant: str, messages: tuple[bytes, ...], saved: int = 0) -> tuple[Slot, bool]:
        """An idle slot for a job of `tenant`, and whether the job may reuse what it holds: among the tenant's own
        idle slots, the one whose prompt shares the most leading messages with this one; else (none, or none
        sharing a message, or none sharing as many as the tenant's best saved state, `saved`, which is then
        restored into it: providers/local_cache.py) the least recently used idle slot. Nothing about another
        tenant's prompts decides it."""
        with self._lock:
            idle = [s for s in self.slots if not s.busy]
            if not idle:  # cannot happen while each worker holds at most one slot; say so rather than guess
                raise RuntimeError("no idle engine slot for a worker thread")
            best: Slot | None = None
            shared = 0
            for slot in idle:
                if slot.tenant != tenant:
                    continue
                n = shared_prefix(slot.messages, messages)
                if n > shared or (n == shared and best is not None and slot.used > best.used):
                    best, shared = slot, n
            if best is None or shared == 0 or shared < saved:
                best = min(idle, key=lambda s: s.used)
            best.busy = True
            return best, best.tenant == tenant

    def hold(self, slot: Slot, tenant: str | None, messages: tuple[bytes, ...]) -> None:
        """What a taken slot holds now that its worker changed it outside a job: a tenant's restored prompt, or
        (None) nobody's."""
        with self._lock:
            slot.tenant, slot.messages = tenant, messages

    def give_back(self, slot: Slot, tenant: str, messages: tuple[bytes, ...], *, evaluated: bool,
                  touched: bool = True) -> None:
        """Release `slot` after a job of `tenant`. `evaluated`: the job's prompt was evaluated in it; `touched`:
        it may have been, in part (False: the job never reached the slot's KV cache, which is as it was)."""
        with self._lock:
            if evaluated:
                slot.tenant, slot.messages = tenant, messages
            elif touched and slot.tenant != tenant:  # the previous tokens, the job's, or a mix: nobody's to reuse
                slot.tenant, slot.messages = None, ()
            self._clock += 1
            slot.used = self._clock
            slot.busy = False


J = TypeVar("J")


class TenantLane(Generic[J]):
    """Jobs of each tenant's long prompts, released into the fair queue one at a time per tenant.

    `release(key, job)` puts a job in the fair queue (as a group of one, under its request's key); every job
    released must be reported `done` once it has ended, or has been taken back out of the fair queue unstarted."""

    def __init__(self, release: Callable[[Hashable, J], None]) -> None:
        self._release = release
        self._lock = threading.Lock()
        self._waiting: dict[str, deque[tuple[Hashable, J]]] = {}  # a tenant in here has one job released

    def put(self, tenant: str, key: Hashable, jobs: list[J]) -> None:
        with self._lock:
            waiting = self._waiting.get(tenant)
            first = None
            if waiting is None:
                waiting = self._waiting[tenant] = deque()
                first, jobs = jobs[0], jobs[1:]
            waiting.extend((key, job) for job in jobs)
        if first is not None:
            self._release(key, first)

    def done(self, tenant: str) -> None:
        """The tenant's released job ended: release its next one, if any."""
        with self._lock:
            waiting = self._waiting.get(tenant)
            if waiting is None:
                return
            if not waiting:
                del self._waiting[tenant]
                return
            key, job = waiting.popleft()
        self._release(key, job)

    def discard(self, key: Hashable) -> list[J]:
        """Take back the waiting (never released) jobs of request `key`."""
        taken: list[J] = []
        with self._lock:
            for waiting in self._waiting.values():
                kept = [(k, job) for k, job in waiting if k != key]
                if len(kept) != len(waiting):
                    taken += [job for k, job in waiting if k == key]
                    waiting.clear()
                    waiting.extend(kept)
        return taken

    def __len__(self) -> int:
        with self._lock:
            return sum(len(waiting) for waiting in self._waiting.values())
