"""One public model over ordered routes: retries, fallback and cool-downs, only before the first byte.

Routes are tried by priority (lower first), and within a priority in a weighted random order, or, for a request
that belongs to a conversation (its `route_key`: serving/affinity.py), in the order of weighted rendezvous hashing
of that key (`rendezvous`): every turn of a conversation then goes first to the same route, and its upstream to the
same key (providers/openai_compat.py), while they are healthy. A route or key that fails or rests is skipped, so
its conversations move to their next choice and no other conversation moves; across conversations each route is
first in proportion to its weight, as the random order gives. A route's
backend is driven by what it implements (providers/base.py): an `Upstream` attempt by attempt, any other
`Provider` through its own `generate`. An upstream route is retried on another key, then the next route, on
connect errors, timeouts, 429 and 5xx; a 4xx that is the caller's fault ends the request at once, and counts
against no breaker (nor does an error inside a 200 reply whose fields blame the request). Once the
first event has been read nothing is retried: the client may already hold output. Every request has a total
deadline.

A backend's breaker counts what happens before the first event: a success is the first event itself (a 200
whose body then stalls or breaks is a failure), so a backend that stalls until the deadline is skipped once its
breaker opens instead of making every later request wait the whole deadline.

Tokenize and model facts (providers/base.py `Tokenizer`, `DescribesModels`): a routed model answers with the route it
tries first (the lowest priority; the first listed among equals), whose backend serves its requests while it is
healthy; None when that backend has no tokenizer (or knows nothing of the model): the caller estimates.

Usage: a backend that reports none (or is cut short) is billed an estimate from the text that went through
(core/pricing.py: one token per 3 bytes), reported as the stream's last event, so the client is shown exactly
what the ledger charges, and the row is marked estimated.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import orjson

from grokgate.core.errors import GatewayError
from grokgate.core.events import Delta, Event, Origin, Usage, UsageReport
from grokgate.core.pricing import PromptShape, estimate_output_tokens, estimate_prompt, utf8_len
from grokgate.providers.base import (
    BackendStatus,
    Call,
    CountsPrompts,
    DescribesModels,
    Generation,
    ModelFacts,
    Provider,
    RouteStatus,
    Token,
    Tokenizer,
    Upstream,
    UpstreamFailure,
)
from grokgate.schemas.chat import ChatCompletionRequest, ImagePart, TextPart


@dataclass(frozen=True)
class Candidate:
    backend: Provider  # an Upstream (driven attempt by attempt), or any other Provider (the local engine)
    model: str
    priority: int = 0
    weight: int = 1
    # The backend as an Upstream, or None: decided once here, by protocol, not on every request.
    upstream: Upstream | None = field(init=False, compare=False, repr=False)
    # What rendezvous hashing names this route by: stable across restarts and replicas, and across edits of the
    # routing file that leave this route alone.
    ident: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "upstream", self.backend if isinstance(self.backend, Upstream) else None)
        object.__setattr__(self, "ident", f"{self.backend.name}/{self.model}")


def rendezvous(key: str, ident: str, weight: int = 1) -> float:
    """Weighted rendezvous (highest random weight) score of `ident` for `key`: ordering candidates by it, highest
    first, puts each one first for a share of keys proportional to its weight (`weight / -ln(u)`, u uniform in
    (0, 1) from a hash of both), and removing a candidate changes the first choice only of the keys it had."""
    digest = hashlib.blake2b(f"{key}\x00{ident}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / 2.0**64
    return max(weight, 1) / -math.log(u)


class RoutedModel:
    """A Provider for one public model name."""

    def __init__(self, public_name: str, candidates: list[Candidate], deadline: float = 600.0) -> None:
        if not candidates:
            raise ValueError(f"model {public_name} has no routes")
        self.public_name = public_name
        self.candidates = candidates
        self.deadline = deadline
        self.name = candidates[0].backend.name

    @property
    def fingerprint(self) -> str:
        return self.candidates[0].backend.fingerprint

    def ready(self) -> bool:
        return any(c.backend.ready() for c in self.candidates)

    def status(self) -> BackendStatus:
        routes = [RouteStatus(backend=c.backend.name, model=c.model, priority=c.priority) for c in self.candidates]
        return {"routes": routes}

    async def start(self) -> None:
        return None  # backends are started once by the app, not once per model

    async def close(self) -> None:
        return None

    def usable(self, request: ChatCompletionRequest) -> tuple[list[Candidate], GatewayError | None]:
        usable: list[Candidate] = []
        refusal: GatewayError | None = None
        for c in self.candidates:
            try:
                c.backend.check(request)
            except GatewayError as exc:
                refusal = refusal or exc
                continue
            usable.append(c)
        return usable, refusal

    def check(self, request: ChatCompletionRequest) -> None:
        usable, refusal = self.usable(request)
        if not usable and refusal is not None:
            raise refusal

    def prompt_copies(self, request: ChatCompletionRequest) -> int:
        """The most any route may bill this request's prompt (n when a route sends n single requests; 2 when the
        local engine may answer twice, even for n=1)."""
        return max(c.backend.prompt_copies(request) for c in self.candidates)

    async def count_prompt(self, call: Call, upstream_model: str) -> int | None:
        """The most any route will bill one copy of the prompt, when every route counts it exactly (providers/base.py
        CountsPrompts); None as soon as one cannot: any route may serve the request, so the body's bound stays."""
        counts = []
        for c in self.candidates:
            if not isinstance(c.backend, CountsPrompts):
                return None
            count = await c.backend.count_prompt(call, c.model)
            if count is None:
                return None
            counts.append(count)
        return max(counts)

    def ordered(self, candidates: list[Candidate], route_key: str | None = None) -> list[Candidate]:
        """By priority; within one, by rendezvous hashing of the conversation's key, else a weighted shuffle."""
        result: list[Candidate] = []
        for priority in sorted({c.priority for c in candidates}):
            group = [c for c in candidates if c.priority == priority]
            if route_key is not None:
                result += sorted(group, key=lambda c: rendezvous(route_key, c.ident, c.weight), reverse=True)
                continue
            while group:
                pick = random.choices(group, weights=[max(c.weight, 0) or 1 for c in group])[0]
                group.remove(pick)
                result.append(pick)
        return result

    def generate(self, call: Call, upstream_model: str) -> RoutedGeneration:
        candidates = self.ordered(self.usable(call.request)[0], call.route_key)
        return RoutedGeneration(call, candidates, time.monotonic() + self.deadline, self.name, self.fingerprint)

    @property
    def primary(self) -> Candidate:
        """The route tried first: the lowest priority, the first listed among equals."""
        return min(self.candidates, key=lambda c: c.priority)

    async def tokenize(self, text: str, model: str) -> list[Token] | None:
        primary = self.primary
        if not isinstance(primary.backend, Tokenizer):
            return None
        return await primary.backend.tokenize(text, primary.model)

    def describe(self, model: str) -> ModelFacts | None:
        primary = self.primary
        return primary.backend.describe(primary.model) if isinstance(primary.backend, DescribesModels) else None


