"""The serving layer (src/grokgate/serving/): one request's life from admission to settlement.

In-process tests drive `Serving` directly with a fake provider at the provider seam and a fake admission that
records every settlement; HTTP tests serve the app from `create_app` with the same fakes on an in-thread uvicorn
(temporary data and cache dirs, nothing of the user's), for what only a real connection shows (a client that
hangs up at a given moment).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import orjson
import pytest
import uvicorn

from grokgate.api.sse import CHAT_SSE
from grokgate.app import create_app
from grokgate.core.admission import AdmissionRequest, Principal
from grokgate.core.errors import GatewayError
from grokgate.core.events import Delta, Event, Finish, Origin, Usage, UsageReport
from grokgate.observability.metrics import Metrics
from grokgate.providers.base import BackendStatus, ModelTable, Route, Upstream
from grokgate.providers.router import Candidate, RoutedGeneration, RoutedModel
from grokgate.schemas.chat import ChatCompletionRequest
from grokgate.serving import ABANDONED, Call, Collected, Serving, Streamed
from grokgate.serving.chat import ChatWire
from grokgate.settings import Settings
from tests.conftest import free_port

# -- fakes at the seams ----------------------------------------------------------------------------------------


@dataclass
class Settled:
    usage: Usage | None
    status: str
    estimated: bool
    backend: str


@dataclass
class RecordingTicket:
    """A ticket that records each settlement; the lifecycle must call `settle` exactly once."""

    log: list[str]
    headers: dict[str, str] = field(default_factory=lambda: {"x-ticket": "1"})
    output_limit: int | None = 100
    cost: int = 0
    overrun: bool = False
    settlements: list[Settled] = field(default_factory=list)

    async def settle(self, usage: Usage | None, *, status: str, estimated: bool = False, backend: str = "",
                     origin: Origin = "live") -> None:
        self.log.append(f"settle:{status}")
        await asyncio.sleep(0)  # a real store commit suspends: a cancellation here must not lose it
        self.settlements.append(Settled(usage, status, estimated, backend))
        self.cost = 7


class RecordingAdmission:
    def __init__(self) -> None:
        self.tickets: list[RecordingTicket] = []
        self.log: list[str] = []
        self.requests: list[AdmissionRequest] = []

    async def authenticate(self, authorization: str | None) -> Principal:
        if authorization != "Bearer k":
            raise GatewayError(401, "invalid_token", "The specified token is invalid or wrong.")
        return Principal(key_id="test")

    async def admit(self, principal: Principal, request: AdmissionRequest) -> RecordingTicket:
        self.requests.append(request)
        ticket = RecordingTicket(self.log)
        self.tickets.append(ticket)
        return ticket


class FakeGeneration:
    """What it does depends on the upstream model name: `ok` answers "abc"; `fail-early` fails before any output,
    `fail-late` after its first delta; `wait-first` and `wait-late` wait for the provider's gate before their
    first event, or after each delta."""

    def __init__(self, provider: FakeProvider, request: ChatCompletionRequest, model: str) -> None:
        self._provider = provider
        self._request = request
        self._model = model
        self._events = self._run()
        self.closed = False
        self.produced = 0
        provider.generations.append(self)

    @property
    def backend(self) -> str:
        return "fake-backend"

    @property
    def fingerprint(self) -> str:
        return "fp_fake"

    @property
    def origin(self) -> Origin:
        return "live"

    def usage_so_far(self) -> Usage | None:
        # `counted`: a backend that knows what it consumed so far (the local engine's running counts).
        return Usage(prompt_tokens=3, completion_tokens=self.produced, estimated=not self._provider.counted)

    async def _run(self) -> AsyncIterator[Event]:
        model = self._model
        if model == "fail-early":
            raise GatewayError(429, "too_many_requests", "busy")
        if model == "wait-first":
            await self._provider.gate.wait()
        for word in ("a", "b", "c"):
            self.produced += 1
            self._provider.produced.set()
            yield Delta(0, word)
            if model == "fail-late":
                raise GatewayError(502, "api_error", "broke")
            if model == "wait-late":
                await self._provider.gate.wait()
        yield Finish(0, "stop")
        yield UsageReport(Usage(prompt_tokens=3, completion_tokens=3))

    def __aiter__(self) -> FakeGeneration:
        return self

    async def __anext__(self) -> Event:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        self.closed = True
        await self._events.aclose()  # type: ignore[attr-defined]


class FakeProvider:
    name = "fake"
    fingerprint = "fp_fake"

    def __init__(self) -> None:
        self.generations: list[FakeGeneration] = []
        self.calls: list[Call] = []  # as the serving layer passed them
        self.gate = asyncio.Event()
        self.produced = asyncio.Event()  # some generation has produced output
        self.counted = False  # its generations' usage_so_far is counted, not estimated

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

    def generate(self, call: Call, upstream_model: str) -> FakeGeneration:
        self.calls.append(call)
        return FakeGeneration(self, call.request, upstream_model)


MODELS = ("ok", "fail-early", "fail-late", "wait-first", "wait-late")


# -- over HTTP ---------------------------------------------------------------------------------------------------


@dataclass
class App:
    url: str
    port: int
    provider: FakeProvider
    admission: RecordingAdmission
    loop: asyncio.AbstractEventLoop

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self.provider.gate.set)

    def settled(self, timeout: float = 5.0) -> RecordingTicket:
        """The one ticket of the last request, once it has settled."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ticket = self.admission.tickets[-1] if self.admission.tickets else None
            if ticket is not None and ticket.settlements:
                return ticket
            time.sleep(0.02)
        raise AssertionError(f"no settlement within {timeout}s: {self.admission.tickets}")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    provider = FakeProvider()
    admission = RecordingAdmission()
    models = ModelTable([Route(name, provider, name) for name in MODELS])
    settings = Settings(api_keys=["k"], accounts=False, data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                        keepalive_seconds=0.3, tune_gc=False)
    application = create_app(settings, admission=admission, models=models)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(application, port=port, log_level="critical", lifespan="on"))
    loops: list[asyncio.AbstractEventLoop] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        loops.append(loop)
        loop.run_until_complete(server.serve())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:  # a server that cannot start fails the fixture at once, not after a hang
        assert thread.is_alive() and time.monotonic() < deadline, "the in-thread server did not start"
        time.sleep(0.01)
    yield App(f"http://127.0.0.1:{port}", port, provider, admission, loops[0])
    server.should_exit = True
    thread.join(10)


