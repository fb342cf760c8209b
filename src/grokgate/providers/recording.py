"""Record and replay at the provider seam: after routing, before any wire format (docs/replay.md).

- `Recorder` wraps a route's provider: every request that reaches it is appended to its cassette
  (providers/cassette_store.py: the shared `DIR/<cassette>.jsonl`, or its tenant's) with the events its generation
  yielded and their timing, or the GatewayError it failed with (core/cassette.py has the format; a failure keeps
  only its request's hash). A request whose recording would pass the cassette's or directory's bound is refused
  (507) before it reaches the backend. A generation closed before its end (the client left) is not an exchange
  and is not written.
- `Replayer` answers from DIR: the same canonical request gets its recordings in order, then again from the
  first; recorded failures fail the same way (before the first event, or after the events a cut stream had). A
  miss is a `replay_miss` GatewayError naming the cassette and the nearest difference, or, with a live provider
  (`--record-missing`), goes live and is appended.

Lookups, misses and appends run in the store's threads: a generation decides what it is on its first read.
The lifecycle renders the events in the wire format and streaming mode asked for now, and admission, limits and
settlement run as for a live request; a replay's `backend` is `replay:<recorded backend>` (ledger, metrics, log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from prometheus_client import CollectorRegistry

from grokgate.core.cassette import (
    Exchange,
    decode_error,
    decode_event,
    decode_usage,
    encode_error,
    encode_event,
    encode_usage,
)
from grokgate.core.errors import GatewayError
from grokgate.core.events import Delta, Event, JSONObject, Origin, Usage, UsageReport
from grokgate.core.pricing import beyond_output_cap
from grokgate.providers.base import (
    BackendStatus,
    Call,
    DescribesModels,
    EventsGeneration,
    Generation,
    ModelFacts,
    ModelTable,
    Provider,
    Route,
    Token,
    Tokenizer,
)
from grokgate.providers.cassette_store import (
    LINE_OVERHEAD,
    CassetteBounds,
    CassetteStore,
    Prepared,
    Where,
    canonical_of,
    read_cassette,
)
from grokgate.schemas.chat import ChatCompletionRequest

log = logging.getLogger("grokgate.replay")

Timing = Literal["instant", "recorded"]
INTERNAL = GatewayError(500, "api_error", "Internal server error.")


class RecordingGeneration:
    """A live generation, passed through, written as an exchange once it ends or fails. It starts on its first
    read: room for its line is reserved first (else the 507 that refuses it), then the backend is asked."""

    def __init__(self, start: Callable[[], Generation], provider: Provider, store: CassetteStore, where: Where,
                 request: ChatCompletionRequest, prepared: Prepared | None = None) -> None:
        self._start = start
        self._provider = provider
        self._inner: Generation | None = None
        self._store = store
        self._where = where
        self._request = request
        self._prepared = prepared
        self._reserved = 0
        self._started = time.perf_counter()
        self._events: list[JSONObject] = []
        self._bytes = 0  # about what the events take in the line
        self._overflow = False  # the events alone would pass the cassette's bound: not kept, not written
        self._done = False

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

    def __aiter__(self) -> RecordingGeneration:
        return self

    async def _begin(self) -> Generation:
        prepared = self._prepared = self._prepared or await self._store.prepare(self._request)
        size = len(prepared.text) + LINE_OVERHEAD
        refusal = await self._store.reserve(self._where, size)
        if refusal is not None:
            self._done = True
            raise refusal
        self._reserved = size
        try:
            inner = self._start()
        except BaseException:
            self._done = True
            self._release()
            raise
        self._started = time.perf_counter()
        return inner

    async def __anext__(self) -> Event:
        inner = self._inner
        if inner is None:
            if self._done:
                raise StopAsyncIteration
            inner = self._inner = await self._begin()
        try:
            event = await inner.__anext__()
        except StopAsyncIteration:
            await self._write(None)
            raise
        except GatewayError as exc:
            await self._write(exc)
            raise
        except Exception:
            await self._write(INTERNAL)
            raise
        if not self._done and not self._overflow:
            encoded = encode_event(event, (time.perf_counter() - self._started) * 1000)
            self._bytes += _size(event)
            if self._bytes > self._store.bounds.max_bytes:
                self._overflow = True
                self._events = []
            else:
                self._events.append(encoded)
        return event

    async def aclose(self) -> None:
        if not self._done:
            self._done = True  # closed before its end: not a whole exchange
            self._release()
        if self._inner is not None:
            await self._inner.aclose()

    def _release(self) -> None:
        self._store.release(self._where, self._reserved)
        self._reserved = 0

    async def _write(self, error: GatewayError | None) -> None:
        if self._done:
            return
        self._done = True
        inner = self._inner
        prepared = self._prepared
        assert inner is not None and prepared is not None
        if self._overflow:
            self._release()
            self._store.unrecorded.labels("cassette").inc()
            log.warning("an answer too large for the cassette %s was not recorded (GROKGATE_MAX_CASSETTE_BYTES)",
                        self._where.path)
            return
        so_far = inner.usage_so_far() if error is not None else None
        recorded_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if error is None:
            exchange = Exchange(key=prepared.key, request=prepared.request, backend=inner.backend,
                                fingerprint=inner.fingerprint, events=self._events, recorded_at=recorded_at)
        else:  # a failure keeps its request's hash, model and size, not the request (docs/replay.md)
            exchange = Exchange(key=prepared.key, request=None, backend=inner.backend, fingerprint=inner.fingerprint,
                                events=self._events, error=encode_error(error),
                                usage_so_far=encode_usage(so_far) if so_far is not None else None,
                                recorded_at=recorded_at, model=prepared.model, request_bytes=len(prepared.text))
        reserved, self._reserved = self._reserved, 0
        await self._store.append(self._where, exchange, prepared.text if error is None else None, reserved)


def _size(event: Event) -> int:
    """About what an event takes in a cassette line, without serializing it (text dominates)."""
    if isinstance(event, Delta):
        size = 48 + len(event.content or "") + len(event.reasoning_content or "")
        if event.tool_calls or event.logprobs:
            size += len(json.dumps([event.tool_calls, event.logprobs]))
        return size
    return 256


class _Delegating:
    """What a wrapper passes to the provider it wraps."""

    def __init__(self, inner: Provider) -> None:
        self.inner = inner

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    def ready(self) -> bool:
        return self.inner.ready()

    def status(self) -> BackendStatus:
        return self.inner.status()

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    def check(self, request: ChatCompletionRequest) -> None:
        self.inner.check(request)

    def prompt_copies(self, request: ChatCompletionRequest) -> int:
        return self.inner.prompt_copies(request)

    # The optional capabilities (providers/base.py Tokenizer, DescribesModels) of the backend recorded: a recording
    # server tokenizes and describes its models as the live one does.
    async def tokenize(self, text: str, model: str) -> list[Token] | None:
        return await self.inner.tokenize(text, model) if isinstance(self.inner, Tokenizer) else None

    def describe(self, model: str) -> ModelFacts | None:
        return self.inner.describe(model) if isinstance(self.inner, DescribesModels) else None


class Recorder(_Delegating):
    """A route's provider whose every request is recorded (`grokgate serve --record DIR`), into its tenant's
    cassettes unless they are shared."""

    def __init__(self, inner: Provider, store: CassetteStore) -> None:
        super().__init__(inner)
        self.store = store

    def generate(self, call: Call, upstream_model: str) -> Generation:
        inner = self.inner
        return RecordingGeneration(lambda: inner.generate(call, upstream_model), inner, self.store,
                                   self.store.where(call.tenant, call.cassette), call.request)


class ReplayGeneration(EventsGeneration):
    """A recorded exchange played back: its events (at their recorded times, or at once), then its error."""

    def __init__(self, exchange: Exchange | None, failure: GatewayError | None, timing: Timing) -> None:
        self._exchange = exchange
        self._failure = failure
        self._timing = timing
        self._played = False
        super().__init__(self._play(), f"replay:{exchange.backend}" if exchange is not None else "replay",
                         exchange.fingerprint if exchange is not None else "fp_replay", origin="replay")

    def usage_so_far(self) -> Usage | None:
        """A replay cut short after it began is billed its recorded usage: there is no count of its own, and
        billing nothing would let a client read every event but the usage report, then hang up, for free."""
        if self._usage is not None or not self._played or self._exchange is None:
            return self._usage
        for data in reversed(self._exchange.events):
            event = decode_event(data)[1]
            if isinstance(event, UsageReport):
                return event.usage
        return None

    async def _play(self) -> AsyncGenerator[Event]:
        if self._failure is not None:
            raise self._failure
        exchange = self._exchange
        assert exchange is not None
        started = time.perf_counter()
        for data in exchange.events:
            t, event = decode_event(data)
            if self._timing == "recorded":
                wait = t / 1000 - (time.perf_counter() - started)
                if wait > 0:
                    await asyncio.sleep(wait)
            self._played = True
            yield event
        if exchange.error is not None:
            if exchange.usage_so_far is not None and self._usage is None:
                self._usage = decode_usage(exchange.usage_so_far)  # what the cut request had consumed
            raise decode_error(exchange.error)


class Replayer:
    """Answers from a directory of cassettes (`grokgate serve --replay DIR`); with `live` (`--record-missing`), a
    miss goes to that provider and is appended."""

    def __init__(self, store: CassetteStore, *, timing: Timing = "instant", live: Provider | None = None) -> None:
        self.store = store
        self.timing: Timing = timing
        self.live = live

    @property
    def name(self) -> str:
        return "replay"

    @property
    def fingerprint(self) -> str:
        return "fp_replay"

    def ready(self) -> bool:
        return True

    def status(self) -> BackendStatus:
        return {"ready": True, "error": None, "kind": "replay"}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        await self.store.flush()

    def check(self, request: ChatCompletionRequest) -> None:
        """Pure replay refuses nothing: a request no backend would take was never recorded, so it is a miss. With
        `--record-missing`, a miss goes to the live provider, which refuses what it cannot take (it was recorded
        through the same checks)."""
        if self.live is not None:
            self.live.check(request)

    def prompt_copies(self, request: ChatCompletionRequest) -> int:
        return self.live.prompt_copies(request) if self.live is not None else 1

    async def tokenize(self, text: str, model: str) -> list[Token] | None:
        """The live backend's tokenizer with `--record-missing`; pure replay has none (the caller estimates)."""
        return await self.live.tokenize(text, model) if isinstance(self.live, Tokenizer) else None

    def describe(self, model: str) -> ModelFacts | None:
        return self.live.describe(model) if isinstance(self.live, DescribesModels) else None

    def generate(self, call: Call, upstream_model: str) -> Generation:
        return _Lookup(self, call, upstream_model)