class RoutedGeneration:
    """A `Generation` over the first route that answers: until its first event it tries the candidates in
    order; after it, it passes that route's events on, counting their output for an estimate."""

    def __init__(self, call: Call, candidates: list[Candidate], deadline: float, backend: str,
                 fingerprint: str) -> None:
        self.call = call
        self.candidates = candidates
        self.deadline = deadline
        self._backend = backend  # the first route's, until one answers
        self._fingerprint = fingerprint
        # The route that answered: a provider's own generation, or an upstream's events (exactly one is set).
        self._generation: Generation | None = None
        self._events: AsyncGenerator[Event] | None = None
        self._closed = False
        self._ended = False
        self._output_bytes = 0  # UTF-8 bytes of output seen: the estimate's input if no usage comes
        self._usage: Usage | None = None  # the backend's report, or our estimate once the stream ended
        self._prompt_copies = 1  # n when the request went out as n single requests (each bills the prompt)

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def origin(self) -> Origin:
        return self._generation.origin if self._generation is not None else "live"

    def __aiter__(self) -> RoutedGeneration:
        return self

    async def __anext__(self) -> Event:
        if self._closed or self._ended:
            raise StopAsyncIteration
        source = self._generation if self._generation is not None else self._events
        if source is None:
            return self._seen(await self._open())
        try:
            async with asyncio.timeout_at(self._loop_deadline()):
                event: Event = await source.__anext__()
        except TimeoutError:
            raise GatewayError(504, "timeout", "The request ran past its deadline.") from None
        except StopAsyncIteration:
            self._ended = True
            if self._usage is not None:
                raise
            # A complete reply without usage: bill an estimate, and show the client that same figure.
            self._usage = self._estimate()
            return UsageReport(self._usage)
        return self._seen(event)

    def _seen(self, event: Event) -> Event:
        if isinstance(event, Delta):
            # A few len() calls per event; `utf8_len` encodes only non-ASCII text.
            size = 0
            if event.content:
                size += utf8_len(event.content)
            if event.reasoning_content:
                size += utf8_len(event.reasoning_content)
            for call in event.tool_calls or ():
                function = call.get("function")
                if isinstance(function, dict):
                    for value in (function.get("name"), function.get("arguments")):
                        if isinstance(value, str):
                            size += utf8_len(value)
            self._output_bytes += size
        elif isinstance(event, UsageReport):
            self._usage = event.usage
        return event

    def _estimate(self) -> Usage:
        """The backend's usage, estimated from the request and the output seen (on rare paths only: a backend
        that reports none, or a request cut short). The output is capped at what the backend was asked for, so
        the estimate stays within the reservation."""
        request = self.call.request
        prompt = estimate_prompt(prompt_text_bytes(request), prompt_shape(request)) * self._prompt_copies
        completion = estimate_output_tokens(self._output_bytes)
        limit = self.call.output_limit
        if limit is not None:
            completion = min(completion, request.choices * limit)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, estimated=True)

    def _loop_deadline(self) -> float:
        return asyncio.get_running_loop().time() + max(0.0, self.deadline - time.monotonic())

    async def _open(self) -> Event:
        failures: list[UpstreamFailure] = []
        for candidate in self.candidates:
            upstream = candidate.upstream
            if upstream is None:
                # A provider (the local engine): it has no keys to rotate; a 503 (still loading) moves on.
                generation = self._generation = candidate.backend.generate(self.call, candidate.model)
                try:
                    first = await generation.__anext__()
                except BaseException as exc:
                    # Closed on every failure, cancellation included (the client left while this request was
                    # queued): its jobs must not run later for nobody.
                    self._generation = None
                    await generation.aclose()
                    if not isinstance(exc, GatewayError) or exc.status != 503:
                        raise
                    failures.append(UpstreamFailure(exc, retryable=True))
                    continue
                self._use(candidate.backend, candidate.backend.prompt_copies(self.call.request))
                return first
            tried: set[int] = set()
            while upstream.available(tried):
                if time.monotonic() >= self.deadline:
                    raise GatewayError(504, "timeout", "No upstream answered before the deadline.")
                try:
                    async with asyncio.timeout_at(self._loop_deadline()):
                        events = self._events = await upstream.attempt(self.call, candidate.model, tried)
                        first = await events.__anext__()
                except UpstreamFailure as failure:  # the backend's breaker was told by attempt()
                    if not failure.retryable:
                        raise failure.error from None
                    failures.append(failure)
                    continue
                except (GatewayError, StopAsyncIteration) as exc:  # broke before any output: try elsewhere
                    await self._drop_events()
                    if isinstance(exc, GatewayError) and exc.status < 500:
                        # The error's own fields blame the request (openai_compat.stream_error): the caller's
                        # answer, not the backend's failure, or one caller's requests would open its breaker.
                        raise exc from None
                    upstream.failed()
                    error = exc if isinstance(exc, GatewayError) else GatewayError(502, "api_error", "Empty reply.")
                    failures.append(UpstreamFailure(error, retryable=True))
                    continue
                except TimeoutError:
                    # Stalled until the deadline before its first event: a failure like any other, so the breaker
                    # opens and later requests go elsewhere (or fail fast) instead of waiting as long.
                    await self._drop_events()
                    upstream.failed()
                    raise GatewayError(504, "timeout", "No upstream answered before the deadline.") from None
                except BaseException:
                    await self._drop_events()  # cancelled while waiting: the upstream connection is let go now
                    raise
                upstream.succeeded()
                self._use(upstream, upstream.prompt_copies(self.call.request))
                return first
        raise final_error(failures, self.candidates)

    async def _drop_events(self) -> None:
        events, self._events = self._events, None
        if events is not None:
            await events.aclose()

    def _use(self, backend: Provider, prompt_copies: int) -> None:
        self._backend = backend.name
        self._fingerprint = backend.fingerprint
        self._prompt_copies = prompt_copies

    def usage_so_far(self) -> Usage | None:
        """For a request cut short: the backend's own figure if it has one, else an estimate from the prompt and
        the output seen so far (core/pricing.py), so a client that hangs up is still billed."""
        if self._generation is not None:
            return self._generation.usage_so_far()
        if self._events is None:
            return None
        if self._usage is not None:
            return self._usage
        return self._estimate()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Closed, but kept: `usage_so_far` still reads what they consumed (the settlement comes after the close).
        if self._generation is not None:
            await self._generation.aclose()
        if self._events is not None:
            await self._events.aclose()


