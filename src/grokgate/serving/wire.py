"""A wire format: how one API shape renders the events of a generation. The lifecycle (serving/lifecycle.py) is
the same for every wire format; only these objects differ.

Chat completions are the first (serving/chat.py over core/completion.py); the Responses API is meant to be the
second, with its own renderers and framing and the same lifecycle. A renderer turns events into payloads (JSON
objects); the framing, given by the HTTP layer (api/sse.py), turns payloads into bytes on the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from grokgate.core.errors import GatewayError
from grokgate.core.events import Event, Usage
from grokgate.schemas.chat import ChatCompletionRequest

Payload = dict[str, Any]  # one JSON object of the wire format (a chunk, a whole completion, an error event)


class StreamRenderer(Protocol):
    """One streamed response. `opening` goes out first, `on_event` per event, then, once the settlement is
    committed, `closing`; or `failed` if the generation breaks after the response started."""

    @property
    def usage(self) -> Usage | None:
        """The last usage the generation reported (None: none yet)."""

    def opening(self) -> Sequence[Payload]: ...

    def on_event(self, event: Event) -> Sequence[Payload]: ...

    def closing(self) -> Sequence[Payload]: ...

    async def commit(self) -> None:
        """Once the settlement of a complete stream is committed, before `closing`: what the wire format keeps of
        the response (the Responses API stores it, serving/responses.py; chat keeps nothing)."""

    def failed(self, error: GatewayError, trace_id: str) -> Sequence[Payload]: ...


class Collector(Protocol):
    """One collected (non-streamed) response."""

    @property
    def usage(self) -> Usage | None: ...

    def on_event(self, event: Event) -> None: ...

    def result(self) -> Payload: ...

    async def commit(self) -> None:
        """Once the settlement of the complete answer (`result`) is committed, before the client gets it."""


class Framing(Protocol):
    """Payloads to bytes for a stream (Server-Sent Events: api/sse.py)."""

    @property
    def keepalive(self) -> bytes:
        """Sent during silences, so proxies and clients do not time out (b"": nothing is sent; gRPC's transport
        keeps itself alive)."""

    @property
    def done(self) -> bytes:
        """Sent after the closing payloads of a complete stream (b"" for a format without an end marker)."""

    def frame(self, payload: Payload) -> bytes: ...


class WireFormat(Protocol):
    @property
    def label(self) -> str:
        """What the request log line calls one request of this format ("chat completion")."""

    @property
    def endpoint(self) -> str:
        """The API a charge came from, as the ledger, the metrics and the log line name it ("chat", "responses")."""

    @property
    def framing(self) -> Framing: ...

    def renderer(self, request: ChatCompletionRequest, fingerprint: str) -> StreamRenderer: ...

    def collector(self, request: ChatCompletionRequest, fingerprint: str) -> Collector: ...
