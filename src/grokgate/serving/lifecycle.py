"""One request's whole life, whatever its wire format: admit -> generate -> first event -> stream or collect ->
settle exactly once, however it ends -> metrics and one log line.

`Serving.serve` is the entry point (api/chat.py calls it): it resolves the model, lets the backend refuse early,
admits (limits and the credit reservation: core/billing.py), holds the request to the output it paid for, opens
the generation and reads its first event before any status is committed, so errors raised before any output
keep their HTTP status. It answers with a wire-neutral result: `Streamed` (framed bytes to send), `Collected`
(one payload) or `ABANDONED` (the client left before a collected answer was ready); errors before the first
event are raised as GatewayErrors.

Invariants kept here, and only here:
- Settlement happens exactly once per admitted request (`Lifecycle.settle`), shielded from cancellation, on
  every ending: completed, failed before or after the first event, client gone, stream closed unread.
- Zero loss: a stream's settlement commits before its closing payloads and end marker; a collected answer's
  before the response exists.
- A disconnect is a normal ending: the generation is closed (its slot freed) and what it consumed is billed
  (the backend's usage so far, else the router's estimate). The HTTP layer detects the disconnect
  (api/sse.py `until_disconnected`, for both paths) and either closes the stream or lets `collected` see it.
- `x-grokgate-overhead-ms`: time spent in grokgate, measured once (at the response start for a stream, at the
  end for a collected answer), everything but the wait on the backend.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import anyio

from grokgate.core.admission import Admission, AdmissionRequest, Principal, Ticket
from grokgate.core.cassette import DEFAULT as DEFAULT_CASSETTE
from grokgate.core.errors import GatewayError
from grokgate.core.events import Event, Usage
from grokgate.core.response_cache import CacheOption
from grokgate.observability.metrics import Metrics
from grokgate.providers.base import Call, CountsPrompts, Generation, ModelTable, Provider
from grokgate.schemas.chat import ChatCompletionRequest
from grokgate.serving.affinity import assign
from grokgate.serving.pump import END, Marker, Pump
from grokgate.serving.response_cache import ResponseCache, cache_headers
from grokgate.serving.wire import Collector, Payload, StreamRenderer, WireFormat

log = logging.getLogger("grokgate.request")
stream_log = logging.getLogger("grokgate.stream")

# How a request ended, as the ledger records it (core/admission.py Ticket.settle).
OK: Final = "ok"
DISCONNECTED: Final = "client_disconnected"
ERROR: Final = "error"

INTERNAL_ERROR = GatewayError(500, "api_error", "Internal server error.")

UntilGone = Callable[[], Awaitable[None]]
"""Returns once the client has gone away (api/sse.py `until_disconnected`); it may never return."""


@dataclass(frozen=True, slots=True)
class CallOptions:
    """What the api layer knows of a request besides its body: whose it is and the options of its headers. Each
    wire format turns its parsed body and these into the one `Call` the lifecycle and the providers read
    (serving/chat.py `chat_call`, serving/responses.py `ResponsesService.prepare`)."""

    tenant: str
    request_id: str
    started: float  # time.perf_counter() when the request arrived
    cassette: str = DEFAULT_CASSETTE
    cache: CacheOption | None = None
    conversation_id: str | None = None

    def call(self, request: ChatCompletionRequest, prompt_tokens: int) -> Call:
        return Call(request, self.tenant, self.request_id, self.started, prompt_tokens, self.cassette, self.cache,
                    self.conversation_id)


class Streamed:
    """A streamed answer: framed bytes, and the headers to start the response with. Iterate it once; close it
    always (api/sse.py SSEResponse does, shielded): closing ends the request even if nothing was read."""

    __slots__ = ("_body", "_life", "headers")

    def __init__(self, life: Lifecycle, body: AsyncGenerator[bytes], headers: dict[str, str]) -> None:
        self._life = life
        self._body = body
        self.headers = headers

    def __aiter__(self) -> AsyncGenerator[bytes]:
        return self._body

    async def aclose(self) -> None:
        await self._body.aclose()  # runs the body's own ending if it started
        await self._life.end(None, None)  # else the request ends here: a stream nobody read is a disconnect


class Collected:
    """A collected answer, settled: the response body and its headers."""

    __slots__ = ("body", "headers")

    def __init__(self, body: Payload, headers: dict[str, str]) -> None:
        self.body = body
        self.headers = headers


class Abandoned:
    """The client went away before the collected answer was ready: nobody reads a response."""

    __slots__ = ()


ABANDONED: Final = Abandoned()
Result = Streamed | Collected | Abandoned


class Serving:
    """Serves requests for one app: what every request's lifecycle needs, built once."""

    def __init__(self, admission: Admission, models: ModelTable, metrics: Metrics, *, keepalive: float,
                 max_server_tool_calls: int = 10, server_tool_input_tokens: int = 20_000,
                 affinity: bool = True, shared_prompt_cache: bool = False,
                 response_cache: ResponseCache | None = None) -> None:
        self.admission = admission
        self.models = models
        self.metrics = metrics
        self.keepalive = keepalive  # seconds of silence before a keep-alive; also the first event's longest wait
        # Server-side tool calls (xAI's searches, code execution) a request that asks for them may run: what its
        # reservation pays for, and the `max_tool_calls` its backend is given (providers/xai.py).
        self.max_server_tool_calls = max_server_tool_calls
        self.server_tool_input_tokens = server_tool_input_tokens
        # Prompt-cache affinity (serving/affinity.py): a conversation keeps one id, backend and key.
        self.affinity = affinity
        # A single-tenant deployment's opt-out: clients' conversation ids go upstream as sent, not per tenant.
        self.shared_prompt_cache = shared_prompt_cache
        # The exact response cache (serving/response_cache.py): None when no model opts in.
        self.response_cache = response_cache

    async def serve(self, call: Call, principal: Principal, wire: WireFormat, until_gone: UntilGone, *,
                    admitted: Callable[[], None] | None = None) -> Result:
        """`admitted`, if given, is called once the request is admitted, before its generation opens: a deferred
        request (serving/deferred.py) answers its caller then, refusals having been raised before it."""
        request = call.request
        route = self.models.get(request.model)
        if route is None:
            available = ", ".join(self.models.names())
            raise GatewayError(
                404, "model_not_found", f"The model '{request.model}' does not exist. Available models: {available}.",
                param="model",
            )
        provider = route.provider
        provider.check(request)
        prompt = call.prompt_tokens  # one copy's bound, from the body (core/pricing.py)
        # The local engine counts it exactly: a tight reservation (only where something is reserved: not for an admin
        # or a static key).
        if principal.token_id is not None and not principal.admin and isinstance(provider, CountsPrompts):
            counted = await provider.count_prompt(call, route.upstream_model)
            if counted is not None:
                prompt = counted
        prompt *= provider.prompt_copies(request)
        tool_calls = request.server_tool_calls(self.max_server_tool_calls)
        prompt += tool_calls * self.server_tool_input_tokens  # what the tools feed back is billed as input
        ticket = await self.admission.admit(
            principal, AdmissionRequest(call.request_id, request.model, request.choices, request.output_limit, prompt,
                                        wire.endpoint, tool_calls)
        )
        # The request as admitted: held to the output the admission paid for (a request without a cap gets the
        # reserved one), with its conversation's keys. A new value: what the client sent is never rewritten.
        call = call.admitted(ticket.output_limit, *assign(call, self.affinity, shared=self.shared_prompt_cache))
        life = Lifecycle(self, call, principal, ticket, wire, provider.name)
        if admitted is not None:
            admitted()  # plain code, no await: nothing can cut in between the admission and `open`'s settling
        await life.open(provider, route.upstream_model)
        if request.stream:
            return life.streamed()
        return await life.collected(until_gone)