def final_error(failures: list[UpstreamFailure], candidates: list[Candidate]) -> GatewayError:
    """The caller's answer when every route failed: 429 if rate limits are why, else timeout, else 502/503."""
    if not failures:
        waits = [c.upstream.retry_in() for c in candidates if c.upstream is not None]
        cooling = max(1, int(min(waits, default=1.0)) + 1)
        return GatewayError(503, "upstream_unavailable", "Every upstream for this model is cooling down after "
                            "failures; retry shortly.", headers={"retry-after": str(cooling)})
    limited = [f for f in failures if f.error.status == 429]
    if limited and len(limited) == len(failures):
        wait = min((f.retry_after for f in limited if f.retry_after is not None), default=1.0)
        return GatewayError(429, "too_many_requests", "Every upstream for this model is rate limiting; retry later.",
                            headers={"retry-after": str(max(1, int(wait + 0.999)))})
    if any(f.error.status == 504 for f in failures) and all(f.error.status in (504, 429) for f in failures):
        return GatewayError(504, "timeout", "The upstream inference timed out.")
    last = failures[-1].error
    return GatewayError(last.status if last.status >= 500 else 502, last.code if last.status >= 500 else "api_error",
                        last.message, headers=last.headers)


def prompt_shape(request: ChatCompletionRequest) -> PromptShape:
    """What the prompt holds beyond its bytes, for core.pricing's bound and estimates: one pass over the messages
    (no text is measured)."""
    tool_calls = images = url_bytes = 0
    for message in request.messages:
        if message.tool_calls:
            tool_calls += len(message.tool_calls)
        if isinstance(message.content, list):
            for part in message.content:
                if isinstance(part, ImagePart):
                    images += 1
                    url_bytes += len(part.image_url.url)  # characters: never more than its share of the body
    return PromptShape(messages=len(request.messages), tool_calls=tool_calls, images=images,
                       image_url_bytes=url_bytes)


def prompt_text_bytes(request: ChatCompletionRequest) -> int:
    """UTF-8 bytes of the text a prompt carries (messages, names, tool calls, tool and schema JSON); only when a
    backend reported no usage, so serialising the tools here is off the common path."""
    size = 0
    for message in request.messages:
        for text in (message.content if isinstance(message.content, str) else None, message.name,
                     message.reasoning_content, message.refusal):
            if text:
                size += utf8_len(text)
        if isinstance(message.content, list):
            size += sum(utf8_len(p.text) for p in message.content if isinstance(p, TextPart))
        for call in message.tool_calls or ():
            size += utf8_len(call.function.name) + utf8_len(call.function.arguments)
    if request.tools:
        size += len(orjson.dumps([t.model_dump(exclude_none=True) for t in request.tools]))
    if request.response_format is not None:
        size += len(orjson.dumps(request.response_format.model_dump(exclude_none=True, by_alias=True)))
    return size
