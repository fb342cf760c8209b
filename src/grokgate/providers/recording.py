"""Record and replay at the provider seam: after routing, before any wire format (docs/replay.md).

- `Recorder` wraps a route's provider: every request that reaches it is appended to DIR/<cassette>.jsonl with
  the events its generation yielded and their timing, or the GatewayError it failed with (core/cassette.py has
  the format). A generation closed before its end (the client left) is not an exchange and is not written.
- `Replayer` answers from DIR: the same canonical request gets its recordings in order, then again from the
  first; recorded failures fail the same way (before the first event, or after the events a cut stream had). A
  miss is a `replay_miss` GatewayError naming the cassette and the nearest difference, or, with a live provider
  (`--record-missing`), goes live and is appended.

The lifecycle renders the events in the wire format and streaming mode asked for now, and admission, limits and
settlement run as for a live request; a replay's `backend` is `replay:<recorded backend>` (ledger, metrics, log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from prometheus_client import CollectorRegistry

from grokgate.core.cassette import (
    Exchange,
    canonical,
    decode_error,
    decode_event,
    decode_usage,
    encode_error,
    encode_event,
    encode_usage,
    miss,
    model_of,
    request_key,
)
from grokgate.core.errors import GatewayError
from grokgate.core.events import Event, JSONObject, Usage, UsageReport
from grokgate.core.pricing import beyond_output_cap
from grokgate.providers.base import BackendStatus, Call, EventsGeneration, Generation, ModelTable, Provider, Route
from grokgate.schemas.chat import ChatCompletionRequest

log = logging.getLogger("grokgate.replay")

Timing = Literal["instant", "recorded"]
INTERNAL = GatewayError(500, "api_error", "Internal server error.")


def canonical_of(request: ChatCompletionRequest) -> JSONObject:
    """The request's canonical form (core/cassette.py `canonical`): its body as it is forwarded, fields grokgate does
    not know included, without how it is delivered; the caller's own output cap (the request is never rewritten:
    the cap held at admission is the Call's)."""
    native = request.responses_body
    if native is not None:
        return canonical({}, None, native)
    chat: JSONObject = request.model_dump(mode="json", by_alias=True, exclude_none=True)
    return canonical(chat, request.output_limit, None)