def send_and_hang_up(app: App, body: dict[str, object]) -> None:
    payload = orjson.dumps(body)
    with socket.create_connection(("127.0.0.1", app.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                     b"Content-Type: application/json\r\nContent-Length: " + str(len(payload)).encode()
                     + b"\r\n\r\n" + payload)
        time.sleep(0.05)  # the request is read; the client leaves before the first event


@pytest.mark.parametrize("stream", [True, False])
def test_hang_up_before_the_first_event_settles_and_closes(app: App, stream: bool) -> None:
    """A client gone while the backend has not answered yet: the response starts (the first-event wait ends at
    the keep-alive interval) on a connection already closed. The ticket still settles, once, and the generation
    is closed (its slot freed). Before the serving layer, a stream whose body was closed before its first step
    never settled: the concurrency slot and the reservation stayed held."""
    send_and_hang_up(app, {"model": "wait-first", "messages": [{"role": "user", "content": "x"}], "stream": stream})
    ticket = app.settled()
    assert [s.status for s in ticket.settlements] == ["client_disconnected"]
    time.sleep(0.1)
    assert len(ticket.settlements) == 1
    assert app.provider.generations[-1].closed


# -- the router over a provider (the local engine as a route) ---------------------------------------------------


def chat_request(model: str = "ok", **fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": model, "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


def test_router_closes_a_provider_generation_cut_short_before_its_first_event() -> None:
    """A routed model whose route is a provider (the local engine in a routing file): the client goes away while
    the request still waits for its first event (queued behind other jobs). Closing the routed generation must
    close the provider's, or its jobs run later for nobody."""

    async def run() -> FakeGeneration:
        provider = FakeProvider()
        routed = RoutedModel("m", [Candidate(provider, "wait-first")])
        generation = routed.generate(Call(chat_request("m"), "key:test"), "m")
        first = asyncio.ensure_future(generation.__anext__())
        await asyncio.sleep(0.01)
        first.cancel()  # the reader is cancelled when the request ends (serving/pump.py Pump.aclose)
        with pytest.raises(asyncio.CancelledError):
            await first
        await generation.aclose()
        return provider.generations[0]

    assert asyncio.run(run()).closed


# -- the lifecycle, in process -----------------------------------------------------------------------------------

CHAT = ChatWire(CHAT_SSE)


class Harness:
    def __init__(self, keepalive: float = 0.05, routes: tuple[Route, ...] = ()) -> None:
        self.provider = FakeProvider()
        self.admission = RecordingAdmission()
        self.metrics = Metrics()
        models = ModelTable([Route(name, self.provider, name) for name in MODELS] + list(routes))
        self.serving = Serving(self.admission, models, self.metrics, keepalive=keepalive)
        self.gone = asyncio.Event()  # set to play a client that hangs up during a collected request

    async def serve(self, model: str, **fields: object) -> Streamed | Collected | object:
        request = chat_request(model, **fields)
        call = Call(request, "key:test", prompt_tokens=10, request_id="req-1", started=time.perf_counter())
        return await self.serving.serve(call, Principal(key_id="test"), CHAT, self.gone.wait)

    @property
    def ticket(self) -> RecordingTicket:
        assert len(self.admission.tickets) == 1
        return self.admission.tickets[0]

    def in_flight(self) -> float:
        return self.metrics.in_flight._value.get()  # type: ignore[attr-defined,no-any-return]


async def read_all(result: object, log: list[str]) -> list[bytes]:
    """Read a stream to its end, logging each frame as it arrives (the settlement logs itself in between)."""
    assert isinstance(result, Streamed)
    frames: list[bytes] = []
    try:
        async for data in result:
            frames.append(data)
            log.append("done" if data == b"data: [DONE]\n\n" else "frame")
    finally:
        await result.aclose()
    return frames


def test_stream_settles_once_before_its_last_chunk() -> None:
    async def run() -> None:
        h = Harness()
        result = await h.serve("ok", stream=True)
        assert isinstance(result, Streamed)
        assert "x-grokgate-overhead-ms" in result.headers and result.headers["x-ticket"] == "1"
        frames = await read_all(result, h.admission.log)
        # The held-back finish chunk and [DONE] go out only after the ledger has the request, in one write.
        assert h.admission.log[-2:] == ["settle:ok", "frame"], h.admission.log
        assert b'"finish_reason":"stop"' in frames[-1] and frames[-1].endswith(b"data: [DONE]\n\n")
        assert [s.status for s in h.ticket.settlements] == ["ok"]
        assert h.ticket.settlements[0].usage == Usage(3, 3) and h.ticket.settlements[0].backend == "fake-backend"
        assert h.in_flight() == 0

    asyncio.run(run())


def test_collected_answer_is_settled_before_it_is_returned() -> None:
    async def run() -> None:
        h = Harness()
        result = await h.serve("ok")
        assert isinstance(result, Collected)
        assert [s.status for s in h.ticket.settlements] == ["ok"]
        assert result.body["choices"][0]["message"]["content"] == "abc"
        assert result.body["system_fingerprint"] == "fp_fake"
        assert float(result.headers["x-grokgate-overhead-ms"]) >= 0 and result.headers["x-ticket"] == "1"
        assert h.provider.generations[0].closed and h.in_flight() == 0

    asyncio.run(run())


@pytest.mark.parametrize("stream", [True, False])
def test_failure_before_the_first_event_keeps_its_status_and_settles_once(stream: bool) -> None:
    async def run() -> None:
        h = Harness()
        with pytest.raises(GatewayError) as raised:
            await h.serve("fail-early", stream=stream)
        assert raised.value.status == 429
        assert [s.status for s in h.ticket.settlements] == ["error"]
        assert h.provider.generations[0].closed and h.in_flight() == 0

    asyncio.run(run())


@pytest.mark.parametrize("counted", [False, True])
def test_failure_mid_stream_is_an_error_event_without_done(counted: bool) -> None:
    """Billed what the generation had consumed; marked estimated only when the generation says it estimated."""
    async def run() -> None:
        h = Harness()
        h.provider.counted = counted
        frames = await read_all(await h.serve("fail-late", stream=True), h.admission.log)
        last = orjson.loads(frames[-1].removeprefix(b"data: "))
        assert last == {"error": {"code": "api_error", "message": "broke", "type": "api_error", "param": None},
                        "trace_id": "req-1"}
        assert b"data: [DONE]\n\n" not in frames
        settled = h.ticket.settlements
        assert [s.status for s in settled] == ["error"]
        assert settled[0].usage == Usage(3, 1, estimated=not counted), "the output it had billed"
        assert settled[0].estimated is not counted
        assert h.in_flight() == 0

    asyncio.run(run())


def test_failure_while_collecting_settles_once_and_raises() -> None:
    async def run() -> None:
        h = Harness()
        with pytest.raises(GatewayError, match="broke"):
            await h.serve("fail-late")
        assert [s.status for s in h.ticket.settlements] == ["error"]
        assert h.provider.generations[0].closed and h.in_flight() == 0

    asyncio.run(run())


def test_stream_disconnect_closes_the_generation_and_bills_what_was_used() -> None:
    """The client goes away mid-stream: Starlette stops iterating and closes the body (api/sse.py SSEResponse)."""

    async def run() -> None:
        h = Harness()
        result = await h.serve("wait-late", stream=True)
        assert isinstance(result, Streamed)
        body = aiter(result)
        frames = [await anext(body) for _ in range(2)]  # the role chunk and "a"
        assert b'"content":"a"' in frames[1]
        await result.aclose()
        await result.aclose()  # closing twice changes nothing
        settled = h.ticket.settlements
        assert [s.status for s in settled] == ["client_disconnected"]
        assert settled[0].usage == Usage(3, 1, estimated=True) and settled[0].estimated
        assert h.provider.generations[0].closed and h.in_flight() == 0

    asyncio.run(run())


def test_stream_closed_before_it_was_read_still_settles() -> None:
    """A response that never started its body (the connection was gone at the response start) is still closed by
    SSEResponse. With a plain async generator as the body (before the serving layer), closing it before its
    first step ran none of its code: no settlement, the generation left running."""

    async def run() -> None:
        h = Harness()
        result = await h.serve("wait-late", stream=True)
        assert isinstance(result, Streamed)
        await result.aclose()
        assert [s.status for s in h.ticket.settlements] == ["client_disconnected"]
        assert h.provider.generations[0].closed and h.in_flight() == 0

    asyncio.run(run())


def test_collect_disconnect_stops_the_generation() -> None:
    async def run() -> None:
        h = Harness()
        task = asyncio.ensure_future(h.serve("wait-late"))
        await h.provider.produced.wait()
        h.gone.set()
        assert await task is ABANDONED
        assert [s.status for s in h.ticket.settlements] == ["client_disconnected"]
        assert h.provider.generations[0].closed and h.in_flight() == 0

    asyncio.run(run())


def test_keepalives_go_out_during_silences_and_the_stream_goes_on() -> None:
    async def run() -> None:
        h = Harness(keepalive=0.02)
        result = await h.serve("wait-first", stream=True)  # the first event's wait ended at the interval
        assert isinstance(result, Streamed)

        async def release_later() -> None:
            await asyncio.sleep(0.1)
            h.provider.gate.set()

        releaser = asyncio.ensure_future(release_later())
        frames = await read_all(result, h.admission.log)
        await releaser
        assert frames.count(b": keep-alive\n\n") >= 2
        assert frames[-1].endswith(b"data: [DONE]\n\n") and [s.status for s in h.ticket.settlements] == ["ok"]

    asyncio.run(run())


@pytest.mark.parametrize("stream", [True, False])
def test_settlement_survives_cancellation_of_the_request(stream: bool) -> None:
    """Starlette cancels a stream's body through an anyio cancel scope (a disconnect), and shutdown cancels the
    requests still running; a cancelled scope cancels every await inside it again, so the settlement that
    follows must run shielded to complete (RecordingTicket.settle suspends once before it records)."""

    async def run() -> None:
        h = Harness()
        async with anyio.create_task_group() as group:

            async def request() -> None:
                result = await h.serve("wait-late", stream=stream)
                async for _ in result:  # type: ignore[attr-defined]
                    pass

            group.start_soon(request)
            await h.provider.produced.wait()
            await asyncio.sleep(0.01)
            group.cancel_scope.cancel()
        assert [s.status for s in h.ticket.settlements] == ["client_disconnected" if stream else "error"]
        assert h.provider.generations[0].closed and h.in_flight() == 0

    asyncio.run(run())


def test_unknown_model_is_a_404_before_admission() -> None:
    async def run() -> None:
        h = Harness()
        with pytest.raises(GatewayError) as raised:
            await h.serve("nope")
        assert (raised.value.status, raised.value.code, raised.value.param) == (404, "model_not_found", "model")
        assert "ok, fail-early" in raised.value.message and not h.admission.tickets

    asyncio.run(run())


def test_the_output_is_held_to_what_was_reserved() -> None:
    async def run() -> None:
        h = Harness()
        await h.serve("ok")
        call = h.provider.calls[0]
        assert call.output_limit == 100, "RecordingTicket.output_limit"
        assert call.request.max_tokens is None  # what the client sent is never rewritten

    asyncio.run(run())


# -- the router dispatches on the upstream protocol ------------------------------------------------------------


class FakeUpstream:
    """An `Upstream` (providers/base.py) that is not OpenAICompatBackend: the router must drive it all the same."""

    fingerprint = "fp_up"

    def __init__(self, name: str, *, broken: bool = False, stall: bool = False, fans_out: bool = False,
                 stall_later: bool = False) -> None:
        self.name = name
        self.broken = broken  # the reply breaks before its first event
        self.stall = stall  # the reply never starts
        self.stall_later = stall_later  # the reply stalls after its first delta
        self.fans_out = fans_out
        self.record: list[str] = []
        self.closed_streams = 0

    def ready(self) -> bool:
        return True

    def status(self) -> BackendStatus:
        return {"kind": "fake", "state": "closed", "keys": []}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def check(self, request: ChatCompletionRequest) -> None:
        return None

    def prompt_copies(self, request: ChatCompletionRequest) -> int:
        return request.choices if self.fans_out else 1

    def generate(self, call: Call, upstream_model: str) -> RoutedGeneration:
        raise AssertionError("the router drives an upstream by attempt(), never generate()")

    def available(self, tried: set[int]) -> bool:
        return 0 not in tried

    def retry_in(self) -> float:
        return 0.0

    async def attempt(self, call: Call, model: str, tried: set[int]) -> AsyncGenerator[Event]:
        tried.add(0)
        self.record.append(f"attempt:{model}")

        async def events() -> AsyncGenerator[Event]:
            try:
                if self.stall:
                    await asyncio.Event().wait()
                if self.broken:
                    raise GatewayError(502, "api_error", "broke before any output")
                yield Delta(0, "up")
                if self.stall_later:
                    await asyncio.Event().wait()
                yield Finish(0, "stop")
                yield UsageReport(Usage(5, 1))
            finally:
                self.closed_streams += 1

        return events()

    def succeeded(self) -> None:
        self.record.append("succeeded")

    def failed(self) -> None:
        self.record.append("failed")


def test_router_drives_any_upstream_by_protocol_and_falls_back() -> None:
    async def run() -> None:
        broken, good = FakeUpstream("broken", broken=True), FakeUpstream("good")
        assert isinstance(good, Upstream)
        routed = RoutedModel("m", [Candidate(broken, "b"), Candidate(good, "g", priority=1)])
        generation = routed.generate(Call(chat_request("m"), "key:test"), "m")
        events = [event async for event in generation]
        assert events[0] == Delta(0, "up") and events[-1] == UsageReport(Usage(5, 1))
        assert broken.record == ["attempt:b", "failed"] and broken.closed_streams == 1
        assert good.record == ["attempt:g", "succeeded"]
        assert (generation.backend, generation.fingerprint) == ("good", "fp_up")

    asyncio.run(run())


def test_router_lets_go_of_an_upstream_reply_cut_short_before_its_first_event() -> None:
    async def run() -> None:
        stalled = FakeUpstream("stalled", stall=True)
        generation = RoutedModel("m", [Candidate(stalled, "s")]).generate(Call(chat_request("m"), "key:test"), "m")
        first = asyncio.ensure_future(generation.__anext__())
        await asyncio.sleep(0.01)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await generation.aclose()
        assert stalled.closed_streams == 1, "the reply (an upstream connection) is closed, not left to the GC"
        assert generation.usage_so_far() is None, "nothing came back: nothing is known to be used"

    asyncio.run(run())


def test_prompt_copies_is_the_most_any_route_may_bill() -> None:
    routed = RoutedModel("m", [Candidate(FakeUpstream("a"), "a"), Candidate(FakeUpstream("b", fans_out=True), "b")])
    assert routed.prompt_copies(chat_request("m", n=3)) == 3
    assert routed.prompt_copies(chat_request("m")) == 1
    plain = RoutedModel("m", [Candidate(FakeUpstream("a"), "a"), Candidate(FakeProvider(), "p")])
    assert plain.prompt_copies(chat_request("m", n=3)) == 1


def test_routed_stream_cut_short_is_billed_the_routers_estimate() -> None:
    """An upstream that has not reported usage when the client leaves: the router's estimate (prompt and output
    seen) is billed, marked estimated, after the routed generation was closed."""

    async def run() -> None:
        upstream = FakeUpstream("up", stall_later=True)
        h = Harness(routes=(Route("routed", RoutedModel("routed", [Candidate(upstream, "u")]), "routed"),))
        result = await h.serve("routed", stream=True)
        assert isinstance(result, Streamed)
        body = aiter(result)
        assert b'"content":"up"' in [await anext(body) for _ in range(2)][1]
        await result.aclose()
        settled = h.ticket.settlements
        assert [s.status for s in settled] == ["client_disconnected"] and settled[0].backend == "up"
        assert settled[0].estimated and settled[0].usage is not None
        assert settled[0].usage.completion_tokens == 1 and settled[0].usage.prompt_tokens > 0
        assert upstream.closed_streams == 1

    asyncio.run(run())


# -- the registry ------------------------------------------------------------------------------------------------


def test_an_http_backend_is_an_upstream_and_a_provider_on_its_own() -> None:
    import grokgate.providers.openai_compat  # noqa: F401  (registers its kind)
    from grokgate.providers.base import Provider, create, register

    backend = create("openai", name="nowhere", base_url="http://127.0.0.1:9/v1", connect_timeout=2.0)
    assert isinstance(backend, Upstream) and isinstance(backend, Provider)

    async def run() -> None:
        generation = backend.generate(Call(chat_request("m"), "key:test"), "m")
        try:
            with pytest.raises(GatewayError) as raised:  # served alone, as a route of one: nothing listens there
                await generation.__anext__()
        finally:
            await generation.aclose()
            await backend.close()
        assert raised.value.status == 502 and "unreachable" in raised.value.message

    asyncio.run(run())

    register("not-a-provider")(lambda **config: object())
    with pytest.raises(TypeError, match="not a Provider"):
        create("not-a-provider")


@pytest.mark.parametrize(("asked", "reserved"), [(None, 10), (2, 2), (10, 10), (11, 10), (0, 10), (True, 10)])
def test_the_server_tool_calls_reserved_are_the_ones_xai_may_run(asked: object, reserved: int) -> None:
    """A Responses request with server-side tools reserves its own max_tool_calls (between 1 and the ceiling), the
    figure xAI is sent (providers/xai.py): before, always the ceiling, ten times what max_tool_calls 1 can cost."""
    from grokgate.schemas.responses import ResponsesChatRequest

    async def run() -> None:
        h = Harness()
        native = {"model": "ok", "input": "news", "tools": [{"type": "web_search"}]}
        if asked is not None:
            native["max_tool_calls"] = asked
        request = ResponsesChatRequest.model_validate({"model": "ok", "messages": [{"role": "user",
                                                                                     "content": "news"}]})
        request.attach(native, ["web_search"])
        call = Call(request, "key:test", prompt_tokens=10, request_id="req-1", started=time.perf_counter())
        await h.serving.serve(call, Principal(key_id="test"), CHAT, h.gone.wait)
        admitted = h.admission.requests[0]
        assert admitted.server_tool_calls == reserved == request.server_tool_calls(10)
        assert admitted.prompt_tokens == 10 + reserved * 20_000

    asyncio.run(run())
