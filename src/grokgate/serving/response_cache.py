"""The exact response cache at the provider seam: a hit replays a stored answer's events through the same
lifecycle (admission, streaming or collecting, settlement), a miss records the events on their way and stores them
once the generation completed. The rules and the store are core/response_cache.py's.

Where it sits: `Lifecycle.open` (serving/lifecycle.py) asks `ResponseCache.generate` instead of the provider, after
admission and after the request was held to its reserved output, so a hit is admitted, limited and settled like
any request, and streams or collects whichever way it is asked now (a stored stream answers a non-stream request
and the reverse: what is stored is events, not a wire format). The ledger row, the metrics and the log line of a
hit name the backend `cache`; core/billing.py prices it by `core/pricing.py cache_hit_cost`.

The key (`canonical_key`): the owner (the request's tenant, unless the rule's scope is `global`) and the canonical
request of record/replay (providers/recording.py `canonical_of`, core/cassette.py `canonical`): the body as it is
forwarded, fields grokgate does not know included (an upstream may honour them: a request with vLLM's
`guided_choice` is another question than one without), with the caller's output cap; not `stream`,
`stream_options` or the prompt-cache hint, which change how an answer is delivered, not what it says. One canonical
form for both, so a cached answer and a recorded one match the same requests.

The per-request option is the Call's (`Call.cache`, from the `x-grokgate-cache` header, parsed by the api layer).

A hit cut short (the client left mid-stream) is billed what it delivered (`StoredGeneration.usage_so_far`): the
prompt, and the stored output in the share of its text that went out.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import AsyncGenerator, Mapping
from typing import Final

import orjson
from prometheus_client import Counter

from grokgate.core.cassette import decode_event, encode_event
from grokgate.core.events import Delta, Event, Finish, Origin, Usage, UsageReport
from grokgate.core.pricing import beyond_output_cap
from grokgate.core.response_cache import (
    CACHE_BACKEND,
    CACHE_HEADER,
    CacheRule,
    ResponseCacheStore,
    effective_ttl,
    is_sampled,
)
from grokgate.observability.metrics import Metrics
from grokgate.providers.base import Call, EventsGeneration, Generation, Provider
from grokgate.providers.recording import canonical_of
from grokgate.schemas.chat import ChatCompletionRequest

log = logging.getLogger("grokgate.cache")

# The stored entry's layout and key derivation; an entry of another layout is a miss. 3: keyed by the forwarded body.
FORMAT: Final = 3


def canonical_key(request: ChatCompletionRequest, owner: str) -> str:
    """A digest of the owner and what determines the answer (see the module's docstring)."""
    payload = orjson.dumps([FORMAT, owner, canonical_of(request)], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(payload).hexdigest()


# -- stored form ---------------------------------------------------------------------------------------------------


def encode(events: list[Event], fingerprint: str) -> bytes:
    """Events as record/replay writes them (core/cassette.py), with the fingerprint."""
    return orjson.dumps({"v": FORMAT, "fp": fingerprint, "events": [encode_event(e, 0) for e in events]})


def decode(raw: bytes) -> tuple[list[Event], str]:
    """The events and fingerprint of a stored entry; ValueError for anything else (then a miss)."""
    try:
        entry = orjson.loads(raw)
        if entry["v"] != FORMAT:
            raise ValueError(f"stored layout {entry['v']!r}")
        return [decode_event(row)[1] for row in entry["events"]], str(entry["fp"])
    except (KeyError, TypeError, AttributeError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"not a cached answer: {exc}") from None


def complete(events: list[Event], choices: int) -> bool:
    """Whether a generation's events are a whole answer worth replaying: every choice finished, usage reported."""
    finished = {e.index for e in events if isinstance(e, Finish)}
    return finished == set(range(choices)) and any(isinstance(e, UsageReport) for e in events)


async def _replay(events: list[Event]) -> AsyncGenerator[Event]:
    for event in events:
        yield event


class StoredGeneration(EventsGeneration):
    """A stored answer played back. Cut short (the client left before its usage report), it is billed what it
    delivered: the whole prompt, and the stored output in the share of its text that went out, rounded up. Not
    nothing: a client could otherwise read every event but the last and hang up, for free."""

    def __init__(self, events: list[Event], backend: str, fingerprint: str) -> None:
        super().__init__(_replay(events), backend, fingerprint, origin="cache")
        self._total = next((e.usage for e in reversed(events) if isinstance(e, UsageReport)), None)
        self._size = sum(_text_size(e) for e in events)
        self._played = 0  # events passed on
        self._played_size = 0

    async def __anext__(self) -> Event:
        event = await super().__anext__()
        self._played += 1
        self._played_size += _text_size(event)
        return event

    def usage_so_far(self) -> Usage | None:
        if self._usage is not None or self._played == 0 or self._total is None:
            return self._usage
        total = self._total
        share = self._played_size / self._size if self._size else 0.0
        return Usage(prompt_tokens=total.prompt_tokens, cached_tokens=total.cached_tokens,
                     completion_tokens=min(total.completion_tokens, math.ceil(total.completion_tokens * share)),
                     reasoning_tokens=min(total.reasoning_tokens, math.ceil(total.reasoning_tokens * share)),
                     server_tool_calls=total.server_tool_calls, estimated=True)


# -- the cache -----------------------------------------------------------------------------------------------------


class ResponseCache:
    """One per app (app.py): the rules per public model, the store, and its counters."""

    def __init__(self, store: ResponseCacheStore, rules: Mapping[str, CacheRule], metrics: Metrics, *,
                 max_entry_bytes: int = 4 * 1024 * 1024) -> None:
        self.store = store
        self.rules = dict(rules)
        self.max_entry_bytes = max_entry_bytes
        self.counter = Counter("grokgate_response_cache", "Exact response cache lookups (hit, miss, error: the "
                               "store failed, served as a miss), answers stored (stored, not_stored: incomplete "
                               "or too large) and requests that bypassed it (off, sampled)",
                               ["model", "result"], registry=metrics.registry)

    def generate(self, provider: Provider, call: Call, upstream_model: str) -> Generation:
        """The provider's generation, through the cache when the model's rule and the request allow it."""
        request = call.request
        rule = self.rules.get(request.model)
        if rule is None:
            return provider.generate(call, upstream_model)
        ttl = effective_ttl(rule, call.cache)
        if ttl is None:
            self.counter.labels(request.model, "off").inc()
            return provider.generate(call, upstream_model)
        if not rule.cache_sampled and is_sampled(request.temperature, request.seed):
            self.counter.labels(request.model, "sampled").inc()
            return provider.generate(call, upstream_model)
        owner = "*" if rule.scope == "global" else call.tenant
        return CachedGeneration(self, provider, call, upstream_model, canonical_key(request, owner), ttl)

    async def lookup(self, key: str, call: Call) -> tuple[list[Event], str] | None:
        model = call.request.model
        try:
            raw = await self.store.get(key)
        except Exception:  # the cache is an optimisation: a store failure is a miss, counted and logged
            log.warning("response cache lookup failed", exc_info=True)
            self.counter.labels(model, "error").inc()
            return None
        if raw is not None:
            try:
                found = decode(raw)
            except ValueError:
                log.warning("response cache entry unreadable; served as a miss", exc_info=True)
            else:
                # Stored for a caller without this request's output cap (a global rule, an uncapped static key), it
                # may hold more output than this request reserved: then it is a miss, generated under the cap.
                if not _beyond_cap(found[0], call):
                    self.counter.labels(model, "hit").inc()
                    return found
        self.counter.labels(model, "miss").inc()
        return None

    async def keep(self, key: str, model: str, ttl: int, events: list[Event], fingerprint: str,
                   choices: int) -> None:
        if not complete(events, choices):
            self.counter.labels(model, "not_stored").inc()
            return
        raw = encode(events, fingerprint)
        if len(raw) > self.max_entry_bytes:
            self.counter.labels(model, "not_stored").inc()
            return
        try:
            await self.store.put(key, raw, ttl)
        except Exception:
            log.warning("response cache store failed", exc_info=True)
            self.counter.labels(model, "error").inc()
            return
        self.counter.labels(model, "stored").inc()

    async def close(self) -> None:
        await self.store.close()


class CachedGeneration:
    """A `Generation` that looks its answer up on its first step: a hit replays the stored events (an
    `EventsGeneration` whose backend is `cache`), a miss opens the provider's generation and records its events,
    storing them when it ends normally. `cache_status` is `hit` or `miss` once the first step ran."""

    __slots__ = ("_cache", "_call", "_closed", "_inner", "_key", "_provider", "_recorded", "_recorded_size", "_ttl",
                 "_upstream_model", "cache_status")

    def __init__(self, cache: ResponseCache, provider: Provider, call: Call, upstream_model: str, key: str,
                 ttl: int) -> None:
        self._cache = cache
        self._provider = provider
        self._call = call
        self._upstream_model = upstream_model
        self._key = key
        self._ttl = ttl
        self._inner: Generation | None = None
        self._recorded: list[Event] | None = None
        self._recorded_size = 0
        self._closed = False
        self.cache_status: str | None = None

    @property
    def backend(self) -> str:
        return self._inner.backend if self._inner is not None else self._provider.name

    @property
    def fingerprint(self) -> str:
        return self._inner.fingerprint if self._inner is not None else self._provider.fingerprint

    @property
    def origin(self) -> Origin:
        return self._inner.origin if self._inner is not None else "live"

    def usage_so_far(self) -> Usage | None:
        return self._inner.usage_so_far() if self._inner is not None else None

    @property
    def headers(self) -> dict[str, str]:
        return {CACHE_HEADER: self.cache_status} if self.cache_status is not None else {}

    def __aiter__(self) -> CachedGeneration:
        return self

    async def _open(self) -> Generation:
        found = await self._cache.lookup(self._key, self._call)
        if self._closed:  # closed while the lookup ran
            raise StopAsyncIteration
        if found is not None:
            events, fingerprint = found
            self.cache_status = "hit"
            self._inner = StoredGeneration(events, CACHE_BACKEND, fingerprint)
        else:
            self.cache_status = "miss"
            self._inner = self._provider.generate(self._call, self._upstream_model)
            self._recorded = []
            self._recorded_size = 0
        return self._inner

    async def __anext__(self) -> Event:
        inner = self._inner
        if inner is None:
            if self._closed:
                raise StopAsyncIteration
            inner = await self._open()
        try:
            event = await inner.__anext__()
        except StopAsyncIteration:
            recorded, self._recorded = self._recorded, None
            if recorded is not None:  # a miss that ended normally: keep the answer for the next caller
                request = self._call.request
                await self._cache.keep(self._key, request.model, self._ttl, recorded, inner.fingerprint,
                                       request.choices)
            raise
        except BaseException:
            self._recorded = None  # a failure is never cached
            raise
        if self._recorded is not None:
            # A rough size as the answer grows: past the bound of one entry it could never be kept, so it is
            # not held either (a large n x max_tokens miss must not sit in memory only to be refused at its end).
            self._recorded_size += _rough_size(event)
            if self._recorded_size > self._cache.max_entry_bytes:
                self._recorded = None
                self._cache.counter.labels(self._call.request.model, "not_stored").inc()
            else:
                self._recorded.append(event)
        return event

    async def aclose(self) -> None:
        self._closed = True
        self._recorded = None  # a generation closed before its end is incomplete: nothing to keep
        if self._inner is not None:
            await self._inner.aclose()


def _beyond_cap(events: list[Event], call: Call) -> bool:
    return any(isinstance(e, UsageReport) and beyond_output_cap(e.usage.completion_tokens, call.output_limit,
                                                                call.request.choices) for e in events)


def _text_size(event: Event) -> int:
    """Characters of output an event carries (text, reasoning, tool-call fragments)."""
    return _rough_size(event) - 64 if isinstance(event, Delta) else 0


def _rough_size(event: Event) -> int:
    """About the bytes an event takes in a stored entry (its text and tool-call fragments, plus framing)."""
    if isinstance(event, Delta):
        size = 64 + len(event.content or "") + len(event.reasoning_content or "")
        for call in event.tool_calls or ():
            function = call.get("function")
            if isinstance(function, dict):
                size += len(str(function.get("arguments") or "")) + len(str(function.get("name") or ""))
        return size
    return 128


def cache_headers(generation: Generation | None) -> dict[str, str]:
    """`x-grokgate-cache: hit | miss` for a generation that went through the cache; nothing otherwise."""
    return generation.headers if isinstance(generation, CachedGeneration) else {}