class CassetteStore:
    """The cassettes of one directory: read when first asked for (again when the file changed), appended to."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._loaded: dict[str, tuple[tuple[int, int], dict[str, list[Exchange]]]] = {}
        self._turns: dict[tuple[str, str], int] = {}

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.jsonl"

    def recordings(self, name: str) -> dict[str, list[Exchange]]:
        """The cassette's exchanges by request key, in recorded order."""
        path = self.path(name)
        try:
            st = path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._loaded.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        by_key: dict[str, list[Exchange]] = {}
        for exchange in read_cassette(path):
            by_key.setdefault(exchange.key, []).append(exchange)
        self._loaded[name] = (stamp, by_key)
        return by_key

    def next(self, name: str, key: str) -> Exchange | None:
        """This request's next recording: in recorded order, then from the first again."""
        found = self.recordings(name).get(key)
        if not found:
            return None
        turn = self._turns.get((name, key), 0)
        self._turns[(name, key)] = turn + 1
        return found[turn % len(found)]

    def append(self, name: str, exchange: Exchange) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        line = json.dumps(exchange.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n"
        # One write of one line in append mode: concurrent requests of this process never interleave lines.
        with self.path(name).open("a", encoding="utf-8") as f:
            f.write(line)

    def models(self) -> list[str]:
        """Every model name recorded in the directory's cassettes."""
        names: dict[str, None] = {}
        for path in sorted(self.directory.glob("*.jsonl")):
            for exchange in read_cassette(path):
                model = model_of(exchange.request)
                if model:
                    names.setdefault(model)
        return list(names)


def read_cassette(path: Path) -> Iterable[Exchange]:
    """The exchanges of a cassette file; a line that is not one is skipped with a warning (a hand edit)."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Exchange.from_json(json.loads(line))
            except ValueError as exc:
                log.warning("skipping line %d of %s: %s", number, path, exc)


class RecordingGeneration:
    """A live generation, passed through, written as an exchange once it ends or fails."""

    def __init__(self, inner: Generation, store: CassetteStore, cassette: str, request: JSONObject) -> None:
        self._inner = inner
        self._store = store
        self._cassette = cassette
        self._request = request
        self._started = time.perf_counter()
        self._events: list[JSONObject] = []
        self._done = False

    @property
    def backend(self) -> str:
        return self._inner.backend

    @property
    def fingerprint(self) -> str:
        return self._inner.fingerprint

    def usage_so_far(self) -> Usage | None:
        return self._inner.usage_so_far()

    def __aiter__(self) -> RecordingGeneration:
        return self

    async def __anext__(self) -> Event:
        try:
            event = await self._inner.__anext__()
        except StopAsyncIteration:
            self._write(None)
            raise
        except GatewayError as exc:
            self._write(exc)
            raise
        except Exception:
            self._write(INTERNAL)
            raise
        if not self._done:
            self._events.append(encode_event(event, (time.perf_counter() - self._started) * 1000))
        return event

    async def aclose(self) -> None:
        self._done = True  # closed before its end: not a whole exchange
        await self._inner.aclose()

    def _write(self, error: GatewayError | None) -> None:
        if self._done:
            return
        self._done = True
        so_far = self._inner.usage_so_far() if error is not None else None
        exchange = Exchange(key=request_key(self._request), request=self._request, backend=self._inner.backend,
                            fingerprint=self._inner.fingerprint, events=self._events,
                            error=encode_error(error) if error is not None else None,
                            usage_so_far=encode_usage(so_far) if so_far is not None else None,
                            recorded_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        try:
            self._store.append(self._cassette, exchange)
        except OSError:  # a full disk must not fail the request being served
            log.exception("could not append to the cassette %r", self._cassette)


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


class Recorder(_Delegating):
    """A route's provider whose every request is recorded (`grokgate serve --record DIR`)."""

    def __init__(self, inner: Provider, store: CassetteStore) -> None:
        super().__init__(inner)
        self.store = store

    def generate(self, call: Call, upstream_model: str) -> Generation:
        return RecordingGeneration(self.inner.generate(call, upstream_model), self.store, call.cassette,
                                   canonical_of(call.request))


class ReplayGeneration(EventsGeneration):
    """A recorded exchange played back: its events (at their recorded times, or at once), then its error."""

    def __init__(self, exchange: Exchange | None, failure: GatewayError | None, timing: Timing) -> None:
        self._exchange = exchange
        self._failure = failure
        self._timing = timing
        self._played = False
        super().__init__(self._play(), f"replay:{exchange.backend}" if exchange is not None else "replay",
                         exchange.fingerprint if exchange is not None else "fp_replay")

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
        pass

    def check(self, request: ChatCompletionRequest) -> None:
        """Pure replay refuses nothing: a request no backend would take was never recorded, so it is a miss. With
        `--record-missing`, a miss goes to the live provider, which refuses what it cannot take (it was recorded
        through the same checks)."""
        if self.live is not None:
            self.live.check(request)

    def prompt_copies(self, request: ChatCompletionRequest) -> int:
        return self.live.prompt_copies(request) if self.live is not None else 1

    def generate(self, call: Call, upstream_model: str) -> Generation:
        cassette = call.cassette
        wanted = canonical_of(call.request)
        key = request_key(wanted)
        exchange = self.store.next(cassette, key)
        if exchange is not None:
            overflow = _beyond_cap(exchange, call)
            if overflow is not None:  # more output than this request's reservation paid for
                return ReplayGeneration(None, overflow, self.timing)
            return ReplayGeneration(exchange, None, self.timing)
        if self.live is not None:
            return RecordingGeneration(self.live.generate(call, upstream_model), self.store, cassette, wanted)
        recorded = [e[0].request for e in self.store.recordings(cassette).values()]
        return ReplayGeneration(None, miss(cassette, recorded, wanted), self.timing)


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


@dataclass(frozen=True, slots=True)
class CassetteBounds:
    """Whose cassettes a request reads and writes (`shared`: everyone's; else its tenant's own), and how large they
    may grow (settings.max_cassette_bytes, max_cassette_dir_bytes)."""

    shared: bool = True
    max_bytes: int = 64 * 1024 * 1024
    max_dir_bytes: int = 1024**3


def record_models(models: ModelTable, directory: Path, bounds: CassetteBounds | None = None, *,
                  registry: CollectorRegistry | None = None) -> ModelTable:
    """Every public name's provider recorded into `directory`; the backends the app starts stay the real ones."""
    store = CassetteStore(directory)
    wrapped: dict[int, Provider] = {}
    routes = [Route(r.public_name, wrapped.setdefault(id(r.provider), Recorder(r.provider, store)),
                    r.upstream_model) for r in _routes(models)]
    return ModelTable(routes, models.providers())


def replay_models(names: list[str], directory: Path, bounds: CassetteBounds | None = None, *,
                  timing: Timing = "instant", live: ModelTable | None = None,
                  registry: CollectorRegistry | None = None) -> ModelTable:
    """A table answering every public name from `directory` (plus the models its cassettes recorded); with `live`,
    misses go to that table's provider for the name and are appended (then its backends are the ones started)."""
    store = CassetteStore(directory)
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


__all__ = ["CassetteBounds", "CassetteStore", "Recorder", "Replayer", "read_cassette", "record_models",
           "replay_models"]