class Lifecycle:
    """One admitted request, from its generation to its settlement."""

    __slots__ = ("_settled", "backend", "call", "first", "generation", "overhead_ms", "principal", "pump",
                 "serving", "ticket", "wire")

    def __init__(self, serving: Serving, call: Call, principal: Principal, ticket: Ticket, wire: WireFormat,
                 backend: str) -> None:
        self.serving = serving
        self.call = call
        self.principal = principal
        self.ticket = ticket
        self.wire = wire
        self.backend = backend  # the provider's name until the generation says which backend served it
        self.generation: Generation | None = None
        self.pump: Pump | None = None
        self.first: Event | Marker = END
        self.overhead_ms: float | None = None
        self._settled = False
        serving.metrics.request_started()

    # -- the first event ---------------------------------------------------------------------------------------

    async def open(self, provider: Provider, upstream_model: str) -> None:
        """Start the generation and read its first event (at most one keep-alive interval): a failure here is
        settled and raised, and keeps its HTTP status."""
        try:
            cache = self.serving.response_cache  # a hit replays stored events; a miss records them
            self.generation = (provider.generate(self.call, upstream_model) if cache is None
                               else cache.generate(provider, self.call, upstream_model))
            self.pump = Pump(self.generation)
            self.first = await self.pump.next(self.serving.keepalive)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                if self.pump is not None:
                    await self.pump.aclose()
                await self.settle(None, ERROR, exc)
            raise
        self.backend = self.generation.backend
        self.serving.metrics.observe_first_event(self.call.request.model, time.perf_counter() - self.call.started)

    # -- streamed ----------------------------------------------------------------------------------------------

    def streamed(self) -> Streamed:
        assert self.generation is not None
        renderer = self.wire.renderer(self.call.request, self.generation.fingerprint)
        return Streamed(self, self._stream(renderer), {**self.ticket.headers, **cache_headers(self.generation),
                                                       **self.overhead_header()})

    async def _stream(self, renderer: StreamRenderer) -> AsyncGenerator[bytes]:
        framing = self.wire.framing
        frame = framing.frame
        pump = self.pump
        assert pump is not None
        keepalive = self.serving.keepalive
        failure: BaseException | None = None
        try:
            for payload in renderer.opening():
                yield frame(payload)
            event: Event | Marker = self.first
            while event is not END:
                if isinstance(event, Marker):  # TIMEOUT: a silence
                    if framing.keepalive:  # gRPC keeps its connection alive itself (HTTP/2 pings)
                        yield framing.keepalive
                    event = await pump.next(keepalive)
                    continue
                # The events that have come meanwhile go out in one write: frames concatenate (SSE events; gRPC
                # chunks, whose concatenation is one message the SDK reads as the chunks in turn: rpc/chunks.py).
                # Nothing waits for more: a lone event goes out at once.
                frames = [frame(payload) for payload in renderer.on_event(event)]
                more = pump.ready()
                while more is not None and more is not END:
                    assert not isinstance(more, Marker)  # the reader never queues a TIMEOUT
                    frames += [frame(payload) for payload in renderer.on_event(more)]
                    more = pump.ready()
                if frames:
                    yield frames[0] if len(frames) == 1 else b"".join(frames)
                event = more if more is not None else await pump.next(keepalive)
            # Zero loss: the settlement is committed before the client sees the end of the stream.
            await self.settle(renderer.usage, OK, None)
            await renderer.commit()
            closing = [frame(payload) for payload in renderer.closing()]
            if framing.done:
                closing.append(framing.done)
            if closing:
                yield b"".join(closing)
        except GatewayError as exc:
            failure = exc
            for payload in renderer.failed(exc, self.call.request_id):
                yield frame(payload)
        except Exception as exc:
            failure = exc
            stream_log.exception("stream failed", extra={"request_id": self.call.request_id})
            for payload in renderer.failed(INTERNAL_ERROR, self.call.request_id):
                yield frame(payload)
        finally:
            # A no-op after a normal end; otherwise the client went away or the backend failed.
            await self.end(renderer.usage, failure)

    # -- collected ---------------------------------------------------------------------------------------------

    async def collected(self, until_gone: UntilGone) -> Collected | Abandoned:
        assert self.generation is not None
        collector = self.wire.collector(self.call.request, self.generation.fingerprint)
        try:
            body = await self._collect(collector, until_gone)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.settle(collector.usage, ERROR, exc)
            raise
        if body is None:
            await self.settle(collector.usage, DISCONNECTED, None)
            return ABANDONED
        # Zero loss: the settlement is committed before the client receives the answer.
        await self.settle(collector.usage, OK, None)
        await collector.commit()
        return Collected(body, {**self.ticket.headers, **cache_headers(self.generation), **self.overhead_header()})

    async def _collect(self, collector: Collector, until_gone: UntilGone) -> Payload | None:
        """The whole answer; None if the client went away first (the generation is then stopped)."""
        pump = self.pump
        assert pump is not None

        async def consume() -> Payload:
            event = self.first
            while event is not END:
                if not isinstance(event, Marker):
                    collector.on_event(event)
                event = await pump.next(None)
            return collector.result()

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(until_gone())
        try:
            await asyncio.wait((consumer, watcher), return_when=asyncio.FIRST_COMPLETED)
            # Both may end in one turn of the loop (the client left while the first event was awaited, and the
            # rest came at once): nobody will read the answer, so it is a disconnect.
            return consumer.result() if consumer.done() and not watcher.done() else None
        finally:
            for task in (consumer, watcher):
                task.cancel()
            with anyio.CancelScope(shield=True):
                await pump.aclose()

    # -- the end -----------------------------------------------------------------------------------------------

    async def end(self, usage: Usage | None, failure: BaseException | None) -> None:
        """Stop the generation and settle, if that has not happened: after a failure, or as a disconnect."""
        if self._settled:
            return
        with anyio.CancelScope(shield=True):
            if self.pump is not None:
                await self.pump.aclose()
            await self.settle(usage, DISCONNECTED if failure is None else ERROR, failure)

    async def settle(self, usage: Usage | None, outcome: str, failure: BaseException | None) -> None:
        """Exactly once per request: the ticket (shielded), then the metrics and the log line."""
        if self._settled:
            return
        self._settled = True
        if usage is None and self.generation is not None:
            # Cut short: bill what the backend had consumed so far (its count, or grokgate's estimate).
            usage = self.generation.usage_so_far()
        estimated = usage is not None and usage.estimated  # grokgate's estimate, not the backend's count
        ticket = self.ticket
        metrics = self.serving.metrics
        request = self.call.request
        try:
            with anyio.CancelScope(shield=True):
                await ticket.settle(usage, status=outcome, estimated=estimated, backend=self.backend,
                                    origin=self.generation.origin if self.generation is not None else "live")
            if ticket.overrun:
                metrics.overruns.labels(request.model).inc()
        finally:
            if outcome == OK:
                self.overhead_header()
            seconds = time.perf_counter() - self.call.started
            status = 200 if outcome == OK else 499 if outcome == DISCONNECTED else 500
            if isinstance(failure, GatewayError):
                status = failure.status
            metrics.request_ended(model=request.model, backend=self.backend, status=status,
                                  stream=bool(request.stream), seconds=seconds, usage=usage, charged=ticket.cost,
                                  endpoint=self.wire.endpoint)
            if log.isEnabledFor(logging.INFO):
                self._log(status, outcome, usage, estimated, ticket.cost, seconds)

    def overhead_header(self) -> dict[str, str]:
        """Time spent in grokgate itself so far: everything but the wait on the backend (measured once)."""
        if self.overhead_ms is None:
            waited = self.pump.waited if self.pump is not None else 0.0
            own = max(time.perf_counter() - self.call.started - waited, 0.0)
            self.overhead_ms = own * 1000
            self.serving.metrics.overhead.observe(own)
        return {"x-grokgate-overhead-ms": f"{self.overhead_ms:.3f}"}

    def _log(self, status: int, outcome: str, usage: Usage | None, estimated: bool, cost: int,
             seconds: float) -> None:
        """One structured line per request: ids, counts, money and timings; never the token or the text."""
        request = self.call.request
        log.info(self.wire.label, extra={
            "request_id": self.call.request_id,
            "token": self.principal.prefix or self.principal.key_id,
            "model": request.model,
            "endpoint": self.wire.endpoint,
            "backend": self.backend,
            "stream": bool(request.stream),
            "n": request.choices,
            "status": status,
            "outcome": outcome,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "estimated": estimated,
            "cost": cost,
            "latency_ms": round(seconds * 1000, 2),
            "overhead_ms": round(self.overhead_ms, 3) if self.overhead_ms is not None else None,
        })