class _Lookup:
    """A replay decided on its first read, once the store has looked the request up in a reader thread: its
    recording, the refusal of one too large for this request, its miss, or with `--record-missing` the live
    provider's generation, recorded."""

    def __init__(self, replayer: Replayer, call: Call, upstream_model: str) -> None:
        self._replayer = replayer
        self._call = call
        self._upstream_model = upstream_model
        self._inner: Generation | None = None
        self._closed = False

    @property
    def backend(self) -> str:
        return self._inner.backend if self._inner is not None else "replay"

    @property
    def fingerprint(self) -> str:
        return self._inner.fingerprint if self._inner is not None else "fp_replay"

    @property
    def origin(self) -> Origin:
        return self._inner.origin if self._inner is not None else "replay"

    def usage_so_far(self) -> Usage | None:
        return self._inner.usage_so_far() if self._inner is not None else None

    def __aiter__(self) -> _Lookup:
        return self

    async def __anext__(self) -> Event:
        if self._inner is None:
            if self._closed:
                raise StopAsyncIteration
            self._inner = await self._open()
        return await self._inner.__anext__()

    async def aclose(self) -> None:
        self._closed = True
        if self._inner is not None:
            await self._inner.aclose()

    async def _open(self) -> Generation:
        replayer, call = self._replayer, self._call
        store, timing, live = replayer.store, replayer.timing, replayer.live
        where = store.where(call.tenant, call.cassette)
        found = await store.find(where, call.request, search=live is None)
        if found.exchange is not None:
            overflow = _beyond_cap(found.exchange, call)
            if overflow is not None:  # more output than this request's reservation paid for
                return ReplayGeneration(None, overflow, timing)
            return ReplayGeneration(found.exchange, None, timing)
        if live is not None:
            model = self._upstream_model
            return RecordingGeneration(lambda: live.generate(call, model), live, store, where, call.request,
                                       found.prepared)
        assert found.miss is not None
        return ReplayGeneration(None, found.miss, timing)


def _beyond_cap(exchange: Exchange, call: Call) -> GatewayError | None:
    """A recording made without an output cap (an admin or static key is held to none) can carry more output per
    choice than the replaying request reserved; replayed as it is, it would cost more than its reservation. It is
    refused instead, saying how to match it."""
    request = call.request
    limit = call.output_limit
    if limit is None:
        return None
    for data in exchange.events:
        usage = data.get("usage")
        if isinstance(usage, dict):
            completion = usage.get("completion_tokens")
            if isinstance(completion, int) and beyond_output_cap(completion, limit, request.choices):
                return GatewayError(
                    400, "bad_request", f"The recorded answer has {completion} output tokens, more than this "
                    f"request's cap of {limit} per choice allows: send max_tokens (max_output_tokens) of at least "
                    f"{-(-completion // max(request.choices, 1))}, or record with the same cap.", param="max_tokens")
    return None


def record_models(models: ModelTable, directory: Path, bounds: CassetteBounds | None = None, *,
                  registry: CollectorRegistry | None = None) -> ModelTable:
    """Every public name's provider recorded into `directory` (each tenant's into its own, unless `bounds.shared`);
    the backends the app starts stay the real ones."""
    store = CassetteStore(directory, bounds, registry=registry)
    wrapped: dict[int, Provider] = {}
    routes = [Route(r.public_name, wrapped.setdefault(id(r.provider), Recorder(r.provider, store)),
                    r.upstream_model) for r in _routes(models)]
    return ModelTable(routes, models.providers())


def replay_models(names: list[str], directory: Path, bounds: CassetteBounds | None = None, *,
                  timing: Timing = "instant", live: ModelTable | None = None,
                  registry: CollectorRegistry | None = None) -> ModelTable:
    """A table answering every public name from `directory` (plus the models its cassettes recorded); with `live`,
    misses go to that table's provider for the name and are appended (then its backends are the ones started).
    Each tenant replays its own cassettes, unless `bounds.shared`."""
    store = CassetteStore(directory, bounds, registry=registry)
    if live is None:
        replayer = Replayer(store, timing=timing)
        every = list(dict.fromkeys([*names, *store.models()]))
        return ModelTable([Route(name, replayer, name) for name in every], [replayer])
    replayers: dict[int, Provider] = {}
    routes = [Route(r.public_name, replayers.setdefault(id(r.provider), Replayer(store, timing=timing,
                                                                                 live=r.provider)),
                    r.upstream_model) for r in _routes(live)]
    return ModelTable(routes, live.providers())


def _routes(models: ModelTable) -> list[Route]:
    return [route for name in models.names() if (route := models.get(name)) is not None]


__all__ = ["CassetteBounds", "CassetteStore", "Recorder", "Replayer", "canonical_of", "read_cassette",
           "record_models", "replay_models"]
